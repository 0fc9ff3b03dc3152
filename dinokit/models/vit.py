"""Vision Transformer backbone (Dosovitskiy et al. 2021) as DINO uses it.

The state-dict names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
...) are those of the released DINO weights and of timm, so either loads with ``strict=True``.
Attention lives in :mod:`dinokit.models.attention` (fused, CLS-row and bfloat16 CPU paths).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DinokitError, ModelConfigError
from .attention import Attention
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
    def interpolate_pos_encoding(self, h0: int, w0: int, square_input: bool = True) -> torch.Tensor:
        """The position table for a grid of h0 x w0 patches, (1, 1 + h0*w0, D).

        Its patch part is resized bicubically, by default with the reference's
        ``scale_factor=(h0 + 0.1) / sqrt(N)``. The table is returned unchanged at its own square
        grid; under the default (``pos_embed_resize="scale"``) only when the input image is square
        too (``square_input``), as the reference decides: a 224x230 image still has 14x14 patches
        at patch 16, yet the reference resizes the table for it (by 14.1/14), so dinokit does.
        Resized tables are cached per grid (the cache is dropped whenever the table changes).
        """
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if side * side != n:
            raise DinokitError(f"The position embedding has {n} patch entries, which is not a square grid.")
        if h0 == side and w0 == side and (square_input or self.pos_embed_resize == "size"):
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
        return tokens + self.interpolate_pos_encoding(h0, w0, square_input=H == W)

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
