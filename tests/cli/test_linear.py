"""`dinokit linear` end to end on tiny images: images in, checkpoint and evaluation out, the released
head format, and one sentence for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dinokit.eval.features import load_features, save_features
from tests.helpers import feature_clusters, run_cli

SMALL = ["--resize", "32", "--image-size", "32", "--batch-size", "6", "--quiet"]


def test_cli_images_path_checkpoint_and_evaluate(labelled_folder, tiny4_weights, tmp_path):
    out = tmp_path / "lin"
    args = [
        "linear",
        "--weights",
        str(tiny4_weights),
        "--train",
        str(labelled_folder / "train"),
        "--val",
        str(labelled_folder / "val"),
        "--output",
        str(out),
        "--epochs",
        "2",
        "--lr",
        "0.5",
        *SMALL,
    ]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["linear"]) == {"top1", "top5", "epoch", "final", "best"} and set(m["linear"]["final"]) == {
        "top1",
        "top5",
    }
    # the headline is the best epoch's accuracy (what the reference prints), the final one beside it
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda rec: rec["top1"])  # the first epoch that reached the maximum
    assert m["linear"]["top1"] == pytest.approx(best["top1"]) and m["linear"]["epoch"] == best["epoch"]
    assert m["linear"]["top1"] >= m["linear"]["final"]["top1"]
    assert r.output.index("best (epoch") < r.output.index("final (epoch")
    assert m["config"]["n_last_blocks"] == 4 and m["config"]["feature_dim"] == 4 * 192  # ViT-T like ViT-S
    assert m["config"]["mode"] == "images"
    # the saved probe, validated with --evaluate, gives the final epoch's accuracy
    r = run_cli(
        [
            "linear",
            "--weights",
            str(tiny4_weights),
            "--val",
            str(labelled_folder / "val"),
            "--evaluate",
            "--linear-weights",
            str(out / "checkpoint.pth"),
            "--output",
            str(tmp_path / "ev"),
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["linear"]["final"]["top1"] == pytest.approx(m["linear"]["final"]["top1"])
    # a rerun into the same folder is refused; --resume with the run finished does nothing more
    assert run_cli(args).exit_code == 2
    r = run_cli([*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    # --overwrite starts afresh: a new log, not appended to the old one
    r = run_cli(
        [*[("1" if a == "2" and args[i - 1] == "--epochs" else a) for i, a in enumerate(args)], "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_cli_evaluate_released_head_format(labelled_folder, tiny4_weights, tmp_path):
    """A head in the released layout ({'state_dict': {'module.linear.*'}}) against a hand computation."""
    torch.manual_seed(0)
    w, b = torch.randn(3, 384), torch.randn(3)
    torch.save(
        {"state_dict": {"module.linear.weight": w, "module.linear.bias": b}}, tmp_path / "x_linearweights.pth"
    )
    r = run_cli(
        [
            "linear",
            "--weights",
            str(tiny4_weights),
            "--val",
            str(labelled_folder / "val"),
            "--evaluate",
            "--linear-weights",
            str(tmp_path / "x_linearweights.pth"),
            "--n-last-blocks",
            "1",
            "--avgpool-patch-tokens",
            "--output",
            str(tmp_path / "ev"),
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    val = load_features(tmp_path / "ev" / "val_features.pt")
    assert val.fingerprint["avgpool_patch_tokens"] is True and val.dim == 384
    pred = (val.features @ w.T + b).argmax(1)
    want = (pred == val.labels).float().mean().item() * 100
    assert m["linear"]["final"]["top1"] == pytest.approx(want)
    # the wrong feature size: one sentence
    r = run_cli(
        [
            "linear",
            "--weights",
            str(tiny4_weights),
            "--val",
            str(labelled_folder / "val"),
            "--evaluate",
            "--linear-weights",
            str(tmp_path / "x_linearweights.pth"),
            "--output",
            str(tmp_path / "ev2"),
            *SMALL,
        ]
    )
    assert r.exit_code == 2 and "takes 384-d features" in r.text and "768-d" in r.text


def test_cli_bad_input(labelled_folder, tiny4_weights, tmp_path, feature_files):
    base = ["linear", "--weights", str(tiny4_weights), "--epochs", "1", *SMALL]
    val = tmp_path / "v"
    shutil.copytree(labelled_folder / "val", val)
    shutil.copytree(labelled_folder / "val" / "red", val / "purple")
    r = run_cli(
        [*base, "--train", str(labelled_folder / "train"), "--val", str(val), "--output", str(tmp_path / "a")]
    )
    assert r.exit_code == 2 and "classes the training set lacks: purple" in r.text
    r = run_cli(
        ["linear", "--evaluate", "--val", str(labelled_folder / "val"), "--output", str(tmp_path / "b")]
    )
    assert r.exit_code == 2 and "--evaluate needs --linear-weights" in r.text
    # a released head by preset name, offline: says where to put the file
    r = run_cli(
        [
            "linear",
            "--evaluate",
            "--linear-weights",
            "dino_vits16",
            "--val",
            str(labelled_folder / "val"),
            "--output",
            str(tmp_path / "p"),
            "--quiet",
        ]
    )
    assert r.exit_code == 2 and "not in the cache" in r.text and "dino_deitsmall16" in r.text
    r = run_cli(
        [
            "linear",
            "--train",
            str(labelled_folder / "train"),
            "--val",
            str(labelled_folder / "val"),
            "--output",
            str(tmp_path / "w"),
            "--quiet",
        ]
    )
    assert r.exit_code == 2 and "Give --weights" in r.text
    # feature files of another dimension
    train, _ = feature_files
    save_features(feature_clusters(5, 4, 32, 1), tmp_path / "val32.pt")
    r = run_cli(
        [
            "linear",
            "--train-features",
            str(train),
            "--val-features",
            str(tmp_path / "val32.pt"),
            "--output",
            str(tmp_path / "c"),
            "--quiet",
        ]
    )
    assert r.exit_code == 2 and "are 16-d but those of" in r.text and "Traceback" not in r.text


def test_cli_short_run_says_which_option_to_raise(feature_files, tmp_path):
    """80 training features, batch 128, 3 epochs: 3 SGD steps at the paper's lr, far below the
    1000-step mark, so one line names --lr; a chosen --lr is taken as meant."""
    train, val = feature_files
    args = ["linear", "--train-features", train, "--val-features", val, "--epochs", "3", "--quiet"]
    r = run_cli([*args, "--output", tmp_path / "a"])
    assert r.exit_code == 0, r.output
    assert "made 3 optimisation steps" in r.text and "raise --lr" in r.text
    assert "0.001 x global batch / 256 = 0.0005" in r.text
    r = run_cli([*args, "--lr", "0.5", "--output", tmp_path / "b"])
    assert r.exit_code == 0, r.output
    assert "raise --lr" not in r.text


def test_cli_dinov2_protocol_on_v1_weights_runs_the_grid_and_says_so_once(
    labelled_folder, tiny4_weights, tmp_path
):
    out = tmp_path / "grid"
    args = [
        "linear",
        "--weights",
        tiny4_weights,
        "--train",
        labelled_folder / "train",
        "--val",
        labelled_folder / "val",
        "--output",
        out,
        "--protocol",
        "dinov2",
        "--augment",
        "none",
        "--epoch-length",
        "3",
        *SMALL,
    ]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert r.text.count("with DINO (v1) weights") == 1
    m = json.loads((out / "metrics.json").read_text())
    heads = m["linear"]["heads"]
    assert len(heads) == 52 and all("top1" in h for h in heads) and m["config"]["mode"] == "grid-features"
    assert m["linear"]["chosen"]["name"] in r.text and m["config"]["epochs"] == 10
    assert len((out / "log.jsonl").read_text().splitlines()) == 10  # 10 epochs of 3 iterations
    # --lr with --protocol pins the grid to one learning rate: DINOv2's released heads' input on one head
    r = run_cli([*args, "--lr", "0.01", "--epochs", "1", "--overwrite"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert [(h["lr"], h["n_last_blocks"], h["avgpool_patch_tokens"]) for h in m["linear"]["heads"]] == [
        (0.01, 4, True)
    ]


def test_cli_dinov3_protocol_on_images(labelled_folder, tiny4_weights, tmp_path):
    out = tmp_path / "grid3"
    r = run_cli(["linear", "--weights", tiny4_weights, "--train", labelled_folder / "train", "--val",
                 labelled_folder / "val", "--output", out, "--protocol", "dinov3", "--epochs", "1",
                 "--epoch-length", "2", *SMALL])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["mode"] == "grid-images" and len(m["linear"]["heads"]) == 13
    assert "RandomResizedCrop" not in m["config"]["fingerprint"]["transform"]  # the val transform is recorded
    r = run_cli(
        ["linear", "--weights", tiny4_weights, "--output", tmp_path / "x", "--protocol", "dinov4", *SMALL]
    )
    assert r.exit_code == 2 and "--protocol takes dino, dinov2, dinov3" in r.text
