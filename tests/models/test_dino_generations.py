"""DINOv2 and DINOv3 backbones held against timm's implementations on shared random weights, and
against the official code's rule where timm's differs: the plain DINOv2 models resize their
position table by DINO's scale factor ``(h0 + 0.1) / M`` without antialiasing (the dinov2 hub's
``interpolate_offset=0.1, interpolate_antialias=False``), while timm resizes every table to the exact
grid with antialiasing, which is the official rule of the register models only. DINOv3's RoPE has no
table: timm and the official code agree, and the test checks the periods against the paper's formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit import checkpoints
from dinokit.errors import CheckpointError

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=128, depth=2, num_heads=2)  # 64-dimensional heads, as every released model has
ATOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (LayerScales and norms included, so no branch is negligible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") or "gamma" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise if p.ndim > 1 else 0.1 * noise)
    return model.eval()


def _timm(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    return _randomize(timm.create_model(name, pretrained=False, num_classes=0, **kw), seed)


def _load(sd: dict, tmp_path, name: str = "w.pth", **kw) -> torch.nn.Module:
    path = tmp_path / name
    torch.save(sd, path)
    return checkpoints.load_backbone(path, **kw)


def _image(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_same_tokens(ours: torch.nn.Module, theirs_all: torch.Tensor, x: torch.Tensor, n_registers: int):
    """Our CLS and patch tokens against timm's all-token output (CLS, registers, patches)."""
    with torch.no_grad():
        feats = ours.forward_features(x)
    cls, patches = theirs_all[:, 0], theirs_all[:, 1 + n_registers :]
    assert feats.shape == (x.shape[0], 1 + patches.shape[1], theirs_all.shape[-1])
    assert torch.allclose(feats[:, 0], cls, atol=ATOL), (feats[:, 0] - cls).abs().max()
    assert torch.allclose(feats[:, 1:], patches, atol=ATOL), (feats[:, 1:] - patches).abs().max()
    assert patches.std() > 0.3  # the comparison is not between two near-constant outputs


def _official_v2_table(pos: torch.Tensor, h0: int, w0: int, offset: float, antialias: bool) -> torch.Tensor:
    """The dinov2 repository's ``interpolate_pos_encoding`` rule, written out here: bicubic with
    ``scale_factor=((h0 + offset) / M, (w0 + offset) / M)`` when the offset is nonzero, else to the
    exact size, antialiased or not; the table itself at its own grid of a square image."""
    m = int(math.sqrt(pos.shape[1] - 1))
    if (h0, w0) == (m, m):
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        kw = dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m))
    else:
        kw = dict(size=(h0, w0))
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    assert out.shape[-2:] == (h0, w0)
    return torch.cat((pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)), dim=1)


# -- DINOv2 without registers: timm's blocks, the official table rule -----------------------------------
@pytest.mark.parametrize(
    "shape,size",
    [(TINY, (518, 518)), (TINY, (224, 308)), pytest.param({}, (224, 224), marks=pytest.mark.slow)],
    ids=["tiny-518", "tiny-224x308", "vits14-224"],
)
def test_dinov2_matches_timm_blocks_with_the_official_position_table(tmp_path, shape, size):
    ref = _timm("vit_small_patch14_dinov2", **shape)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, ref.embed_dim)  # the hub files carry it; evaluation never uses it
    ours = _load(sd, tmp_path)
    assert ours.arch == "dinov2_vits14" and ours.patch_size == 14 and ours.num_register_tokens == 0
    assert not shape or ours.embed_dim == 128
    h, w = size
    h0, w0 = h // 14, w // 14
    # timm at a fixed input size with the table resized by the official rule
    fixed = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=(h, w), **shape
    )
    table = _official_v2_table(sd["pos_embed"], h0, w0, offset=0.1, antialias=False)
    fixed.load_state_dict({**ref.state_dict(), "pos_embed": table}, strict=True)
    x = _image(h, w)
    with torch.no_grad():
        theirs = fixed.eval().forward_features(x)
    _assert_same_tokens(ours, theirs, x, 0)
    if (h0, w0) != (37, 37):
        # timm's own resize (exact size, antialiased) is another rule: the official one is kept
        dyn = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                                **shape)  # fmt: skip
        dyn.load_state_dict(ref.state_dict())
        with torch.no_grad():
            timm_rule = dyn.eval().forward_features(x)
        assert (timm_rule[:, 1:] - theirs[:, 1:]).abs().max() > 1e-2


