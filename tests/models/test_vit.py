"""The ViT backbone, held against timm and against formulations written out here: the arch table and
the spec's blocks, position-embedding resizing (bicubic by hand), intermediate layers, constructor checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dinokit
from dinokit.errors import DinokitError
from dinokit.models import DINOHead, LinearClassifier, VisionTransformer
from tests.helpers import tiny_vit


# -- timm interoperability ---------------------------------------------------------------------
def test_timm_vit_small_state_dicts_load_both_ways_with_the_same_features():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ours = dinokit.build_backbone("vit_small", 16).eval()
    torch.manual_seed(1)
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    ours_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs_sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        a, b = ours(x), theirs(x)  # each with its own random weights
        assert (a - b).abs().max() > 1e-2
        ours.load_state_dict(theirs_sd, strict=True)
        theirs.load_state_dict(ours_sd, strict=True)
        ours_with_timm_weights, timm_with_our_weights = ours(x), theirs(x)
    assert a.shape == b.shape == (1, 384)
    assert torch.allclose(ours_with_timm_weights, b, atol=1e-4), (ours_with_timm_weights - b).abs().max()
    assert torch.allclose(timm_with_our_weights, a, atol=1e-4), (timm_with_our_weights - a).abs().max()


# -- shape and initialisation of the spec --------------------------------------------------------
@pytest.mark.parametrize(
    "arch,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)]
)
def test_arch_table(arch, dim, heads):
    m = dinokit.build_backbone(arch, 16, depth=1)
    assert m.embed_dim == dim and m.blocks[0].attn.num_heads == heads
    assert m.pos_embed.shape == (1, 14 * 14 + 1, dim)
    assert dinokit.build_backbone(arch, 8, depth=1).pos_embed.shape == (1, 28 * 28 + 1, dim)


def test_full_depth_parameter_counts():
    with torch.device("meta"):  # shapes only; no memory, no initialisation cost
        n = sum(p.numel() for p in dinokit.build_backbone("vit_small", 16).parameters()) / 1e6
    assert 21 < n < 22.5


def test_block_details_follow_the_spec():
    m = tiny_vit(depth=3, drop_path_rate=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])
    blk = m.blocks[0]
    assert blk.norm1.eps == 1e-6 and m.norm.eps == 1e-6
    assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
    assert blk.mlp.fc1.out_features == 4 * m.embed_dim
    assert blk.attn.qkv.bias is not None
    assert torch.all(blk.attn.qkv.bias == 0) and torch.all(m.norm.weight == 1)
    assert 0.015 < m.pos_embed.std().item() < 0.025


def test_unknown_arch_and_bad_patch_size_are_user_errors():
    with pytest.raises(DinokitError, match="Unknown architecture"):
        dinokit.build_backbone("vit_huge")
    with pytest.raises(DinokitError, match="patch size"):
        dinokit.build_backbone("vit_tiny", 0)
    assert dinokit.build_backbone("deit_small", 16, depth=1).embed_dim == 384


def test_input_smaller_than_a_patch_is_a_user_error():
    with pytest.raises(DinokitError, match="smaller than one 16x16 patch"):
        tiny_vit()(torch.randn(1, 3, 8, 40))


# -- position embedding resize -------------------------------------------------------------------
def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """Keys' cubic convolution (a=-0.75), half-pixel centres, source = (i + 0.5) / scale - 0.5,
    border samples repeated: the resampling written out one output position at a time."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _cubic(k - frac)
    return m


def _resized_table(model: VisionTransformer, h0: int, w0: int, by_size: bool) -> torch.Tensor:
    pos = model.pos_embed.detach().double().numpy()[0]
    side = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(side, side, -1)
    sh = h0 / side if by_size else (h0 + 0.1) / side
    sw = w0 / side if by_size else (w0 + 0.1) / side
    rows, cols = _bicubic_matrix(side, h0, sh), _bicubic_matrix(side, w0, sw)
    out = np.einsum("ij,jkd,lk->ild", rows, grid, cols).reshape(h0 * w0, -1)
    return torch.from_numpy(np.concatenate([pos[:1], out])).float()[None]


