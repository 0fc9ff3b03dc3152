"""DINOv2's linear protocol on DINOv2/DINOv3 backbones: the CLS tokens of the last 1 or 4 blocks,
optionally followed (not interleaved) by the average patch token, registers never among the patches."""

from __future__ import annotations

import pytest
import torch

import dinokit
from dinokit.eval.features import cls_feature_fn
from dinokit.eval.linear import LinearConfig, _resolve_options, default_feature_options


def _block_outputs(model, x):
    """Every block's raw output, caught by hooks (independent of get_intermediate_layers)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    with torch.no_grad():
        model.forward_all_tokens(x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize(
    "arch,n_prefix", [("dinov2_vits14_reg", 5), ("dinov3_vits16", 5), ("dinov2_vits14", 1)]
)
@pytest.mark.parametrize("n,avg", [(1, True), (4, True), (4, False)])
def test_dinov2_linear_input_layout(arch, n_prefix, n, avg):
    torch.manual_seed(0)
    m = dinokit.build_backbone(arch, embed_dim=64, depth=4, num_heads=1).eval()
    x = torch.randn(2, 3, 4 * m.patch_size, 3 * m.patch_size)
    normed = [m.norm(o) for o in _block_outputs(m, x)[-n:]]
    expected = [o[:, 0] for o in normed]
    if avg:
        expected.append(normed[-1][:, n_prefix:].mean(dim=1))  # 12 patch tokens, no registers
    with torch.no_grad():
        got = cls_feature_fn(n, avg)(m, x)
    assert got.shape == (2, 64 * (n + avg))
    assert torch.allclose(got, torch.cat(expected, dim=-1), atol=1e-5)


def test_dinov2_defaults_to_the_released_four_layer_heads_input_and_v3_to_its_own():
    assert default_feature_options("dinov2_vits14") == (4, True)
    assert default_feature_options("dinov3_vitb16") == (
        1,
        True,
    )  # DINOv3's linear protocol: last block + mean
    m = dinokit.build_backbone("dinov2_vits14_reg", embed_dim=64, depth=2, num_heads=1)
    assert _resolve_options(LinearConfig(output="x"), m) == (2, True)  # a 2-block model has 2 to give
    assert _resolve_options(LinearConfig(output="x", n_last_blocks=1, avgpool_patch_tokens=False), m) == (
        1,
        False,
    )
