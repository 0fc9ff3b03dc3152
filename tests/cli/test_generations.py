"""``attn``, ``davis`` and ``knn`` end to end on tiny random-weight backbones of each DINO generation
after the first: DINOv2 (patch 14), DINOv2 with registers and DINOv3 (RoPE, storage tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.eval.features import load_features
from tests.cli.test_davis import KEYS, make_davis
from tests.helpers import run_cli

FAMILIES = {"dinov2": "dinov2_vits14", "dinov2-registers": "dinov2_vits14_reg", "dinov3": "dinov3_vits16"}


@pytest.fixture(params=list(FAMILIES), scope="module")
def family_weights(request, tmp_path_factory):
    """(arch, patch size, file) of a random tiny backbone of one family, in dinokit's saved format."""
    arch = FAMILIES[request.param]
    torch.manual_seed(0)
    model = dinokit.build_backbone(arch, embed_dim=64, depth=2, num_heads=1)
    path = tmp_path_factory.mktemp(request.param) / "tiny.pth"
    dinokit.save_backbone(model, path)
    return arch, model.patch_size, path


def test_attn_maps_have_the_patch_grid_and_no_register_entries(tmp_path, family_weights):
    arch, p, weights = family_weights
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    r = run_cli(["attn", img, "--weights", weights, "--image-size", 4 * p, "--output", out, "--quiet"])
    assert r.exit_code == 0, r.output
    z = np.load(out / "a" / "maps.npz")
    assert z["attention"].shape == (1, 4, 4) and int(z["patch_size"]) == p
    assert 0 < z["attention"].sum() <= 1 + 1e-5  # a share of the CLS row: registers are not in the grid
    assert Image.open(out / "a" / "attn-head0.png").size == (4 * p, 4 * p)


def test_davis_propagates_on_the_family_s_patch_grid(tmp_path, family_weights):
    arch, p, weights = family_weights
    root = make_davis(tmp_path / "DAVIS", n_frames=3, seqs=("squares",))
    out = tmp_path / "out"
    r = run_cli(["davis", "--data", root, "--weights", weights, "--output", out, "--short-side", 4 * p,
                 "--num-workers", "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pngs = sorted((out / "squares").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[2]).size == (160, 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(k in metrics for k in KEYS) and 0 <= metrics["J-Mean"] <= 1
    assert metrics["config"]["patch_size"] == p and metrics["config"]["arch"] == arch


def test_knn_runs_on_the_family_s_features(tmp_path, labelled_folder, family_weights):
    arch, p, weights = family_weights
    out = tmp_path / "knn"
    r = run_cli(["knn", "--weights", weights, "--train", labelled_folder / "train", "--val", labelled_folder / "val",
                 "--k", "1,5", "--resize", 2 * p, "--crop", 2 * p, "--batch-size", "8", "--output", out, "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["knn"]) == {"1", "5"} and 0 <= m["knn"]["1"]["top1"] <= 100
    assert load_features(out / "train_features.pt").features.shape == (18, 64)  # CLS tokens, 64 wide


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_pretrain_refuses_a_v2_or_v3_architecture_in_one_sentence(tmp_path, pretrain_images, arch):
    r = run_cli(
        ["pretrain", "--data", pretrain_images, "--arch", arch, "--output", tmp_path / "run", "--epochs", 1]
    )
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.text.count(". ") == 0
    assert f"{arch} is a DINOv{arch[5]} architecture" in r.text and "vit_small" in r.text
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_every_other_protocol_takes_the_backbone(tmp_path, labelled_folder, copydays, arch):
    """features (bf16), linear (DINOv2's input), finetune -> predict, copydetect and duplicates."""
    from dinokit.train.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    model = dinokit.build_backbone(arch, embed_dim=64, depth=2, num_heads=1)
    weights = tmp_path / "tiny.pth"
    dinokit.save_backbone(model, weights)
    s = 2 * model.patch_size
    r = run_cli(["features", "--weights", weights, "--data", labelled_folder / "train", "--output", tmp_path / "f.pt",
                 "--resize", s, "--crop", s, "--precision", "bf16", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert load_features(tmp_path / "f.pt").features.shape == (18, 64)
    r = run_cli(["linear", "--weights", weights, "--train", labelled_folder / "train", "--val", labelled_folder / "val",
                 "--features-only", "--epochs", 2, "--resize", s, "--crop", s, "--output", tmp_path / "lin", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    # --epochs pins one head: DINOv2's input of its released heads (2 blocks: 2 CLS tokens and the average),
    # DINOv3's own (the last CLS token and the average)
    want = (
        "192-d features (last 2 CLS + patch average)"
        if arch.startswith("dinov2")
        else "128-d features (last 1 CLS + patch average)"
    )
    assert want in r.text
    cfg = FinetuneConfig(train=labelled_folder / "train", val=labelled_folder / "val", output=tmp_path / "ft",
                         weights=str(weights), epochs=1, batch_size=6, image_size=s, num_workers=0, precision="fp32",
                         device="cpu", lr=0.05, warmup_epochs=0)  # fmt: skip
    assert finetune(cfg).finished
    again = dinokit.load_backbone(tmp_path / "ft" / "model.pth")
    assert again.arch == arch and again.num_register_tokens == 4
    r = run_cli(["predict", "--model", tmp_path / "ft" / "model.pth", labelled_folder / "val", "--top", "2",
                 "--output", "-"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run_cli(["copydetect", "--data", copydays, "--weights", weights, "--image-size", s, "--output",
                 tmp_path / "cd", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run_cli(["duplicates", labelled_folder, "--output", tmp_path / "dup", "--weights", weights, "--image-size", s,
                 "--threshold", "0.95", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
