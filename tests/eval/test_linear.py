"""The linear probe: the paper's defaults, its schedule, resuming, released heads and the logistic probe."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dinokit
from dinokit.eval.linear import (
    LINEAR_RUN,
    LinearConfig,
    _ProbeRun,
    _resolve_options,
    default_feature_options,
    linear_eval,
    logistic_probe,
)
from dinokit.run import TrainingRun
from tests.helpers import feature_clusters


def test_paper_defaults_per_arch():
    assert default_feature_options("vit_small") == (4, False)
    assert default_feature_options("vit_base") == (1, True)
    cfg = LinearConfig(output="x")
    s = dinokit.build_backbone("vit_small", 16, depth=4)
    b = dinokit.build_backbone("vit_base", 16, depth=1)
    assert _resolve_options(cfg, s) == (4, False)
    assert _resolve_options(cfg, b) == (1, True)
    assert _resolve_options(LinearConfig(output="x", n_last_blocks=2, avgpool_patch_tokens=True), s) == (
        2,
        True,
    )
    cfg = LinearConfig(output="x", batch_size=512)
    skeleton = TrainingRun(LINEAR_RUN, "x", cfg, torch.device("cpu"))  # not entered: nothing is written
    run = _ProbeRun(cfg, 1536, 1000, {}, world=2, device="cpu", run=skeleton)
    w, bias = run.probe.linear.weight, run.probe.linear.bias
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4 and torch.all(bias == 0)
    group = run.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.001 * 512 * 2 / 256)
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0


def test_features_path_learns_and_follows_the_cosine_schedule(feature_files, tmp_path):
    train, val = feature_files
    cfg = LinearConfig(
        output=tmp_path / "run",
        train_features=train,
        val_features=val,
        epochs=8,
        batch_size=16,
        lr=5.0,
        device="cpu",
    )
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
    with pytest.raises(dinokit.errors.DinokitError, match="--epochs 5 -> 9"):
        linear_eval(LinearConfig(output=tmp_path / "b", resume=True, **{**kw, "epochs": 9}))


def test_logistic_probe():
    tr, va = feature_clusters(20, 3, 8, 0), feature_clusters(5, 3, 8, 1)
    res = logistic_probe(tr.features, tr.labels, va.features, va.labels)
    assert res == {"top1": 100.0, "top5": 100.0}
    # noise: labels unrelated to the features give about chance
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    res = logistic_probe(x[:200], y[:200], x[200:], y[200:])
    assert res["top1"] < 30 and res["top5"] < 80
