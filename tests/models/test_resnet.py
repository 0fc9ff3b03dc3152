"""The ResNet-50 backbone: a 2048-d average pool and the released checkpoint keys."""

from __future__ import annotations

import torch
from torch import nn

import dinokit


# -- ResNet-50 -----------------------------------------------------------------------------------------
def test_resnet50_backbone_gives_2048_d_average_pool():
    torch.manual_seed(0)
    m = dinokit.build_backbone("resnet50").eval()
    assert isinstance(m.fc, nn.Identity) and m.embed_dim == 2048
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
        m2 = nn.Sequential(*list(m.children())[:-2])
        expected = m2(x).mean(dim=(2, 3))
    assert out.shape == (2, 2048)
    assert torch.allclose(out, expected, atol=1e-5)
    assert 23 < sum(p.numel() for p in m.parameters()) / 1e6 < 24
