"""The linear probe: the paper's defaults, its schedule, resuming, released heads, the logistic probe
and `dinokit linear` end to end on tiny images."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import run_cli

import dinokit
from dinokit.eval.features import FeatureSet, load_features, save_features
from dinokit.eval.linear import (
    LinearConfig,
    _ProbeRun,
    _resolve_options,
    default_feature_options,
    linear_eval,
    logistic_probe,
)

SMALL = ["--resize", "32", "--crop", "32", "--batch-size", "6", "--quiet"]


def clusters(n_per_class, classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    names = [f"c{i}" for i in range(classes)]
    fp = {"weights": "random(seed=0)", "arch": "vit_tiny", "n_last_blocks": 1, "avgpool_patch_tokens": False}
    return FeatureSet(feats, labels, names, [f"{i}.png" for i in range(len(labels))], fp)


@pytest.fixture
def feature_files(tmp_path):
    save_features(clusters(20, 4, 16, 0), tmp_path / "train.pt")
    save_features(clusters(5, 4, 16, 1), tmp_path / "val.pt")
    return tmp_path / "train.pt", tmp_path / "val.pt"


def test_paper_defaults_per_arch():
    assert default_feature_options("vit_small") == (4, False)
    assert default_feature_options("vit_base") == (1, True)
    cfg = LinearConfig(output="x")
    s = dinokit.build_backbone("vit_small", 16, depth=4)
    b = dinokit.build_backbone("vit_base", 16, depth=1)
    assert _resolve_options(cfg, s) == (4, False)
    assert _resolve_options(cfg, b) == (1, True)
    assert _resolve_options(LinearConfig(output="x", n_last_blocks=2, avgpool_patch_tokens=True), s) == (2, True)
    run = _ProbeRun(LinearConfig(output="x", batch_size=512), 1536, 1000, {}, world=2, device="cpu")
    w, bias = run.probe.linear.weight, run.probe.linear.bias
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4 and torch.all(bias == 0)
    group = run.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.001 * 512 * 2 / 256)
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0


def test_features_path_learns_and_follows_the_cosine_schedule(feature_files, tmp_path):
    train, val = feature_files
    cfg = LinearConfig(output=tmp_path / "run", train_features=train, val_features=val, epochs=8, batch_size=16,
                       lr=5.0, device="cpu")
    (tmp_path / "run").mkdir()
    res = linear_eval(cfg)
    assert res.mode == "features" and res.final["top1"] == 100.0 and res.best["top1"] == 100.0
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    base = 5.0 * 16 / 256
    for e, row in enumerate(log):
        assert row["lr"] == pytest.approx(0.5 * base * (1 + math.cos(math.pi * e / 8)))
    assert log[-1]["loss"] < log[0]["loss"]
    ck = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 8 and set(ck["state_dict"]) == {"linear.weight", "linear.bias"}


def test_resume_gives_the_same_probe_as_an_uninterrupted_run(feature_files, tmp_path, monkeypatch):
    train, val = feature_files
    kw = dict(train_features=train, val_features=val, epochs=5, batch_size=16, lr=1.0, device="cpu")
    (tmp_path / "a").mkdir()
    linear_eval(LinearConfig(output=tmp_path / "a", **kw))
    original = _ProbeRun.end_epoch

    def stop_after_two(self, epoch, *a, **k):
        original(self, epoch, *a, **k)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(_ProbeRun, "end_epoch", stop_after_two)
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        linear_eval(LinearConfig(output=tmp_path / "b", **kw))
    monkeypatch.setattr(_ProbeRun, "end_epoch", original)
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 2
    res = linear_eval(LinearConfig(output=tmp_path / "b", resume=True, **kw))
    assert res.epochs_run == 5
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    # a resume with another schedule is refused
    with pytest.raises(dinokit.errors.CheckpointError, match="same --epochs"):
        linear_eval(LinearConfig(output=tmp_path / "b", resume=True, **{**kw, "epochs": 9}))


def test_logistic_probe():
    tr, va = clusters(20, 3, 8, 0), clusters(5, 3, 8, 1)
    res = logistic_probe(tr.features, tr.labels, va.features, va.labels)
    assert res == {"top1": 100.0, "top5": 100.0}
    # noise: labels unrelated to the features give about chance
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    res = logistic_probe(x[:200], y[:200], x[200:], y[200:])
    assert res["top1"] < 30 and res["top5"] < 80


def test_cli_images_path_checkpoint_and_evaluate(labelled_folder, tiny4_weights, tmp_path):
    out = tmp_path / "lin"
    args = ["linear", "--weights", str(tiny4_weights), "--train", str(labelled_folder / "train"), "--val",
            str(labelled_folder / "val"), "--output", str(out), "--epochs", "2", "--lr", "0.5", *SMALL]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["linear"]) == {"final", "best"} and set(m["linear"]["final"]) == {"top1", "top5"}
    assert m["config"]["n_last_blocks"] == 4 and m["config"]["feature_dim"] == 4 * 192  # ViT-T like ViT-S
    assert m["config"]["mode"] == "images"
    # the saved probe, validated with --evaluate, gives the final epoch's accuracy
    r = run_cli(["linear", "--weights", str(tiny4_weights), "--val", str(labelled_folder / "val"), "--evaluate",
                 "--linear-weights", str(out / "checkpoint.pth"), "--output", str(tmp_path / "ev"), *SMALL])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["linear"]["final"]["top1"] == pytest.approx(m["linear"]["final"]["top1"])
    # a rerun into the same folder is refused; --resume with the run finished does nothing more
    assert run_cli(args).exit_code == 2
    r = run_cli([*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    # --overwrite starts afresh: a new log, not appended to the old one
    r = run_cli([*args, "--overwrite", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_cli_evaluate_released_head_format(labelled_folder, tiny4_weights, tmp_path):
    """A head in the released layout ({'state_dict': {'module.linear.*'}}) against a hand computation."""
    torch.manual_seed(0)
    w, b = torch.randn(3, 384), torch.randn(3)
    torch.save({"state_dict": {"module.linear.weight": w, "module.linear.bias": b}}, tmp_path / "x_linearweights.pth")
    r = run_cli(["linear", "--weights", str(tiny4_weights), "--val", str(labelled_folder / "val"), "--evaluate",
                 "--linear-weights", str(tmp_path / "x_linearweights.pth"), "--n-last-blocks", "1",
                 "--avgpool-patch-tokens", "--output", str(tmp_path / "ev"), *SMALL])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    val = load_features(tmp_path / "ev" / "val_features.pt")
    assert val.fingerprint["avgpool_patch_tokens"] is True and val.dim == 384
    pred = (val.features @ w.T + b).argmax(1)
    want = (pred == val.labels).float().mean().item() * 100
    assert m["linear"]["final"]["top1"] == pytest.approx(want)
    # the wrong feature size: one sentence
    r = run_cli(["linear", "--weights", str(tiny4_weights), "--val", str(labelled_folder / "val"), "--evaluate",
                 "--linear-weights", str(tmp_path / "x_linearweights.pth"), "--output", str(tmp_path / "ev2"), *SMALL])
    assert r.exit_code == 2 and "takes 384-d features" in r.text and "768-d" in r.text


def test_cli_bad_input(labelled_folder, tiny4_weights, tmp_path, feature_files):
    base = ["linear", "--weights", str(tiny4_weights), "--epochs", "1", *SMALL]
    val = tmp_path / "v"
    shutil.copytree(labelled_folder / "val", val)
    shutil.copytree(labelled_folder / "val" / "red", val / "purple")
    r = run_cli([*base, "--train", str(labelled_folder / "train"), "--val", str(val), "--output", str(tmp_path / "a")])
    assert r.exit_code == 2 and "classes the training set lacks: purple" in r.text
    r = run_cli(["linear", "--evaluate", "--val", str(labelled_folder / "val"), "--output", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--evaluate needs --linear-weights" in r.text
    # a released head by preset name, offline: says where to put the file
    r = run_cli(["linear", "--evaluate", "--linear-weights", "dino_vits16", "--val", str(labelled_folder / "val"),
                 "--output", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 2 and "not in the cache" in r.text and "dino_deitsmall16" in r.text
    r = run_cli(["linear", "--train", str(labelled_folder / "train"), "--val", str(labelled_folder / "val"),
                 "--output", str(tmp_path / "w"), "--quiet"])
    assert r.exit_code == 2 and "Give --weights" in r.text
    # feature files of another dimension
    train, _ = feature_files
    save_features(clusters(5, 4, 32, 1), tmp_path / "val32.pt")
    r = run_cli(["linear", "--train-features", str(train), "--val-features", str(tmp_path / "val32.pt"),
                 "--output", str(tmp_path / "c"), "--quiet"])
    assert r.exit_code == 2 and "are 16-d but those of" in r.text and "Traceback" not in r.text
