"""Multi-head self-attention as the ViT runs it: the fused kernel (SDPA), the CLS row alone, and the
bfloat16 CPU path.

``scaled_dot_product_attention`` in general; on CPUs in bfloat16 plain matrix products in
cache-sized blocks, each row shifted by its maximum, which are 1.6-2x faster there than the fused
CPU kernel and as accurate. The attention weights themselves are only formed when asked for; the
CLS row alone (:meth:`Attention.cls_attention`) costs O(N), not O(N^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelConfigError

#: scores held at once by the blocked CPU path (elements): a few MB, so a block stays in cache
_BLOCK_SCORES = 1 << 22
#: with gradients the scores of a whole call are kept for the backward pass; above this many
#: (elements, per call) the fused kernel, which keeps none, is used instead
_GRAD_SCORES = 1 << 27


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = _BLOCK_SCORES
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v without gradients, a block of scores at a time, so that they stay
    in cache and memory grows with the block, not with N^2: whole heads when one fits in the block,
    else row chunks of one head. Either way a block's output is a contiguous piece of the result,
    which the matrix product writes in place (a strided piece would go through a copy)."""
    *lead, N, d = q.shape
    M = k.shape[-2]
    q = (q * d**-0.5).reshape(-1, N, d)
    kt = k.reshape(-1, M, d).transpose(1, 2)
    v = v.reshape(-1, M, v.shape[-1])
    out = q.new_empty(q.shape[0], N, v.shape[-1])
    heads, rows = (max(1, block // (N * M)), N) if N * M <= block else (1, max(1, block // M))
    for b in range(0, q.shape[0], heads):
        for r in range(0, N, rows):
            scores = shifted_scores(q[b : b + heads, r : r + rows], kt[b : b + heads])
            torch.bmm(scores.softmax(dim=-1), v[b : b + heads], out=out[b : b + heads, r : r + rows])
    return out.reshape(*lead, N, v.shape[-1])


def shifted_scores(q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """q kt minus each row's (estimated) maximum, for a softmax in bfloat16.

    bf16 products are accumulated in float32 but rounded to bf16 on the way out, an error of
    |logit| / 512: 0.1 at a logit of 50, enough to move sharp attention weights by 10%. Softmax does
    not change when a row is shifted, so the row maximum (from a first, plain product) is subtracted
    inside the accumulation (baddbmm): the logits that matter, those near the maximum, come out
    near 0, where bf16 is fine-grained. Attention then stays within the fused kernel's error of fp32
    (measured 0.0021 against 0.0016 relative for logits of std 9, where the plain products give 0.012).
    """
    with torch.no_grad():
        shift = torch.bmm(q, kt).amax(dim=-1, keepdim=True)
    return torch.baddbmm(shift, q, kt, beta=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., N, d) queries, keys and values.

    ``scaled_dot_product_attention`` everywhere except bfloat16 on a CPU, where its fused kernel
    runs well below the speed of bfloat16 matrix products (measured 1.6-2x slower than this path at
    197 to 1,561 tokens): there the scores are formed explicitly, in blocks without gradients, whole with them
    (up to ``_GRAD_SCORES`` elements), each row shifted by its maximum inside the products
    (:func:`shifted_scores`), which keeps the results as close to fp32 as the fused kernel's.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return blocked_attention(q, k, v)
        if q.numel() // q.shape[-1] * k.shape[-2] <= _GRAD_SCORES:
            *lead, N, d = q.shape
            qs = (q * d**-0.5).reshape(-1, N, d)
            kt = k.reshape(-1, k.shape[-2], d).transpose(1, 2)
            attn = shifted_scores(qs, kt).softmax(dim=-1)
            return (attn @ v.reshape(-1, *v.shape[-2:])).reshape(*lead, N, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the two halves of the last axis (RoPE's rotation by 90 degrees)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the last ``HW`` tokens of ``t`` (..., N, d) by the angles whose (sin, cos) are (HW, d);
    the first ``N - HW`` tokens (CLS, storage) keep their values. Computed in the angles' dtype (fp32)
    and cast back, as DINOv3 does."""
    sin, cos = rope
    n_prefix = t.shape[-2] - sin.shape[-2]
    if n_prefix < 0:
        raise RuntimeError(f"{sin.shape[-2]} RoPE positions for {t.shape[-2]} tokens")
    prefix, patches = t[..., :n_prefix, :], t[..., n_prefix:, :].to(sin.dtype)
    rotated = patches * cos + rotate_half(patches) * sin
    return torch.cat((prefix, rotated.to(t.dtype)), dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused (SDPA) path and an explicit path that returns weights.

    ``rope``, where given, is the (sin, cos) of the patch tokens' rotary position angles, applied
    to queries and keys of the patch tokens (DINOv3); without it the block is the plain ViT's.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ModelConfigError(f"The embedding dimension {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        #: use :func:`attention` (fused or blocked) when weights are not needed
        self.fused_attn = True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False, rope=None):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if return_attention or not self.fused_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            attn = None
            out = attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, attn) if return_attention else out

    def cls_attention(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """The CLS query's post-softmax attention over all tokens, (B, heads, N): O(N) memory.
        (The CLS token is never rotated by ``rope``; the keys of the patch tokens are.)"""
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        # project the CLS token to a query and all tokens to keys only (the values are not needed)
        q = F.linear(x[:, :1], w[:C], None if b is None else b[:C])
        k = F.linear(x, w[C : 2 * C], None if b is None else b[C : 2 * C])
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, rope)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn[:, :, 0]
