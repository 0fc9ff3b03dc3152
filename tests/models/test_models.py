"""The ViT / ResNet-50 backbones and the DINO head, held against timm and against formulations
written out here (bicubic resampling by hand, attention by einsum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dinokit
from dinokit.errors import DinokitError
from dinokit.models import DINOHead, LinearClassifier, MultiCropWrapper, VisionTransformer


def tiny(depth: int = 2, patch: int = 16, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return dinokit.build_backbone("vit_tiny", patch, depth=depth, **kw).eval()


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
@pytest.mark.parametrize("arch,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
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
    m = tiny(depth=3, drop_path_rate=0.1)
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
        tiny()(torch.randn(1, 3, 8, 40))


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
    m = tiny(pos_embed_resize=mode)
    with torch.no_grad():
        table = m.interpolate_pos_encoding(30, 40)
    assert table.shape == (1, 1 + 30 * 40, 192)
    expected = _resized_table(m, 30, 40, by_size=(mode == "size"))
    assert torch.allclose(table, expected, atol=1e-5), (table - expected).abs().max()


def test_the_two_resize_modes_differ_slightly_and_the_reference_one_is_the_default():
    a, b = tiny(), tiny(pos_embed_resize="size")
    assert a.pos_embed_resize == "scale"
    with torch.no_grad():
        d = (a.interpolate_pos_encoding(30, 40) - b.interpolate_pos_encoding(30, 40)).abs().max()
    assert 1e-5 < d < 0.05
    with pytest.raises(ValueError):
        tiny(pos_embed_resize="nearest")


def test_forward_at_480x640_uses_the_resized_table():
    m = tiny()
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


def test_the_224_grid_is_used_unchanged_and_resized_tables_are_cached_until_the_weights_change():
    m = tiny()
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


# -- attention -------------------------------------------------------------------------------------
def _last_block_input(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    t = m.prepare_tokens(x)
    for blk in m.blocks[:-1]:
        t = blk(t)
    return m.blocks[-1].norm1(t)


def test_last_selfattention_matches_einsum_and_rows_sum_to_one():
    m = tiny(depth=2)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        attn = m.get_last_selfattention(x)
        h = _last_block_input(m, x)
        a = m.blocks[-1].attn
        q, k, _ = (h @ a.qkv.weight.T + a.qkv.bias).chunk(3, dim=-1)
        q = q.reshape(2, -1, a.num_heads, a.head_dim)
        k = k.reshape(2, -1, a.num_heads, a.head_dim)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(a.head_dim)
        expected = torch.softmax(logits, dim=-1)
    n = 1 + 3 * 4
    assert attn.shape == (2, 3, n, n)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, n), atol=1e-5)
    assert torch.allclose(attn, expected, atol=1e-6)


def test_cls_attention_is_row_zero_patch_part_of_the_full_matrix():
    m = tiny(depth=2)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        full = m.get_last_selfattention(x)
        cls = m.get_cls_attention(x)
    assert cls.shape == (2, 3, 12)
    assert torch.allclose(cls, full[:, :, 0, 1:], atol=1e-6)


def test_fused_attention_equals_the_explicit_path():
    m = tiny(depth=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = m.forward_features(x)
        m.set_fused_attention(False)
        explicit = m.forward_features(x)
    assert all(not b.attn.fused_attn for b in m.blocks)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_fused_path_calls_sdpa_and_attention_weights_do_not(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = tiny(depth=2)
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
        assert len(calls) == 2
        m.get_last_selfattention(torch.randn(1, 3, 32, 32))
        assert len(calls) == 3  # the first block only; the last one returns explicit weights


def test_blocked_attention_equals_sdpa_across_block_edges():
    from dinokit.models.attention import blocked_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    # a block smaller than a head: 6 heads x row chunks of 256 + 44 rows
    assert torch.allclose(blocked_attention(q, k, v, block=256 * 300), ref, atol=1e-12)
    # whole heads, 4 to a block: 4 + 2
    assert torch.allclose(blocked_attention(q, k, v, block=4 * 300 * 300 + 5), ref, atol=1e-12)
    assert torch.allclose(blocked_attention(q, k, v), ref, atol=1e-12)  # all heads in one block


def test_bf16_cpu_attention_matches_fp32_and_its_gradients_flow():
    from dinokit.models.attention import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 197, 64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        blocked = attention(qb, kb, vb).float()
    explicit = attention(qb, kb, vb)
    for out in (blocked, explicit.float()):
        assert ((out - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding, not a different function
    explicit.float().square().sum().backward()
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    F.scaled_dot_product_attention(q, k, v).square().sum().backward()
    for a, b in ((qb, q), (kb, k), (vb, v)):
        assert ((a.grad.float() - b.grad).norm() / b.grad.norm()) < 3e-2


def test_bf16_cpu_attention_is_as_close_to_fp64_as_the_fused_kernel_on_sharp_logits():
    # logits of std ~9: rounding plain bf16 products would cost ~6x the fused kernel's error
    from dinokit.models.attention import attention

    torch.manual_seed(0)
    qb, kb, vb = ((torch.randn(2, 3, 300, 64) * s).bfloat16() for s in (3.0, 3.0, 1.0))
    ref = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double())  # the same inputs, exactly

    def err(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    fused = err(F.scaled_dot_product_attention(qb, kb, vb))
    with torch.no_grad():
        blocked = err(attention(qb, kb, vb))
    explicit = err(attention(*(t.clone().requires_grad_() for t in (qb, kb, vb))).detach())
    assert blocked < 2 * fused and explicit < 2 * fused, (blocked, explicit, fused)


# -- intermediate layers -----------------------------------------------------------------------------
def test_get_intermediate_layers_are_the_last_n_blocks_through_the_final_norm():
    m = tiny(depth=3)
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


# -- DINO head -----------------------------------------------------------------------------------------
def test_dino_head_shapes_keys_and_math():
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=100, hidden_dim=64, bottleneck_dim=32).eval()
    keys = set(head.state_dict())
    assert keys == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
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
    backbone = tiny(depth=1)
    head = DINOHead(192, out_dim=12, hidden_dim=16, bottleneck_dim=8).eval()
    wrapper = MultiCropWrapper(backbone, head)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        out = wrapper(crops)
        expected = torch.cat([head(backbone(c)) for c in crops])
    assert out.shape == (6, 12)
    assert torch.allclose(out, expected, atol=1e-5)


# -- constructor arguments -----------------------------------------------------------------------
def test_unknown_model_options_are_type_errors_not_swallowed():
    with pytest.raises(TypeError, match="dpeth"):
        dinokit.build_backbone("vit_tiny", 16, dpeth=1)
    with pytest.raises(TypeError, match="takes no model options; got depth"):
        dinokit.build_backbone("resnet50", depth=1)
    with pytest.raises(TypeError):
        dinokit.models.resnet.resnet50_backbone(drop_path_rate=0.1)
    # the training recipes' ViT options do not apply to (and do not reach) the ResNet-50
    assert dinokit.build_backbone("resnet50", drop_path_rate=0.1, img_size=64).embed_dim == 2048


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0), "depth must be at least 1, got 0"),
        (dict(num_heads=0), "num_heads must be at least 1"),
        (dict(img_size=8), "img_size must be at least 16, got 8"),
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
