"""The DINO projection head, the linear classifier and the multi-crop wrapper, against the spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.models import DINOHead, LinearClassifier, MultiCropWrapper
from tests.helpers import tiny_vit


# -- DINO head -----------------------------------------------------------------------------------------
def test_dino_head_shapes_keys_and_math():
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=100, hidden_dim=64, bottleneck_dim=32).eval()
    keys = set(head.state_dict())
    assert keys == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    assert head.state_dict()["last_layer.weight_v"].shape == (100, 32)
    assert head.state_dict()["last_layer.weight_g"].shape == (100, 1)
    x = torch.randn(5, 192)
    with torch.no_grad():
        z = x
        for i in (0, 2, 4):
            z = F.linear(z, head.mlp[i].weight, head.mlp[i].bias)
            if i < 4:
                z = F.gelu(z)
        z = z / z.norm(dim=1, keepdim=True)
        v, g = head.last_layer.weight_v, head.last_layer.weight_g
        expected = z @ (g * v / v.norm(dim=1, keepdim=True)).T
        got = head(x)
    assert got.shape == (5, 100)
    assert torch.allclose(got, expected, atol=1e-5)


def test_dino_head_default_dimensions_and_batchnorm_key_shift():
    head = DINOHead(384, out_dim=16, use_bn=True)
    sd = head.state_dict()
    assert sd["mlp.0.weight"].shape == (2048, 384)
    assert "mlp.1.running_mean" in sd  # BatchNorm after the first Linear
    assert sd["mlp.3.weight"].shape == (2048, 2048)
    assert sd["mlp.6.weight"].shape == (256, 2048)


def test_norm_last_layer_freezes_the_gain_at_one():
    frozen = DINOHead(32, out_dim=10, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    free = DINOHead(32, out_dim=10, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    assert torch.all(frozen.last_layer.weight_g == 1) and torch.all(free.last_layer.weight_g == 1)
    assert not frozen.last_layer.weight_g.requires_grad and free.last_layer.weight_g.requires_grad
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert "last_layer.weight_v" in trainable and "last_layer.weight_g" not in trainable


def test_parametrization_api_names_map_on_load():
    torch.manual_seed(0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(8, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.uniform_(0.5, 2.0)
    head = DINOHead(32, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    for k, v in ref.state_dict().items():
        sd["last_layer." + k] = v
    assert "last_layer.parametrizations.weight.original0" in sd
    head.load_state_dict(sd, strict=True)
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(head.last_layer(z), ref(z), atol=1e-6)


def test_linear_classifier_and_multicrop_wrapper():
    torch.manual_seed(0)
    clf = LinearClassifier(192, num_labels=7)
    assert torch.all(clf.linear.bias == 0) and 0.005 < clf.linear.weight.std() < 0.015
    backbone = tiny_vit(depth=1)
    head = DINOHead(192, out_dim=12, hidden_dim=16, bottleneck_dim=8).eval()
    wrapper = MultiCropWrapper(backbone, head)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        out = wrapper(crops)
        expected = torch.cat([head(backbone(c)) for c in crops])
    assert out.shape == (6, 12)
    assert torch.allclose(out, expected, atol=1e-5)
