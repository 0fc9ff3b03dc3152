"""torchvision's ResNet-50 as a DINO backbone: the 2048-d average pool, ``fc`` replaced by Identity."""

from __future__ import annotations

from torch import nn


def resnet50_backbone() -> nn.Module:
    """The ResNet-50 takes no options: its shape is fixed, it has no patch size or stochastic depth."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()
    model.num_features = model.embed_dim = 2048
    model.patch_size = None
    return model
