"""Architecture names and presets -> models. Every command gets its backbone from here."""

from __future__ import annotations

import math

from torch import nn

from ..errors import DinokitError
from .resnet import resnet50_backbone
from .vit import VIT_SHAPES, VisionTransformer, vit

ARCHS = ("vit_tiny", "vit_small", "vit_base", "resnet50")

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
}


def canonical_arch(arch: str) -> str:
    a = arch.strip().lower().replace("-", "_")
    a = ARCH_ALIASES.get(a, a)
    if a not in ARCHS:
        raise DinokitError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    return a


def arch_for_embed_dim(dim: int) -> str | None:
    for name, shape in VIT_SHAPES.items():
        if shape["embed_dim"] == dim:
            return name
    return None


def build_backbone(arch: str = "vit_small", patch_size: int = 16, **kwargs) -> nn.Module:
    """A randomly initialised backbone.

    ``arch`` is vit_tiny, vit_small, vit_base or resnet50; ``patch_size`` applies to ViTs (any
    positive size; 8 and 16 in the paper). Extra keyword arguments go to the ViT constructor
    (``drop_path_rate``, ``pos_embed_resize``, ``img_size``).
    """
    arch = canonical_arch(arch)
    if arch == "resnet50":
        return resnet50_backbone(**kwargs)
    if patch_size is None:
        patch_size = 16
    if int(patch_size) < 1:
        raise DinokitError(f"The patch size must be a positive integer, got {patch_size}.")
    model = vit(arch, patch_size=int(patch_size), **kwargs)
    model.arch = arch
    return model


def is_vit(model: nn.Module) -> bool:
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
    n = backbone.pos_embed.shape[1] - 1
    side = int(round(math.sqrt(n)))
    return {
        "arch": backbone_arch(backbone),
        "patch_size": int(backbone.patch_size),
        "kwargs": {
            "embed_dim": int(backbone.embed_dim),
            "depth": len(backbone.blocks),
            "num_heads": int(backbone.num_heads),
            "img_size": side * int(backbone.patch_size),
            "drop_path_rate": float(drop_path),
        },
    }