# -- DINOv2 with registers: timm's rule is the official one ---------------------------------------------
@pytest.mark.parametrize("size", [(518, 518), (224, 308)], ids=["518", "224x308"])
def test_dinov2_registers_match_timm_with_the_antialiased_exact_size_resize(tmp_path, size):
    ref = _timm("vit_small_patch14_reg4_dinov2", dynamic_img_size=True, **TINY)
    ours = _load(ref.state_dict(), tmp_path)
    assert ours.arch == "dinov2_vits14_reg" and ours.num_register_tokens == 4
    assert ours.pos_embed_resize == "size" and ours.pos_embed_antialias
    x = _image(*size)
    with torch.no_grad():
        theirs = ref.forward_features(x)
    _assert_same_tokens(ours, theirs, x, 4)
    # the same table by the formula of the official code (offset 0, antialias), in dinokit's layout
    h0, w0 = size[0] // 14, size[1] // 14
    expected = _official_v2_table(ours.pos_embed.detach(), h0, w0, offset=0.0, antialias=True)
    with torch.no_grad():
        got = ours.interpolate_pos_encoding(h0, w0, square_input=size[0] == size[1])
    assert torch.allclose(got, expected, atol=1e-6)


def test_dinov2_giant_swiglu_in_timm_and_hub_layouts(tmp_path):
    ref = _timm("vit_giant_patch14_dinov2", dynamic_img_size=True, img_size=224, **TINY)
    ours = _load(ref.state_dict(), tmp_path)
    assert type(ours.blocks[0].mlp).__name__ == "SwiGLU"
    x = _image(224, 224)
    with torch.no_grad():
        theirs = ref.forward_features(x)
    _assert_same_tokens(ours, theirs, x, 0)
    # the hub file names its packed SwiGLU w12 / w3
    hub = {
        k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in ref.state_dict().items()
    }
    _assert_same_tokens(_load(hub, tmp_path, "hub.pth"), theirs, x, 0)


