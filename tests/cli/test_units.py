"""metrics.json says which scale each score keeps, and what a command prints uses that one scale per
score, labelled: k-NN accuracies in percent, DAVIS J&F in fractions (as the official scorer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

DATA = Path(__file__).resolve().parents[1] / "assets"


def test_knn_units_are_percent(feature_files, tmp_path):
    train, val = feature_files
    out = tmp_path / "knn"
    r = run_cli(
        ["knn", "--train-features", train, "--val-features", val, "--k", "1,5", "--output", out, "--quiet"]
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["units"]["top1"] == "percent" and m["units"]["top5"] == "percent"
    # four separable clusters: every query right, which is 100 on the percent scale (not 1.0)
    assert m["knn"]["1"]["top1"] == 100.0
    assert "top-1 %" in r.output and "100.00" in r.output


def test_davis_score_units_are_fractions_on_screen_too(tmp_path):
    gt = DATA / "davis-ellipses" / "gt"
    pred = tmp_path / "pred"
    shutil.copytree(DATA / "davis-ellipses" / "pred", pred)
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((pred / "metrics.json").read_text())
    assert m["units"]["J&F-Mean"] == "fraction"
    assert m["J&F-Mean"] == pytest.approx(0.8399313647422748, abs=1e-6)
    # the table and the summary line both in fractions, and labelled so
    assert "fractions (0-1)" in r.output and "percent" not in r.output
    assert "0.8399" in r.output and "83.99" not in r.output
