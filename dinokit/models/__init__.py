"""Backbones (ViT, ResNet-50), the DINO head, the linear classifier and the fine-tuning wrapper."""

from .head import DINOHead, FinetuneModel, LinearClassifier, MultiCropWrapper
from .registry import ARCHS, build_backbone, canonical_arch
from .vit import VisionTransformer

__all__ = [
    "ARCHS",
    "DINOHead",
    "FinetuneModel",
    "LinearClassifier",
    "MultiCropWrapper",
    "VisionTransformer",
    "build_backbone",
    "canonical_arch",
]
