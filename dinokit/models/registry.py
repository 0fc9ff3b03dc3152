"""Architecture names and presets -> models. Every command gets its backbone from here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import DinokitError
from .init import check_int
from .resnet import resnet50_backbone
from .vit import DINO_VARIANTS, VIT_SHAPES, Block, Mlp, SwiGLU, VisionTransformer, variant_generation, vit

if TYPE_CHECKING:
    from typing_extensions import TypeIs

ARCHS = ("vit_tiny", "vit_small", "vit_base", "resnet50", *DINO_VARIANTS)

#: the feature width of the backbones that are not ViTs (a ViT's is in VIT_SHAPES)
FEATURE_DIMS = {"resnet50": 2048}

#: aliases users type (timm / DeiT names)
ARCH_ALIASES = {
    "vit_t": "vit_tiny",
    "vit_s": "vit_small",
    "vit_b": "vit_base",
    "deit_tiny": "vit_tiny",
    "deit_small": "vit_small",
    "deit_base": "vit_base",
    "resnet_50": "resnet50",
    "rn50": "resnet50",
    # timm's names of the DINOv2 / DINOv3 models
    **{f"vit_{size}_patch14_dinov2": f"dinov2_vit{s}14" for size, s in
       (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))},
    **{f"vit_{size}_patch14_reg4_dinov2": f"dinov2_vit{s}14_reg" for size, s in
       (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))},
    **{f"vit_{size}_patch16_dinov3{qkvb}": f"dinov3_vit{s}16{plus}" for size, s, plus in
       (("small", "s", ""), ("small_plus", "s", "plus"), ("base", "b", ""), ("large", "l", ""),
        ("huge_plus", "h", "plus")) for qkvb in ("", "_qkvb")},
}  # fmt: skip


def canonical_arch(arch: str) -> str:
    a = arch.strip().lower().replace("-", "_")
    a = ARCH_ALIASES.get(a, a)
    if a not in ARCHS:
        raise DinokitError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    return a


def arch_generation(arch: str) -> int:
    """Which DINO an architecture name belongs to: 1 (DINO's ViTs and the ResNet-50), 2 or 3."""
    return variant_generation(canonical_arch(arch))


def arch_for_embed_dim(dim: int) -> str | None:
    for name, shape in VIT_SHAPES.items():
        if shape["embed_dim"] == dim:
            return name
    return None


def is_vit_arch(arch: str) -> bool:
    """Whether ``arch`` (a name or alias) builds a ViT: only ViTs take model options such as the
    training recipes' stochastic depth and position-table size."""
    return canonical_arch(arch) != "resnet50"


def build_backbone(arch: str = "vit_small", patch_size: int | None = None, **kwargs) -> nn.Module:
    """A randomly initialised backbone.

    ``arch`` is vit_tiny, vit_small, vit_base, resnet50, a DINOv2/DINOv3 hub name such as
    dinov2_vits14, dinov2_vits14_reg or dinov3_vits16 (or an alias such as timm's names).
    ``patch_size`` applies to ViTs: any integer of at least 1 (8 and 16 in the paper); None means
    16, or the variant's own (14 for DINOv2). Extra keyword arguments
    go to the ViT constructor (``drop_path_rate``, ``pos_embed_resize``, ``img_size``, and
    ``embed_dim``/``depth``/``num_heads`` for small test models); a name it does not take is a
    TypeError. The ResNet-50 takes none (see :func:`is_vit_arch`).
    """
    arch = canonical_arch(arch)
    if arch == "resnet50":
        if kwargs:
            raise TypeError(
                f"The ResNet-50 backbone takes no model options; got {', '.join(sorted(kwargs))}."
            )
        return resnet50_backbone()
    if patch_size is None and arch not in DINO_VARIANTS:
        patch_size = 16
    if patch_size is not None:
        patch_size = check_int("The patch size", patch_size, 1)
    model = vit(arch, patch_size=patch_size, **kwargs)
    model.arch = arch
    return model


def is_vit(model: nn.Module) -> TypeIs[VisionTransformer]:
    return isinstance(model, VisionTransformer)


def backbone_arch(model: nn.Module) -> str:
    if is_vit(model):
        return getattr(model, "arch", None) or arch_for_embed_dim(model.embed_dim) or "vit"
    return "resnet50"


def backbone_spec(backbone: nn.Module, drop_path: float) -> dict:
    """What rebuilds the backbone's shape with :func:`build_backbone`: arch, patch size and
    constructor arguments (the image size from the position embedding)."""
    if not is_vit(backbone):
        return {"arch": "resnet50", "patch_size": None, "kwargs": {}}
    if backbone.pos_embed is not None:
        side = int(round(math.sqrt(backbone.pos_embed.shape[1] - 1)))
        img_size = side * int(backbone.patch_size)
    else:
        img_size = int(backbone.img_size)
    spec: dict[str, Any] = {
        "arch": backbone_arch(backbone),
        "patch_size": int(backbone.patch_size),
        "kwargs": {
            "embed_dim": int(backbone.embed_dim),
            "depth": len(backbone.blocks),
            "num_heads": int(backbone.num_heads),
            "img_size": img_size,
            "drop_path_rate": float(drop_path),
        },
    }
    if spec["arch"] in DINO_VARIANTS:
        spec["kwargs"].update(variant_options(backbone))
    return spec


def variant_options(backbone: VisionTransformer) -> dict:
    """The constructor arguments that shape a DINOv2/v3 backbone beyond its arch name's table: the
    feed-forward kind and width, the qkv bias, the registers and LayerScale (tiny and timm-built
    variants)."""
    blk = backbone.blocks[0]
    assert isinstance(blk, Block)
    mlp = blk.mlp
    swiglu = isinstance(mlp, SwiGLU)
    if isinstance(mlp, SwiGLU):
        hidden = mlp.w3.in_features
    else:
        assert isinstance(mlp, Mlp)
        hidden = mlp.fc1.out_features
    options: dict[str, Any] = {
        "ffn": "swiglu" if swiglu else "mlp",
        "ffn_hidden_dim": int(hidden),
        "qkv_bias": blk.attn.qkv.bias is not None,
        "num_register_tokens": int(backbone.num_register_tokens),
    }
    if not hasattr(blk.ls1, "gamma"):
        options["layerscale"] = None
    return options


def arch_catalogue() -> list[dict]:
    """Every architecture :func:`build_backbone` makes: its kind, width, depth, heads and aliases."""
    out = []
    for arch in ARCHS:
        aliases = [a for a, target in ARCH_ALIASES.items() if target == arch]
        shape = arch_shape(arch)
        kind = "ViT" if is_vit_arch(arch) else "ResNet" if arch.startswith("resnet") else "other"
        out.append(
            {
                "arch": arch,
                "kind": kind,
                "embed_dim": shape.get("embed_dim", FEATURE_DIMS.get(arch)),
                "depth": shape.get("depth"),
                "num_heads": shape.get("num_heads"),
                "aliases": aliases,
            }
        )
    return out


def arch_shape(arch: str) -> dict:
    """The width, depth and heads of a named ViT from its shape table (empty for other backbones)."""
    shape = VIT_SHAPES.get(arch) or DINO_VARIANTS.get(arch, {})
    return {k: shape[k] for k in ("embed_dim", "depth", "num_heads") if k in shape}
