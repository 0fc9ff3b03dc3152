"""torchvision's ResNet-50 as a DINO backbone: the 2048-d average pool, ``fc`` replaced by Identity."""

from __future__ import annotations

from torch import nn


def resnet50_backbone(**unused) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()
    model.num_features = model.embed_dim = 2048
    model.patch_size = None
    return model