@pytest.mark.parametrize("mode", ["scale", "size"])
def test_position_embedding_at_480x640_matches_a_hand_written_bicubic(mode):
    m = tiny_vit(pos_embed_resize=mode)
    with torch.no_grad():
        table = m.interpolate_pos_encoding(30, 40)
    assert table.shape == (1, 1 + 30 * 40, 192)
    expected = _resized_table(m, 30, 40, by_size=(mode == "size"))
    assert torch.allclose(table, expected, atol=1e-5), (table - expected).abs().max()


def test_the_two_resize_modes_differ_slightly_and_the_reference_one_is_the_default():
    a, b = tiny_vit(), tiny_vit(pos_embed_resize="size")
    assert a.pos_embed_resize == "scale"
    with torch.no_grad():
        d = (a.interpolate_pos_encoding(30, 40) - b.interpolate_pos_encoding(30, 40)).abs().max()
    assert 1e-5 < d < 0.05
    with pytest.raises(ValueError):
        tiny_vit(pos_embed_resize="nearest")


def test_forward_at_480x640_uses_the_resized_table():
    m = tiny_vit()
    x = torch.randn(1, 3, 480, 640)
    with torch.no_grad():
        tokens = m.patch_embed(x)
        tokens = torch.cat([m.cls_token, tokens], 1) + _resized_table(m, 30, 40, by_size=False)
        for blk in m.blocks:
            tokens = blk(tokens)
        expected = m.norm(tokens)
        got = m.forward_features(x)
    assert got.shape == (1, 1 + 1200, 192)
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_non_square_input_with_the_table_s_own_grid_resizes_the_table_as_the_reference_does():
    # 224x230 at patch 16 is still a 14x14 grid, but the reference resizes whenever the image is not
    # square: by scale (14 + 0.1) / 14 in both directions, which moves the table by about 1e-2
    m = tiny_vit()
    x = torch.randn(1, 3, 224, 230)
    expected_table = _resized_table(m, 14, 14, by_size=False)
    assert (expected_table - m.pos_embed.detach()).abs().max() > 1e-3  # a real difference
    with torch.no_grad():
        tokens = torch.cat([m.cls_token, m.patch_embed(x)], 1) + expected_table
        for blk in m.blocks:
            tokens = blk(tokens)
        expected = m.norm(tokens)
        got = m.forward_features(x)
        assert torch.allclose(
            m.interpolate_pos_encoding(14, 14, square_input=False), expected_table, atol=1e-5
        )
    assert torch.allclose(got, expected, atol=1e-4)
    # a square image of the same grid keeps the table itself; the size rule never resizes at its grid
    assert m.interpolate_pos_encoding(14, 14, square_input=True) is m.pos_embed
    size_model = tiny_vit(pos_embed_resize="size")
    assert size_model.interpolate_pos_encoding(14, 14, square_input=False) is size_model.pos_embed


def test_the_224_grid_is_used_unchanged_and_resized_tables_are_cached_until_the_weights_change():
    m = tiny_vit()
    assert m.interpolate_pos_encoding(14, 14) is m.pos_embed
    with torch.no_grad():
        first = m.interpolate_pos_encoding(4, 6)
        assert m.interpolate_pos_encoding(4, 6) is first
        m.pos_embed.add_(1.0)
        second = m.interpolate_pos_encoding(4, 6)
    assert second is not first
    assert torch.allclose(second[:, 1:], first[:, 1:] + 1.0, atol=1e-5)
    # with gradients on, the table is recomputed (and differentiable) every time
    m.train()
    m(torch.randn(1, 3, 64, 96)).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


# -- intermediate layers -----------------------------------------------------------------------------
def test_get_intermediate_layers_are_the_last_n_blocks_through_the_final_norm():
    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        t = m.prepare_tokens(x)
        outs = []
        for blk in m.blocks:
            t = blk(t)
            outs.append(m.norm(t))
        got = m.get_intermediate_layers(x, n=2)
        assert len(got) == 2
        for g, e in zip(got, outs[-2:]):
            assert g.shape == (2, 1 + 6, 192)
            assert torch.allclose(g, e, atol=1e-6)
        assert torch.allclose(m.get_intermediate_layers(x)[0], m.forward_features(x), atol=1e-6)
        assert torch.allclose(m(x), m.forward_features(x)[:, 0])


