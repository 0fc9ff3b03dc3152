"""Vision Transformer backbone (Dosovitskiy et al. 2021) as DINO uses it.

The state-dict names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
...) are those of the released DINO weights and of timm, so either loads with ``strict=True``.
Attention runs through :func:`attention`: ``scaled_dot_product_attention`` in general, and on CPUs
in bfloat16 plain matrix products in cache-sized blocks, each row shifted by its maximum, which are
1.6-2x faster there than the fused CPU kernel and as accurate. The attention weights themselves are only formed when asked for
(``get_last_selfattention``); the CLS row alone (``get_cls_attention``) costs O(N), not O(N^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DinokitError, ModelConfigError
from .init import check_int, trunc_normal_init


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (Huang et al. 2016): drop the residual branch, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    return x * random_tensor / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#: scores held at once by the blocked CPU path (elements): a few MB, so a block stays in cache
_BLOCK_SCORES = 1 << 22
#: with gradients the scores of a whole call are kept for the backward pass; above this many
#: (elements, per call) the fused kernel, which keeps none, is used instead
_GRAD_SCORES = 1 << 27


def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = _BLOCK_SCORES) -> torch.Tensor:
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
            scores = _shifted_scores(q[b : b + heads, r : r + rows], kt[b : b + heads])
            torch.bmm(scores.softmax(dim=-1), v[b : b + heads], out=out[b : b + heads, r : r + rows])
    return out.reshape(*lead, N, v.shape[-1])


def _shifted_scores(q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
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
    (:func:`_shifted_scores`), which keeps the results as close to fp32 as the fused kernel's.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return _blocked_attention(q, k, v)
        if q.numel() // q.shape[-1] * k.shape[-2] <= _GRAD_SCORES:
            *lead, N, d = q.shape
            qs = (q * d**-0.5).reshape(-1, N, d)
            kt = k.reshape(-1, k.shape[-2], d).transpose(1, 2)
            attn = _shifted_scores(qs, kt).softmax(dim=-1)
            return (attn @ v.reshape(-1, *v.shape[-2:])).reshape(*lead, N, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused (SDPA) path and an explicit path that returns weights."""

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

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if return_attention or not self.fused_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            attn = None
            out = attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, attn) if return_attention else out

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS query's post-softmax attention over all tokens, (B, heads, N): O(N) memory."""
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        # project the CLS token to a query and all tokens to keys only (the values are not needed)
        q = F.linear(x[:, :1], w[:C], None if b is None else b[:C])
        k = F.linear(x, w[C : 2 * C], None if b is None else b[C : 2 * C])
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn[:, :, 0]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
            return attn
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT backbone returning the CLS token after the final LayerNorm.

    Args:
        img_size: the size the position-embedding table is made for (224, as in the reference:
            a model trained on small crops keeps the 224 grid, so checkpoints load everywhere).
        patch_size: side of a square patch in pixels (8 and 16 in the paper; any positive size).
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's shape.
        drop_path_rate: stochastic depth, linearly spaced from 0 over the blocks.
        pos_embed_resize: ``"scale"`` (default) resizes the position table as the reference does
            (bicubic with ``scale_factor=(h0 + 0.1) / sqrt(N)``); ``"size"`` resizes to the exact
            grid (timm's way; about 1e-3 apart in the features).

    An argument it does not take is a TypeError; a size below its minimum, a drop-path rate outside
    [0, 1) or an unknown resize mode is a :class:`~dinokit.errors.ModelConfigError` (a ValueError).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed_resize: str = "scale",
    ):
        super().__init__()
        patch_size = check_int("patch_size", patch_size, 1)
        img_size = check_int("img_size", img_size, patch_size)
        in_chans = check_int("in_chans", in_chans, 1)
        embed_dim = check_int("embed_dim", embed_dim, 1)
        depth = check_int("depth", depth, 1)
        num_heads = check_int("num_heads", num_heads, 1)
        if not mlp_ratio > 0:
            raise ModelConfigError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ModelConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if pos_embed_resize not in ("scale", "size"):
            raise ModelConfigError(f"pos_embed_resize must be 'scale' or 'size', got {pos_embed_resize!r}.")
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.pos_embed_resize = pos_embed_resize
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        # linearly spaced 0..drop_path_rate (plain Python, so a model can be built on the meta device)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i]) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self._pos_cache: dict = {}

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(trunc_normal_init)

    # -- position embedding -------------------------------------------------------------------
    def interpolate_pos_encoding(self, h0: int, w0: int) -> torch.Tensor:
        """The position table for a grid of h0 x w0 patches, (1, 1 + h0*w0, D).

        At the table's own square grid it is returned unchanged; otherwise its patch part is resized
        bicubically, by default with the reference's ``scale_factor=(h0 + 0.1) / sqrt(N)``.
        Resized tables are cached per grid (the cache is dropped whenever the table changes).
        """
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if side * side != n:
            raise DinokitError(f"The position embedding has {n} patch entries, which is not a square grid.")
        if h0 == side and w0 == side:
            return pos
        key = (h0, w0, pos.data_ptr(), pos._version, pos.dtype, pos.device, self.pos_embed_resize)
        if not torch.is_grad_enabled() and key in self._pos_cache:
            return self._pos_cache[key][1]
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if self.pos_embed_resize == "scale":
            patch = F.interpolate(
                grid.float(),
                scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side),
                mode="bicubic",
                align_corners=False,
            )
        else:
            patch = F.interpolate(grid.float(), size=(h0, w0), mode="bicubic", align_corners=False)
        if patch.shape[-2:] != (h0, w0):  # pragma: no cover - guarded by the +0.1
            raise RuntimeError(f"position grid resized to {tuple(patch.shape[-2:])}, wanted {(h0, w0)}")
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        out = torch.cat((pos[:, :1], patch), dim=1)
        if not torch.is_grad_enabled():
            if len(self._pos_cache) > 16:
                self._pos_cache.clear()
            # Holding the table's storage keeps its address from being reused by another tensor
            # while the entry lives, so (data_ptr, version) identifies the table safely.
            self._pos_cache[key] = (pos.detach(), out)
        return out

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise DinokitError(f"Expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}.")
        B, _, H, W = x.shape
        p = self.patch_size
        if H < p or W < p:
            raise DinokitError(f"The input is {H}x{W} pixels, smaller than one {p}x{p} patch.")
        h0, w0 = H // p, W // p
        weight = self.patch_embed.proj.weight
        if x.dtype != weight.dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # a model cast to bf16 for inference takes fp32 images as they come
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(h0, w0)

    # -- public API (the reference's method names) ---------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm, (B, 1 + N, D)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final LayerNorm, (B, D)."""
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The outputs of the last ``n`` blocks, each through the final LayerNorm, (B, 1 + N, D)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Post-softmax attention of the last block, (B, heads, 1 + N, 1 + N)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS row of the last block's attention over the patch tokens, (B, heads, N).

        Equals ``get_last_selfattention(x)[:, :, 0, 1:]`` without building the N x N matrix.
        """
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.cls_attention(last.norm1(x))[:, :, 1:]

    def set_fused_attention(self, enabled: bool) -> None:
        for blk in self.blocks:
            blk.attn.fused_attn = enabled

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


VIT_SHAPES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT of a named shape (``VIT_SHAPES``); ``embed_dim``, ``depth`` and ``num_heads`` in
    ``kwargs`` override the shape (small test models), the rest go to :class:`VisionTransformer`."""
    if arch not in VIT_SHAPES:
        raise ModelConfigError(f"Unknown ViT {arch!r}; choose one of {', '.join(VIT_SHAPES)}.")
    shape = dict(VIT_SHAPES[arch])
    shape.update({k: v for k, v in kwargs.items() if k in ("embed_dim", "depth", "num_heads")})
    rest = {k: v for k, v in kwargs.items() if k not in ("embed_dim", "depth", "num_heads")}
    return VisionTransformer(patch_size=patch_size, mlp_ratio=4, qkv_bias=True, **shape, **rest)
