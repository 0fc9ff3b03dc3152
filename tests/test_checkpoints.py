"""Every checkpoint format dinokit reads, the safety of reading them, and the preset cache."""

from __future__ import annotations

import argparse
import logging
import os
import urllib.request
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import dinokit
from dinokit import checkpoints, presets
from dinokit.checkpoints import (
    file_fingerprint,
    load_backbone,
    load_linear_head,
    read_checkpoint,
    save_checkpoint,
    state_dict_fingerprint,
    to_hf_state_dict,
)
from dinokit.errors import CheckpointError
from dinokit.models import DINOHead, MultiCropWrapper


def tiny(seed: int = 0, depth: int = 2, patch: int = 16, arch: str = "vit_tiny"):
    torch.manual_seed(seed)
    return dinokit.build_backbone(arch, patch, depth=depth).eval()


X = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))


def features(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def same_model(a, b) -> None:
    assert torch.allclose(features(a), features(b), atol=1e-6)


# -- formats ---------------------------------------------------------------------------------------
def test_released_flat_state_dict(tmp_path):
    m = tiny()
    torch.save(m.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    loaded = load_backbone(tmp_path / "dino_deitsmall16_pretrain.pth")
    assert loaded.arch == "vit_tiny" and loaded.patch_size == 16 and len(loaded.blocks) == 2
    assert not loaded.training
    same_model(m, loaded)


def _reference_full_checkpoint(path: Path, teacher, student) -> None:
    """The layout of the reference trainer's checkpoint.pth, saved the way it saves it (plain pickle)."""
    s_wrap = MultiCropWrapper(student, DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    t_wrap = MultiCropWrapper(teacher, DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    optim = torch.optim.AdamW(s_wrap.parameters())
    s_wrap(X).sum().backward()
    optim.step()
    torch.save(
        {
            # the student is DDP-wrapped in the reference trainer, the teacher is not (no BatchNorm)
            "student": OrderedDict(("module." + k, v) for k, v in s_wrap.state_dict().items()),
            "teacher": t_wrap.state_dict(),
            "optimizer": optim.state_dict(),
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=16, lr=0.0005, data_path="/x"),
            "dino_loss": {"center": torch.zeros(1, 16)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        },
        path,
    )


def test_full_training_checkpoint_loads_with_weights_only_for_both_keys(tmp_path, monkeypatch):
    teacher, student = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "checkpoint.pth"
    _reference_full_checkpoint(path, teacher, student)
    assert any(
        k.startswith("module.backbone.blocks.") for k in torch.load(path, weights_only=False)["student"]
    )

    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    t = load_backbone(path)  # teacher is the default, as in the paper
    s = load_backbone(path, checkpoint_key="student")
    assert seen and all(w is True for w in seen)
    same_model(t, teacher)
    same_model(s, student)
    assert not torch.allclose(features(t), features(s))
    with pytest.raises(CheckpointError, match="has no 'ema' weights; use --checkpoint-key teacher"):
        load_backbone(path, checkpoint_key="ema")
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].arch == "vit_tiny"
    assert ckpt["dino_loss"]["center"].shape == (1, 16)


def test_dinokit_own_checkpoint_and_save_is_atomic_and_weights_only(tmp_path):
    m = tiny(seed=3)
    path = tmp_path / "run" / "checkpoint.pth"
    path.parent.mkdir()
    save_checkpoint({"backbone": checkpoints.backbone_state_dict(m), "arch": "vit_tiny", "epoch": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]  # no temporary file left
    assert torch.load(path, weights_only=True)["epoch"] == 3
    same_model(load_backbone(path), m)
    dinokit.save_backbone(m, tmp_path / "flat.pth")
    same_model(load_backbone(tmp_path / "flat.pth", arch="vit_tiny", patch_size=16), m)


def test_timm_state_dict_with_a_classifier_loads_as_a_backbone(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2).eval()
    torch.save(t.state_dict(), tmp_path / "timm.pth")
    m = load_backbone(tmp_path / "timm.pth")
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        expected = t.forward_head(t.forward_features(x), pre_logits=True)
        assert torch.allclose(m(x), expected, atol=1e-5)


def _hf_by_hand(sd: dict) -> dict:
    """transformers' ViTModel names (facebook/dino-vits16), written out independently of dinokit."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
        "pooler.dense.weight": torch.zeros(4, 4),  # ViTModel's pooler: not part of the backbone
        "pooler.dense.bias": torch.zeros(4),
    }
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        dim = sd[b + "attn.proj.weight"].shape[0]
        for kind in ("weight", "bias"):
            qkv = sd[b + "attn.qkv." + kind]
            out[e + "attention.attention.query." + kind] = qkv[:dim].clone()
            out[e + "attention.attention.key." + kind] = qkv[dim : 2 * dim].clone()
            out[e + "attention.attention.value." + kind] = qkv[2 * dim :].clone()
            out[e + "attention.output.dense." + kind] = sd[b + "attn.proj." + kind]
            out[e + "layernorm_before." + kind] = sd[b + "norm1." + kind]
            out[e + "layernorm_after." + kind] = sd[b + "norm2." + kind]
            out[e + "intermediate.dense." + kind] = sd[b + "mlp.fc1." + kind]
            out[e + "output.dense." + kind] = sd[b + "mlp.fc2." + kind]
    return out


def test_hugging_face_state_dict_maps_onto_the_same_model(tmp_path):
    m = tiny(seed=5)
    hf = _hf_by_hand(m.state_dict())
    folder = tmp_path / "dino-vits16"
    folder.mkdir()
    torch.save(hf, folder / "pytorch_model.bin")
    same_model(load_backbone(folder), m)
    # transformers' ViTForImageClassification prefixes the backbone with "vit."
    torch.save({"vit." + k: v for k, v in hf.items()}, tmp_path / "prefixed.bin")
    same_model(load_backbone(tmp_path / "prefixed.bin"), m)
    exported = to_hf_state_dict(m.state_dict())
    assert set(exported) == {k for k in hf if not k.startswith("pooler.")}
    assert all(torch.equal(exported[k], hf[k]) for k in exported)


def test_safetensors_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    m = tiny(seed=6)
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in _hf_by_hand(m.state_dict()).items()},
        str(tmp_path / "model.safetensors"),
    )
    same_model(load_backbone(tmp_path / "model.safetensors"), m)
    safetensors_torch.save_file(dict(m.state_dict()), str(tmp_path / "flat.safetensors"))
    same_model(load_backbone(tmp_path / "flat.safetensors"), m)


def test_linear_weights_file(tmp_path):
    w, b = torch.randn(1000, 1536), torch.randn(1000)
    path = tmp_path / "dino_deitsmall16_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": w, "module.linear.bias": b}, "epoch": 100}, path)
    head = load_linear_head(path)
    assert set(head) == {"linear.weight", "linear.bias"}
    assert torch.equal(head["linear.weight"], w) and torch.equal(head["linear.bias"], b)
    with pytest.raises(CheckpointError, match="linear-probe weights, not a backbone"):
        load_backbone(path)
    torch.save({"state_dict": {"foo": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not hold linear-probe weights"):
        load_linear_head(tmp_path / "other.pth")
    torch.save({"state_dict": {"module.linear.weight": w}}, tmp_path / "no_bias.pth")
    with pytest.raises(CheckpointError, match="does not hold linear-probe weights"):
        load_linear_head(tmp_path / "no_bias.pth")


def test_resnet50_checkpoint_and_fingerprints(tmp_path):
    torch.manual_seed(7)
    r = dinokit.build_backbone("resnet50")
    sd = r.state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # a torchvision classifier
    torch.save(sd, tmp_path / "rn50.pth")
    loaded = load_backbone(tmp_path / "rn50.pth")
    assert checkpoints.infer_arch(checkpoints.backbone_state_dict(loaded))[0] == "resnet50"
    fp = state_dict_fingerprint(r.state_dict())  # holds 0-d num_batches_tracked tensors
    assert fp == state_dict_fingerprint(loaded.state_dict())
    with torch.no_grad():
        loaded.conv1.weight[0, 0, 0, 0] += 1
    assert state_dict_fingerprint(loaded.state_dict()) != fp
    assert file_fingerprint(tmp_path / "rn50.pth") == file_fingerprint(tmp_path / "rn50.pth")


# -- safety and clear messages ----------------------------------------------------------------------
class _RunsCode:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": torch.ones(1)}, "payload": _RunsCode(target)}, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert "refuses to unpickle" in msg and "could run code" in msg and "system" in msg
    assert "\n" not in msg
    assert not target.exists()
    # the same file with read_checkpoint directly, and a plain (non-zip) pickle of the same object
    import pickle

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"payload": _RunsCode(target)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        read_checkpoint(tmp_path / "evil.pkl")
    assert not target.exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"hello, this is text and not weights\n", "is not a readable PyTorch checkpoint"),
        (b"", "is not a readable PyTorch checkpoint"),
        (b"PK\x03\x04 broken zip", "is not a readable PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint(tmp_path, content, expected):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as e:
        load_backbone(path)
    assert "\n" not in str(e.value)


def test_tensors_that_are_not_a_backbone(tmp_path):
    torch.save({"foo.weight": torch.ones(3)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not a ViT or ResNet-50 backbone"):
        load_backbone(tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_backbone(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")


def test_wrong_arch_and_wrong_patch_size_name_what_was_expected_and_found(tmp_path):
    dinokit.save_backbone(tiny(), tmp_path / "t.pth")
    with pytest.raises(
        CheckpointError, match=r"holds vit_tiny with patch size 16 weights, but --arch vit_small"
    ):
        load_backbone(tmp_path / "t.pth", arch="vit_small")
    with pytest.raises(
        CheckpointError, match=r"holds vit_tiny with patch size 16 weights, but --patch-size 8"
    ):
        load_backbone(tmp_path / "t.pth", patch_size=8)


def test_unknown_preset():
    with pytest.raises(CheckpointError, match=r"Unknown weights 'dino_vits32'.*dino_vits16"):
        load_backbone("dino_vits32")


# -- presets and the torch.hub cache ------------------------------------------------------------------
def _preset_file(tmp_path: Path, name: str = "dino_vits16") -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(presets.PRESETS[name][0]).name


def test_offline_preset_fails_at_once_naming_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    tried = []  # "at once": without trying the network, which would wait for its timeout

    def urlopen(url, *args, **kwargs):
        tried.append(url)
        raise OSError("network")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(CheckpointError) as e:
        load_backbone("dino_vits16")
    assert tried == []
    msg = str(e.value)
    expected_path = tmp_path / "th" / "hub" / "checkpoints" / "dino_deitsmall16_pretrain.pth"
    assert str(expected_path) in msg
    assert (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" in msg
    )
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="is vit_small with patch size 16, but --patch-size 8"):
        load_backbone("dino_vits16", patch_size=8)


def test_a_cached_preset_file_is_used(tmp_path, monkeypatch):
    small = tiny(seed=8, depth=1, arch="vit_small")  # vit_small/16 like the preset, one block to stay fast
    path = _preset_file(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(small.state_dict(), path)
    m = load_backbone("dino_vits16")
    assert m.weights_source == "dino_vits16"
    same_model(m, small)
    same_model(load_backbone("dino_deitsmall16_pretrain"), small)  # the file's own name is an alias


def test_a_corrupt_cached_file_is_reported_and_fetched_again(tmp_path, monkeypatch, caplog):
    path = _preset_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a download")
    with caplog.at_level(logging.WARNING, logger="dinokit"), pytest.raises(CheckpointError) as e:
        load_backbone("dino_vits16")  # offline: the second fetch cannot happen
    assert "did not load and was removed" in str(e.value) and str(path) in str(e.value)
    assert any(
        "does not load" in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records
    )
    assert not path.exists()

    # online: the real download code, served from a local folder through a file:// URL
    small = tiny(seed=9, depth=1, arch="vit_small")
    server = tmp_path / "server"
    (server / "dino_deitsmall16_pretrain").mkdir(parents=True)
    torch.save(small.state_dict(), server / presets.PRESETS["dino_vits16"][0])
    monkeypatch.setattr(presets, "BASE_URL", server.as_uri() + "/")
    monkeypatch.setenv("DINOKIT_OFFLINE", "0")
    path.write_bytes(b"corrupt again")
    m = load_backbone("dino_vits16")
    same_model(m, small)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "BASE_URL", (tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setenv("DINOKIT_OFFLINE", "0")
    with pytest.raises(CheckpointError, match="could not be downloaded") as e:
        load_backbone("dino_vitb8")
    assert "put it at" in str(e.value)
    cache = _preset_file(tmp_path, "dino_vitb8").parent
    assert not cache.exists() or list(cache.iterdir()) == []