# -- constructor arguments -----------------------------------------------------------------------
def test_unknown_model_options_are_type_errors_not_swallowed():
    with pytest.raises(TypeError, match="dpeth"):
        dinokit.build_backbone("vit_tiny", 16, dpeth=1)
    with pytest.raises(TypeError, match="takes no model options; got depth"):
        dinokit.build_backbone("resnet50", depth=1)
    with pytest.raises(TypeError):
        dinokit.models.resnet.resnet50_backbone(drop_path_rate=0.1)
    # the training recipes pass their ViT options to ViTs only: the ResNet-50 takes none at all
    with pytest.raises(TypeError, match="takes no model options; got drop_path_rate, img_size"):
        dinokit.build_backbone("resnet50", drop_path_rate=0.1, img_size=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0), "depth must be at least 1, got 0"),
        (dict(num_heads=0), "num_heads must be at least 1"),
        (dict(img_size=8), "--patch-size 16 is larger than the model's 8-pixel input"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
        (dict(embed_dim=100, num_heads=3), "not divisible by 3 heads"),
    ],
)
def test_bad_vit_option_values_are_value_errors_with_a_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        dinokit.build_backbone("vit_tiny", 16, **{"depth": 1, **kwargs})
    assert isinstance(info.value, DinokitError)  # the CLI reports it as one sentence


def test_patch_size_zero_is_refused_and_none_means_16():
    for bad in (0, -8):
        with pytest.raises(ValueError, match="patch size must be at least 1"):
            dinokit.build_backbone("vit_tiny", bad, depth=1)
        with pytest.raises(ValueError, match="patch size"):
            dinokit.load_backbone("random", arch="vit_tiny", patch_size=bad, depth=1)
    with pytest.raises(TypeError, match="patch size must be an integer"):
        dinokit.build_backbone("vit_tiny", 16.0, depth=1)
    assert dinokit.build_backbone("vit_tiny", None, depth=1).patch_size == 16
    assert dinokit.load_backbone("random", arch="vit_tiny", depth=1).patch_size == 16


def test_head_and_classifier_sizes_are_checked():
    with pytest.raises(ValueError, match="nlayers must be at least 1, got 0"):
        DINOHead(32, out_dim=10, nlayers=0)
    with pytest.raises(TypeError, match="out_dim must be an integer"):
        DINOHead(32, out_dim=10.0)
    with pytest.raises(ValueError, match="num_labels must be at least 1"):
        LinearClassifier(32, num_labels=0)
    with pytest.raises(TypeError):
        DINOHead(32, out_dim=10, n_layers=2)


def test_head_and_vit_share_one_weight_init():
    """A Linear in the head and in a ViT block draw the same numbers from the same seed."""
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=4, nlayers=1, bottleneck_dim=576)
    torch.manual_seed(0)
    qkv = nn.Linear(192, 576)
    dinokit.models.init.trunc_normal_init(qkv)
    assert torch.equal(head.mlp.weight, qkv.weight) and torch.all(head.mlp.bias == 0)
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.bias.fill_(1.0)
    dinokit.models.init.trunc_normal_init(norm)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_an_input_of_more_tokens_than_the_limit_is_refused_before_the_blocks():
    from dinokit.errors import ModelConfigError
    from dinokit.models.vit import MAX_TOKENS

    model = dinokit.build_backbone("vit_tiny", 16, depth=1)
    assert model.max_tokens == MAX_TOKENS == 100_000
    model.max_tokens = 15
    with pytest.raises(
        ModelConfigError, match="An input of 64x64 pixels is 16 tokens of 16x16 pixels, more than"
    ):
        model(torch.zeros(1, 3, 64, 64))
    assert model(torch.zeros(1, 3, 48, 80)).shape == (1, 192)  # 15 tokens: within
