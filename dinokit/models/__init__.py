"""Backbones (ViT, ResNet-50), the DINO head, the linear classifier, the fine-tuning wrapper and the
cast for bf16 inference."""

from .head import DINOHead, FinetuneModel, LinearClassifier, MultiCropWrapper
from .inference import cast_for_inference, inference_model
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
    "cast_for_inference",
    "inference_model",
]
