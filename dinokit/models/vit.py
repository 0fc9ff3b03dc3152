"""Vision Transformer backbone (Dosovitskiy et al. 2021) as the three DINO generations use it.

One ViT with the options the generations need: DINO (v1) is the plain ViT; DINOv2 adds LayerScale,
optional register tokens, patch 14 and (ViT-g) a SwiGLU feed-forward; DINOv3 replaces the learned
position table by rotary embeddings (RoPE) over the patch grid and keeps four storage tokens (held as
register tokens here). The state-dict names (``cls_token``, ``pos_embed``, ``register_tokens``,
``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.ls1.gamma``, ``rope_embed.periods``,
...) are those of the released DINO / DINOv2 weights and of timm's v1/v2 ViTs; other layouts are
mapped onto them in :mod:`dinokit.checkpoints`. Attention lives in :mod:`dinokit.models.attention`
(fused, CLS-row and bfloat16 CPU paths).

Register and storage tokens sit between the CLS token and the patch tokens inside the network and
never leave it: :meth:`VisionTransformer.forward_features` and everything built on it return the
CLS token and the patch tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): w3(silu(a) * b) with (a, b) the two halves of w12(x)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """The SwiGLU width DINOv2 and DINOv3 use for an MLP of ``dim * mlp_ratio``: two thirds of it,
    rounded up to a multiple of 8 (4096 for ViT-g/14, 1536 for ViT-S+/16)."""
    d = int(int(dim * mlp_ratio) * 2 / 3)
    return d + (-d % 8)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch (Touvron et al. 2021), ``gamma`` as DINOv2/v3 name it."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); the
    LayerScales are identities unless ``layerscale`` gives their initial value."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        layerscale: float | None = None,
        ffn: str = "mlp",
        ffn_hidden_dim: int | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp: nn.Module
        if ffn == "swiglu":
            self.mlp = SwiGLU(dim, ffn_hidden_dim or swiglu_hidden(dim, mlp_ratio))
        else:
            self.mlp = Mlp(dim, ffn_hidden_dim or int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False, rope=None):
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True, rope=rope)
            return attn
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope=rope)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


class RopeEmbedding(nn.Module):
    """DINOv3's rotary position embedding: no parameters, a period per quarter of a head's channels.

    Patch centres on an h x w grid are placed in [-1, 1] along each axis separately (so a grid of
    any size or aspect spans the same range: nothing is interpolated), and rotated by
    ``2 pi * coord / period`` with ``periods = base ** (4 i / head_dim)``. The periods are a buffer
    (``rope_embed.periods``, part of the released files) and stay float32 when the model is cast.
    """

    periods: torch.Tensor

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ModelConfigError(f"RoPE needs a head dimension divisible by 4, got {head_dim}.")
        exponent = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", base**exponent, persistent=True)

    def _apply(self, fn, recurse=True):
        periods = self.periods
        super()._apply(fn, recurse)
        # angles of up to 2 pi * 50 need float32; a cast to bf16 would move them by whole radians
        self._buffers["periods"] = periods.to(self.periods.device, torch.float32)
        return self

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (h * w, head_dim), float32, for the patches in row-major order."""
        periods = self.periods
        ys = torch.arange(0.5, h, device=periods.device, dtype=torch.float32) / h
        xs = torch.arange(0.5, w, device=periods.device, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (hw, 2, head_dim / 4)
        angles = angles.flatten(1, 2).tile(2)  # (hw, head_dim): [y, x, y, x] quarters
        return torch.sin(angles), torch.cos(angles)


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


#: the most patch tokens an image may become by default: attention's time and memory grow with the
#: square of the count (a 16x2000 photo resized to a shorter side of 480 is 112,500 tokens and runs for
#: minutes); 8K photos at full size (129,600 at patch 16) need a higher limit on purpose
MAX_TOKENS = 100_000


def too_many_tokens(
    what: str, tokens: int, patch_size: int, limit: int, advice: str = "", override: str = ""
) -> str:
    """The sentence for an input of more than ``limit`` tokens (``advice``: what would fit; ``override``:
    the option that raises the limit, where the command has one)."""
    raise_it = f", or raise the limit with {override}" if override else ""
    return (
        f"{what} is {tokens} tokens of {patch_size}x{patch_size} pixels, more than the limit of {limit} (the "
        f"attention's cost grows with the square of the count); {advice or 'use a smaller --image-size'}"
        f"{raise_it}."
    )


class VisionTransformer(nn.Module):
    """ViT backbone returning the CLS token after the final LayerNorm.

    Args:
        img_size: the size the position-embedding table is made for (224, as in the reference:
            a model trained on small crops keeps the 224 grid, so checkpoints load everywhere;
            518 for DINOv2's 37 x 37 table).
        patch_size: side of a square patch in pixels (8 and 16 in the paper; any positive size).
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's shape.
        drop_path_rate: stochastic depth, linearly spaced from 0 over the blocks.
        pos_embed_resize: ``"scale"`` (default) resizes the position table as the reference does
            (bicubic with ``scale_factor=(h0 + 0.1) / sqrt(N)``); ``"size"`` resizes to the exact
            grid (timm's way; about 1e-3 apart in the features).
        pos_embed_antialias: antialias the bicubic resize (DINOv2's register models do).
        num_register_tokens: extra learned tokens after the CLS token (DINOv2's registers, DINOv3's
            storage tokens), dropped from every output.
        layerscale: initial LayerScale value; None for none (v1).
        ffn: ``"mlp"`` (GELU MLP) or ``"swiglu"``; ``ffn_hidden_dim`` overrides its width.
        pos_encoding: ``"learned"`` (a position table, v1/v2) or ``"rope"`` (DINOv3, base ``rope_base``).
        norm_eps: the LayerNorms' epsilon (1e-6; DINOv3 1e-5).

    An argument it does not take is a TypeError; a size below its minimum, a drop-path rate outside
    [0, 1) or an unknown mode is a :class:`~dinokit.errors.ModelConfigError` (a ValueError).
    """

    #: the most patch tokens an input may have (:data:`MAX_TOKENS`): more is a ModelConfigError, at once;
    #: set it on a model for larger inputs (attn's --max-tokens does)
    max_tokens: int = MAX_TOKENS
    #: the registry name, set by :func:`dinokit.models.registry.build_backbone` (absent otherwise)
    arch: str

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
        pos_embed_antialias: bool = False,
        num_register_tokens: int = 0,
        layerscale: float | None = None,
        ffn: str = "mlp",
        ffn_hidden_dim: int | None = None,
        pos_encoding: str = "learned",
        rope_base: float = 100.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        patch_size = check_int("patch_size", patch_size, 1)
        img_size = check_int("img_size", img_size, 1)
        if patch_size > img_size:
            raise ModelConfigError(
                f"--patch-size {patch_size} is larger than the model's {img_size}-pixel input; choose a patch size "
                f"of at most {img_size} (the released models use 8, 14 or 16)."
            )
        in_chans = check_int("in_chans", in_chans, 1)
        embed_dim = check_int("embed_dim", embed_dim, 1)
        depth = check_int("depth", depth, 1)
        num_heads = check_int("num_heads", num_heads, 1)
        num_register_tokens = check_int("num_register_tokens", num_register_tokens, 0)
        if ffn_hidden_dim is not None:
            ffn_hidden_dim = check_int("ffn_hidden_dim", ffn_hidden_dim, 1)
        if not mlp_ratio > 0:
            raise ModelConfigError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ModelConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if pos_embed_resize not in ("scale", "size"):
            raise ModelConfigError(f"pos_embed_resize must be 'scale' or 'size', got {pos_embed_resize!r}.")
        if ffn not in ("mlp", "swiglu"):
            raise ModelConfigError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}.")
        if pos_encoding not in ("learned", "rope"):
            raise ModelConfigError(f"pos_encoding must be 'learned' or 'rope', got {pos_encoding!r}.")
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.pos_embed_resize = pos_embed_resize
        self.pos_embed_antialias = bool(pos_embed_antialias)
        self.num_register_tokens = num_register_tokens
        #: tokens before the patch tokens inside the network: the CLS token and the registers
        self.num_prefix_tokens = 1 + num_register_tokens
        self.pos_encoding = pos_encoding
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.img_size = img_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed: nn.Parameter | None
        if pos_encoding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        else:
            self.pos_embed = None
            self.rope_embed = RopeEmbedding(embed_dim // num_heads, rope_base)
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # linearly spaced 0..drop_path_rate (plain Python, so a model can be built on the meta device)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        norm_layer = (lambda d: nn.LayerNorm(d, eps=norm_eps)) if norm_eps != 1e-6 else None
        extra: dict[str, Any] = dict(
            layerscale=layerscale, ffn=ffn, ffn_hidden_dim=ffn_hidden_dim, norm_layer=norm_layer
        )
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], **extra)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Identity()
        self._pos_cache: dict = {}

        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if num_register_tokens:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
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
        if pos is None:
            raise DinokitError("This ViT encodes positions with RoPE; it has no position table to resize.")
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if side * side != n:
            raise DinokitError(f"The position embedding has {n} patch entries, which is not a square grid.")
        if h0 == side and w0 == side and (square_input or self.pos_embed_resize == "size"):
            return pos
        key = (h0, w0, pos.data_ptr(), pos._version, pos.dtype, pos.device, self.pos_embed_resize,
               self.pos_embed_antialias)  # fmt: skip
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
                antialias=self.pos_embed_antialias,
            )
        else:
            patch = F.interpolate(
                grid.float(),
                size=(h0, w0),
                mode="bicubic",
                align_corners=False,
                antialias=self.pos_embed_antialias,
            )
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
        """The tokens entering the first block, (B, 1 + R + N, D): CLS, R registers, N patches."""
        return self._embed(x)[0]

    def _embed(self, x: torch.Tensor):
        """The first block's input and the RoPE angles of the patch grid (None without RoPE)."""
        if x.ndim != 4:
            raise DinokitError(f"Expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}.")
        B, _, H, W = x.shape
        p = self.patch_size
        if H < p or W < p:
            raise DinokitError(f"The input is {H}x{W} pixels, smaller than one {p}x{p} patch.")
        h0, w0 = H // p, W // p
        if h0 * w0 > self.max_tokens:
            raise ModelConfigError(
                too_many_tokens(f"An input of {W}x{H} pixels", h0 * w0, p, self.max_tokens)
            )
        weight = self.patch_embed.proj.weight
        if x.dtype != weight.dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # a model cast to bf16 for inference takes fp32 images as they come
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        rope = None
        if self.pos_embed is not None:
            tokens = tokens + self.interpolate_pos_encoding(h0, w0, square_input=H == W)
        else:
            rope = self.rope_embed(h0, w0)
        if self.num_register_tokens:
            regs = self.register_tokens.expand(B, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens, rope

    def _without_registers(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_register_tokens:
            return x
        return torch.cat((x[:, :1], x[:, self.num_prefix_tokens :]), dim=1)

    # -- public API (the reference's method names) ---------------------------------------------
    def forward_all_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the final LayerNorm, registers included, (B, 1 + R + N, D)."""
        x, rope = self._embed(x)
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token and the patch tokens after the final LayerNorm, (B, 1 + N, D): register and
        storage tokens never leave the network."""
        return self._without_registers(self.forward_all_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final LayerNorm, (B, D)."""
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The outputs of the last ``n`` blocks, each through the final LayerNorm, (B, 1 + N, D)
        (CLS and patch tokens, as :meth:`forward_features`)."""
        x, rope = self._embed(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope=rope)
            if len(self.blocks) - i <= n:
                out.append(self._without_registers(self.norm(x)))
        return out

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Post-softmax attention of the last block, (B, heads, T, T) over all T = 1 + R + N tokens
        in the network's order (CLS, registers, patches)."""
        x, rope = self._embed(x)
        for blk in self.blocks[:-1]:
            x = blk(x, rope=rope)
        return self.blocks[-1](x, return_attention=True, rope=rope)

    def get_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS row of the last block's attention over the patch tokens, (B, heads, N).

        Equals ``get_last_selfattention(x)[:, :, 0, 1 + R:]`` without building the T x T matrix: the
        weights the CLS token gives the registers are left out (not renormalised away), so a head
        that looks at the registers has little mass on the patches.
        """
        x, rope = self._embed(x)
        for blk in self.blocks[:-1]:
            x = blk(x, rope=rope)
        last = self.blocks[-1]
        assert isinstance(last, Block)
        return last.attn.cls_attention(last.norm1(x), rope=rope)[:, :, self.num_prefix_tokens :]

    def set_fused_attention(self, enabled: bool) -> None:
        for blk in self.blocks:
            assert isinstance(blk, Block)
            blk.attn.fused_attn = enabled

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        return names | {"register_tokens"} if self.num_register_tokens else names


VIT_SHAPES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}

_V2 = dict(patch_size=14, img_size=518, layerscale=1.0)  # the dinov2 hub's model arguments
_V2_REG = dict(_V2, num_register_tokens=4, pos_embed_resize="size", pos_embed_antialias=True)
_V3 = dict(
    patch_size=16, img_size=224, layerscale=1e-5, num_register_tokens=4, pos_encoding="rope", norm_eps=1e-5
)
_S, _B, _L = dict(embed_dim=384, depth=12, num_heads=6), dict(embed_dim=768, depth=12, num_heads=12), \
    dict(embed_dim=1024, depth=24, num_heads=16)  # fmt: skip
_G = dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu")
_H = dict(embed_dim=1280, depth=32, num_heads=20)

#: DINOv2 and DINOv3 backbones by the names of their official torch.hub entry points: each one's
#: patch size and constructor arguments. The DINOv2 models resize their 37 x 37 position table as the
#: hub builds them: the plain ones by DINO's scale factor (offset 0.1, no antialiasing), the register
#: ones to the exact grid with antialiasing.
DINO_VARIANTS: dict[str, dict] = {
    "dinov2_vits14": {**_V2, **_S},
    "dinov2_vitb14": {**_V2, **_B},
    "dinov2_vitl14": {**_V2, **_L},
    "dinov2_vitg14": {**_V2, **_G},
    "dinov2_vits14_reg": {**_V2_REG, **_S},
    "dinov2_vitb14_reg": {**_V2_REG, **_B},
    "dinov2_vitl14_reg": {**_V2_REG, **_L},
    "dinov2_vitg14_reg": {**_V2_REG, **_G},
    "dinov3_vits16": {**_V3, **_S},
    "dinov3_vits16plus": {**_V3, **_S, "ffn": "swiglu", "mlp_ratio": 6.0},
    "dinov3_vitb16": {**_V3, **_B},
    "dinov3_vitl16": {**_V3, **_L},
    "dinov3_vitl16plus": {**_V3, **_L, "ffn": "swiglu", "mlp_ratio": 6.0},
    "dinov3_vith16plus": {**_V3, **_H, "ffn": "swiglu", "mlp_ratio": 6.0},
}

_SHAPE_KEYS = ("embed_dim", "depth", "num_heads")


def variant_generation(arch: str) -> int:
    """1 for DINO's ViTs, 2 or 3 for a DINOv2 / DINOv3 variant."""
    return 3 if arch.startswith("dinov3_") else 2 if arch.startswith("dinov2_") else 1


def vit(arch: str, patch_size: int | None = 16, **kwargs) -> VisionTransformer:
    """A ViT of a named shape (``VIT_SHAPES``) or DINOv2/v3 variant (``DINO_VARIANTS``); keyword
    arguments override the shape (small test models) and go to :class:`VisionTransformer`."""
    if arch in DINO_VARIANTS:
        spec = {**DINO_VARIANTS[arch], **kwargs}
        if patch_size is not None:
            spec["patch_size"] = patch_size
        return VisionTransformer(**spec)
    if arch not in VIT_SHAPES:
        raise ModelConfigError(
            f"Unknown ViT {arch!r}; choose one of {', '.join([*VIT_SHAPES, *DINO_VARIANTS])}."
        )
    shape: dict[str, Any] = dict(VIT_SHAPES[arch])
    shape.update({k: v for k, v in kwargs.items() if k in _SHAPE_KEYS})
    rest = {k: v for k, v in kwargs.items() if k not in _SHAPE_KEYS}
    return VisionTransformer(patch_size=16 if patch_size is None else patch_size, mlp_ratio=4, qkv_bias=True,
                             **shape, **rest)  # fmt: skip
