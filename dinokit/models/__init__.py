"""Backbones (ViT, ResNet-50), the DINO head and the linear classifier."""

from .head import DINOHead, LinearClassifier, MultiCropWrapper
from .registry import ARCHS, build_backbone, canonical_arch
from .vit import VisionTransformer

__all__ = [
    "ARCHS",
    "DINOHead",
    "LinearClassifier",
    "MultiCropWrapper",
    "VisionTransformer",
    "build_backbone",
    "canonical_arch",
]
