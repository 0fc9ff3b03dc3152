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
    # the recipe's measured Copydays limit is stated in every report, won or not
    assert "24 originals" in md and "24 originals" in html


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    r = run_cli(["demo", "--output", str(tmp_path)])
    assert r.exit_code == 2
    assert "--overwrite" in r.output
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["keep.txt"]


def _tiny_plan(out):
    from dinokit.commands.demo import DemoPlan

    return DemoPlan(
        output=out, epochs=1, arch="vit_tiny", image_size=32, global_size=32, local_size=16, local_crops=2,
        batch_size=8, classes=3, per_class=8, video_sequences=1, video_frames=3, video_size=(48, 64),
        copydays_originals=3, copydays_distractors=2, copydays_size=48, copy_image_size=32,
        attn_picture_size=32, threads=1, quiet=True,
    )


@pytest.mark.slow
def test_the_fixed_recipe_gives_the_same_numbers_twice(tmp_path, one_thread):
    """The demo is a fixed recipe: two runs in a row give the same metrics.json results, to the bit
    (the time budget, which depends on the machine, is an option, not the default)."""
    from dinokit.commands.demo import run_demo

    first = run_demo(_tiny_plan(tmp_path / "a"))
    second = run_demo(_tiny_plan(tmp_path / "b"))
    assert first["pretrain_epochs"] == second["pretrain_epochs"] == 1
    assert set(first["results"]["trained"]) == {"knn", "linear", "jaccard", "davis", "copydays"}
    assert first["results"] == second["results"]
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk["results"] == first["results"]
    # the pretrained weights themselves, not only the rounded metrics
    import torch

    wa = torch.load(tmp_path / "a" / "pretrain" / "backbone.pth", weights_only=True)
    wb = torch.load(tmp_path / "b" / "pretrain" / "backbone.pth", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_epochs_and_minutes_together_are_refused(tmp_path):
    r = run_cli(["demo", "--output", str(tmp_path / "d"), "--epochs", "3", "--minutes", "5"])
    assert r.exit_code != 0
    assert "--epochs or --minutes" in r.output
    assert not (tmp_path / "d").exists()


def test_the_report_names_near_uniform_targets_measured_from_the_losses():
    """ln(256) = 5.545: a last epoch at 5.60 means near-uniform teacher targets, first reached at
    epoch 2 (5.30 >= 0.9 x 5.545 = 4.99); a run that ends at 2.0 gets no such sentence."""
    from dinokit.commands.demo_report import collapse_note

    note = collapse_note({"pretrain_losses": [2.0, 5.3, 5.6], "out_dim": 256})
    assert "5.60" in note and "ln 256 = 5.55" in note and "from epoch 2 of 3" in note
    assert collapse_note({"pretrain_losses": [5.6, 4.0, 2.0], "out_dim": 256}) == ""
    assert collapse_note({"pretrain_losses": [], "out_dim": 256}) == ""


def test_the_demo_recipe_is_pretrain_options_and_config_fields():
    """The one recipe the demo and the benchmarks share: written as `dinokit pretrain` options by
    name (worked by hand below), and every key a PretrainConfig field (pretrain_learns.py passes it
    as keyword arguments)."""
    import dataclasses

    from dinokit.commands.demo import DEMO_RECIPE, recipe_args

    from dinokit.train.pretrain_settings import PretrainConfig

    assert recipe_args({"out_dim": 256, "momentum_teacher": 0.99}) == ["--out-dim", "256", "--momentum-teacher", "0.99"]
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert set(DEMO_RECIPE) <= fields
