"""The demo's report: the table, the verdicts and the explanations where DINO does not win."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


@pytest.fixture
def results():
    return {
        "random": {"knn": 12.5, "linear": 10.0, "jaccard": 0.25, "davis": 0.60, "copydays": 0.45},
        "trained": {"knn": 31.0, "linear": 35.5, "jaccard": 0.31, "davis": 0.58, "copydays": 0.45},
    }


def test_table_marks_each_metric_by_comparison(results):
    from dinokit.commands.demo_report import table_rows

    rows = {r[0]: r for r in table_rows(results)}
    assert rows["k-NN top-1 (20-NN, %)"][1:4] == ("12.5", "31.0", "yes")
    assert rows["DAVIS J&F-Mean"][1:4] == ("0.600", "0.580", "no")
    # a tie is not a win
    assert rows["Copydays strong mAP"][3] == "no"


def test_reports_explain_every_miss_and_only_misses(tmp_path, results):
    from dinokit.commands.demo_report import WHY_NOT, write_reports

    summary = {"seconds": 300.0, "pretrain_epochs": 7, "config": {"arch": "vit_tiny", "patch_size": "16"}}
    (tmp_path / "figures").mkdir()
    write_reports(tmp_path, results, {"video": "figures/video.png"}, summary)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert WHY_NOT["davis"] in md and WHY_NOT["copydays"] in md
    assert WHY_NOT["knn"] not in md
    assert "![video](figures/video.png)" in md
    assert "<img src='figures/video.png'>" in html
    assert "7 epochs" in md and "5.0 min" in md
    assert html.count("<tr>") == 6  # header + five metrics


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    r = run_cli(["demo", "--output", str(tmp_path)])
    assert r.exit_code == 2
    assert "--overwrite" in r.output
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["keep.txt"]