# -- DINOv3 ---------------------------------------------------------------------------------------------
def _official_v3_layout(timm_sd: dict, head_dim: int = 64, k_bias_seed: int = 5) -> dict:
    """A timm DINOv3 state dict in the release files' names: storage tokens, ls1/ls2, one qkv bias
    whose key part is masked by ``bias_mask`` (filled with noise here: the mask must silence it),
    w1/w2/w3 SwiGLU, and the RoPE periods ``100 ** (4 i / head_dim)``."""
    out = {}
    g = torch.Generator().manual_seed(k_bias_seed)
    for k, v in timm_sd.items():
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        if ".mlp.w1." in k or ".mlp.w2." in k:
            pass
        elif ".mlp.fc2." in k and any(".fc1_g." in t for t in timm_sd):
            k = k.replace("mlp.fc2", "mlp.w3")
        if k.endswith("attn.q_bias"):
            q, v_ = v, timm_sd[k.replace("q_bias", "v_bias")]
            base = k.removesuffix("q_bias")
            out[base + "qkv.bias"] = torch.cat((q, torch.randn(q.shape, generator=g), v_))
            out[base + "qkv.bias_mask"] = torch.cat(
                (torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q))
            )
            continue
        if k.endswith("attn.v_bias"):
            continue
        out[k] = v
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1])
    out["rope_embed.periods"] = torch.tensor([100.0 ** (4 * i / head_dim) for i in range(head_dim // 4)])
    return out


@pytest.mark.parametrize(
    "name,shape,size",
    [
        ("vit_small_patch16_dinov3_qkvb", TINY, (224, 224)),
        ("vit_small_patch16_dinov3_qkvb", TINY, (160, 256)),
        pytest.param("vit_small_patch16_dinov3_qkvb", {}, (224, 224), marks=pytest.mark.slow),
        ("vit_small_patch16_dinov3", TINY, (192, 128)),
        ("vit_small_plus_patch16_dinov3", TINY, (160, 256)),
    ],
    ids=["tiny-224", "tiny-160x256", "vits16-224", "tiny-no-qkv-bias", "splus-swiglu"],
)
def test_dinov3_matches_timm_in_timm_and_release_layouts(tmp_path, name, shape, size):
    ref = _timm(name, **shape)
    x = _image(*size)
    with torch.no_grad():
        theirs = ref.forward_features(x)
    ours = _load(ref.state_dict(), tmp_path)
    assert ours.arch.startswith("dinov3_vits16") and ours.pos_embed is None and ours.num_register_tokens == 4
    assert ours.norm.eps == 1e-5
    _assert_same_tokens(ours, theirs, x, 4)
    release = _official_v3_layout(ref.state_dict())
    from_release = _load(release, tmp_path, "release.pth")
    _assert_same_tokens(from_release, theirs, x, 4)
    if not shape and name.endswith("qkvb"):
        assert from_release.arch == "dinov3_vits16" and from_release.embed_dim == 384


def test_dinov3_rope_has_no_table_and_its_periods_follow_the_formula():
    m = dinokit.build_backbone("dinov3_vits16", depth=1)
    expected = torch.tensor([100.0 ** (2 * i / 32) for i in range(16)])
    assert torch.allclose(m.rope_embed.periods, expected, rtol=1e-6)
    assert m.pos_embed is None and "pos_embed" not in m.state_dict()
    sin, cos = m.rope_embed(2, 3)
    # patch (row 1, col 2) of a 2 x 3 grid sits at y = 2 * 1.5 / 2 - 1, x = 2 * 2.5 / 3 - 1
    y, x = 0.5, 2 * 2.5 / 3 - 1
    angle_y0, angle_x0 = 2 * math.pi * y / 1.0, 2 * math.pi * x / 1.0
    assert math.isclose(float(sin[5, 0]), math.sin(angle_y0), abs_tol=1e-5)
    assert math.isclose(float(sin[5, 16]), math.sin(angle_x0), abs_tol=1e-5)
    assert math.isclose(float(cos[5, 32]), math.cos(angle_y0), abs_tol=1e-5)
    m_bf16 = m.to(torch.bfloat16)
    assert m_bf16.rope_embed.periods.dtype == torch.float32  # angles of up to 2 pi * 50 stay exact


# -- transformers layouts -------------------------------------------------------------------------------
def _to_hf_dinov2(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, t in zip(("query", "key", "value"), v.chunk(3)):
                    out[pre + f"attention.attention.{name}.{parts[-1]}"] = t
                continue
            rest = rest.replace("attn.proj", "attention.output.dense").replace(
                "ls1.gamma", "layer_scale1.lambda1"
            )
            rest = rest.replace("ls2.gamma", "layer_scale2.lambda1").replace("mlp.w12", "mlp.weights_in")
            out[pre + rest.replace("mlp.w3", "mlp.weights_out")] = v
            continue
        k = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "register_tokens": "embeddings.register_tokens"}.get(k, k)  # fmt: skip
        k = k.replace("patch_embed.proj", "embeddings.patch_embeddings.projection").replace(
            "norm.", "layernorm."
        )
        out[k] = v
    out["embeddings.mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def _to_hf_dinov3(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k == "rope_embed.periods":
            continue  # transformers computes its frequencies
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            pre = f"layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, t in zip("qkv", v.chunk(3)):
                    if not (name == "k" and parts[-1] == "bias"):  # DINOv3ViTModel has no key bias
                        out[pre + f"attention.{name}_proj.{parts[-1]}"] = t
                continue
            if rest.startswith("mlp.w12."):
                gate, up = v.chunk(2)
                out[pre + f"mlp.gate_proj.{parts[-1]}"], out[pre + f"mlp.up_proj.{parts[-1]}"] = gate, up
                continue
            rest = rest.replace("attn.proj", "attention.o_proj").replace("ls1.gamma", "layer_scale1.lambda1")
            rest = rest.replace("ls2.gamma", "layer_scale2.lambda1").replace("mlp.fc1", "mlp.up_proj")
            out[pre + rest.replace("mlp.fc2", "mlp.down_proj").replace("mlp.w3", "mlp.down_proj")] = v
            continue
        k = {"cls_token": "embeddings.cls_token", "register_tokens": "embeddings.register_tokens"}.get(k, k)
        out[k.replace("patch_embed.proj", "embeddings.patch_embeddings")] = v
    out["embeddings.mask_token"] = torch.zeros(1, 1, sd["cls_token"].shape[-1])
    return out


@pytest.mark.parametrize(
    "timm_name,convert,kw",
    [
        ("vit_small_patch14_dinov2", _to_hf_dinov2, {}),
        ("vit_small_patch14_reg4_dinov2", _to_hf_dinov2, dict(dynamic_img_size=True)),
        ("vit_giant_patch14_dinov2", _to_hf_dinov2, dict(img_size=224)),
        ("vit_small_patch16_dinov3_qkvb", _to_hf_dinov3, {}),
        ("vit_small_plus_patch16_dinov3", _to_hf_dinov3, {}),
    ],
    ids=["dinov2", "dinov2-registers", "dinov2-giant", "dinov3", "dinov3-splus"],
)
def test_transformers_layouts_load_to_the_same_model(tmp_path, timm_name, convert, kw):
    ours = _load(_timm(timm_name, **kw, **TINY).state_dict(), tmp_path)
    hf = convert({k: v.clone() for k, v in ours.state_dict().items()})
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(hf, folder / "pytorch_model.bin")
    again = checkpoints.load_backbone(folder)
    assert again.arch == ours.arch
    x = _image(112, 168)
    with torch.no_grad():
        assert torch.equal(again.forward_features(x), ours.forward_features(x))


# -- wrong pairings are one sentence ----------------------------------------------------------------------
def test_dinov2_weights_with_a_v1_arch_and_a_dinov3_file_without_rope_periods_are_one_sentence(tmp_path):
    v2 = tmp_path / "v2.pth"
    torch.save(_timm("vit_small_patch14_dinov2", **TINY).state_dict(), v2)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_backbone(v2, arch="vit_small")
    msg = str(e.value)
    assert "dinov2_vits14" in msg and "--arch vit_small" in msg and "\n" not in msg and msg.count(". ") == 0
    release = _official_v3_layout(_timm("vit_small_patch16_dinov3_qkvb", **TINY).state_dict())
    del release["rope_embed.periods"]
    with pytest.raises(CheckpointError) as e:
        _load(release, tmp_path, "cut.pth")
    msg = str(e.value)
    assert "RoPE periods" in msg and "rope_embed.periods" in msg and "\n" not in msg and msg.count(". ") == 0
    with pytest.raises(CheckpointError, match="dinov3_vits16.*--arch dinov2_vits14"):
        _load(_official_v3_layout(_timm("vit_small_patch16_dinov3_qkvb", **TINY).state_dict()), tmp_path, "r.pth",
              arch="dinov2_vits14")  # fmt: skip


# -- extra tokens never reach the outputs ----------------------------------------------------------------
def _register_magnet(arch: str) -> torch.nn.Module:
    """A random model whose last block's CLS query looks mostly at the registers, as the registers
    paper describes trained ViTs: the registers start equal to the CLS token (no position of their own,
    the CLS position zeroed) so they stay equal to it through every block, and the last block's
    queries and keys are scaled identities, so each token attends to its own copies."""
    torch.manual_seed(0)
    m = dinokit.build_backbone(arch, embed_dim=128, depth=2, num_heads=2).eval()
    with torch.no_grad():
        m.register_tokens.copy_(m.cls_token.expand_as(m.register_tokens))
        if m.pos_embed is not None:
            m.pos_embed[:, 0].zero_()
        qkv = m.blocks[-1].attn.qkv
        d = m.embed_dim
        qkv.weight[: 2 * d] = torch.cat((torch.eye(d), torch.eye(d))) * 3.0
        qkv.bias[: 2 * d] = 0
    return m


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_attention_maps_cover_the_patches_only_on_a_model_whose_registers_take_most_attention(arch):
    from dinokit.eval.attention import cls_attention_maps, masks_from_maps

    m = _register_magnet(arch)
    p = m.patch_size
    x = _image(4 * p, 6 * p)
    with torch.no_grad():
        full = m.get_last_selfattention(x)  # (B, heads, 1 + 4 + 24, same)
        row = m.get_cls_attention(x)
        maps = cls_attention_maps(m, x)
    assert full.shape[-1] == 1 + 4 + 24
    on_registers = full[:, :, 0, 1:5].sum(-1)
    assert (on_registers > 0.5).all(), on_registers  # the registers take most of the CLS row
    assert row.shape == (2, 2, 24) and torch.allclose(row, full[:, :, 0, 5:], atol=1e-6)
    assert maps.shape == (2, 2, 4, 6) and torch.allclose(maps.flatten(2), row, atol=1e-6)
    masks = masks_from_maps(maps, 0.6)  # a mass fraction of the patches' attention, as in DINO
    assert masks.any(dim=(-1, -2)).all()
    with torch.no_grad():
        feats = m.forward_features(x)
        everything = m.forward_all_tokens(x)
    assert feats.shape == (2, 1 + 24, 128)
    assert torch.equal(feats[:, 0], everything[:, 0]) and torch.equal(feats[:, 1:], everything[:, 5:])
    inter = m.get_intermediate_layers(x, 2)
    assert len(inter) == 2 and inter[-1].shape == feats.shape and torch.allclose(inter[-1], feats, atol=1e-6)


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_bf16_cpu_inference_stays_close_to_fp32(arch):
    torch.manual_seed(0)
    m = dinokit.build_backbone(arch, embed_dim=128, depth=2, num_heads=2).eval()
    x = _image(112, 112)
    with torch.no_grad():
        ref = m.forward_features(x)
        fast = dinokit.models.inference.inference_model(m, torch.bfloat16)[0].forward_features(x).float()
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 0.02, rel
