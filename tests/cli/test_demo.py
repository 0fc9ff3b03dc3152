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
    # Jaccard 0.25 -> 0.31: +0.06 > the random-init spread 0.023
    assert rows["attention Jaccard"][3] == "yes"


def test_a_gain_inside_the_random_init_spread_is_within_noise():
    """k-NN 45.5 -> 46.0 (+0.5, spread 2.0) is within noise; 45.5 -> 47.6 (+2.1) is a win; a missing
    result is "not run"."""
    from dinokit.commands.demo_report import verdict

    assert verdict("knn", 45.5, 46.0) == "within noise"
    assert verdict("knn", 45.5, 47.6) == "yes"
    assert verdict("knn", 45.5, 45.5) == "no"
    assert verdict("davis", 0.600, 0.609) == "within noise"  # +0.009 is not more than 0.009
    assert verdict("davis", 0.600, None) == "not run"


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
    assert html.count("<tr>") == 7  # header + six metrics
    # the recipe's measured Copydays limit is stated in every report of the fixed recipe, won or not
    assert "24 originals" in md and "24 originals" in html
    assert "within noise" in md  # the verdict column is explained


def test_a_report_of_another_recipe_does_not_repeat_the_fixed_recipes_notes(tmp_path, results):
    """A --minutes run gets its own recipe sentence, the collapse warning whether or not a metric was
    missed, and not the fixed recipe's notes about seeds and 16 epochs."""
    from dinokit.commands.demo_report import write_reports

    summary = {
        "seconds": 180.0,
        "pretrain_epochs": 3,
        "pretrain_epochs_done": 2,
        "fixed_recipe": False,
        "pretrain_losses": [5.5, 5.6],
        "out_dim": 256,
        "config": {"arch": "vit_tiny", "patch_size": "16", "minutes": "3.0"},
    }
    won = {"random": {k: 0.0 for k in results["random"]}, "trained": {k: 50.0 for k in results["random"]}}
    write_reports(tmp_path, won, {}, summary)
    md = (tmp_path / "report.md").read_text()
    assert "24 originals" not in md and "16 epochs" not in md
    assert "time budget of 3.0 minutes" in md and "2 of 3 planned epochs" in md
    assert "**Warning:**" in md and "ln 256" in md


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    r = run_cli(["demo", "--output", str(tmp_path)])
    assert r.exit_code == 2
    assert "--overwrite" in r.output
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["keep.txt"]


def _tiny_plan(out):
    from dinokit.commands.demo import DemoPlan

    return DemoPlan(
        output=out,
        epochs=1,
        arch="vit_tiny",
        image_size=32,
        global_size=32,
        local_size=16,
        local_crops=2,
        batch_size=8,
        classes=3,
        per_class=8,
        video_sequences=1,
        video_frames=3,
        video_size=(48, 64),
        copydays_originals=3,
        copydays_distractors=2,
        copydays_size=48,
        copy_image_size=32,
        attn_picture_size=32,
        threads=1,
        quiet=True,
        segment_train=4,
        segment_val=2,
        segment_size=32,
        segment_iterations=4,
    )


@pytest.mark.slow
def test_the_fixed_recipe_gives_the_same_numbers_twice(tmp_path, one_thread):
    """The demo is a fixed recipe: two runs in a row give the same metrics.json results, to the bit
    (the time budget, which depends on the machine, is an option, not the default)."""
    from dinokit.commands.demo import run_demo

    first = run_demo(_tiny_plan(tmp_path / "a"))
    second = run_demo(_tiny_plan(tmp_path / "b"))
    assert first["pretrain_epochs"] == second["pretrain_epochs"] == 1
    assert set(first["results"]["trained"]) == {"knn", "linear", "jaccard", "davis", "copydays", "segment"}
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
    # the pretraining's own check found no collapsed epoch: a loss near ln(256) alone says nothing
    assert collapse_note({"pretrain_losses": [2.0, 5.3, 5.45], "out_dim": 256, "collapsed_epochs": []}) == ""
    assert "5.60" in collapse_note(
        {"pretrain_losses": [2.0, 5.3, 5.6], "out_dim": 256, "collapsed_epochs": [3]}
    )


def test_the_demo_recipe_is_pretrain_options_and_config_fields():
    """The one recipe the demo and the benchmarks share: written as `dinokit pretrain` options by
    name (worked by hand below), and every key a PretrainConfig field (pretrain_learns.py passes it
    as keyword arguments)."""
    import dataclasses

    from dinokit.commands.demo import DEMO_RECIPE, recipe_args

    from dinokit.train.pretrain_settings import PretrainConfig

    assert recipe_args({"out_dim": 256, "momentum_teacher": 0.99}) == [
        "--out-dim",
        "256",
        "--momentum-teacher",
        "0.99",
    ]
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert set(DEMO_RECIPE) <= fields


def _interrupting(monkeypatch, when):
    """Make the demo's step runner raise KeyboardInterrupt, once, where ``when(args)`` says: as Ctrl-C
    would, between two of a step's units or in the middle of a step."""
    from dinokit.commands import demo as demo_module

    real, fired = demo_module._run, []

    def run(args, what):
        args = [str(a) for a in args]
        cut = not fired and when(args)
        if cut == "stop-after-1":  # a pretraining that stopped at its end-of-epoch checkpoint
            fired.append(True)
            real([*args, "--stop-after", "1"], what)
            raise KeyboardInterrupt
        if cut:
            fired.append(True)
            raise KeyboardInterrupt
        return real(args, what)

    monkeypatch.setattr(demo_module, "_run", run)
    return fired


@pytest.mark.slow
def test_a_stopped_demo_resumed_gives_the_uninterrupted_numbers(tmp_path, one_thread, monkeypatch):
    """Ctrl-C in the pretraining (after epoch 1 of 2), then in the DAVIS step: each time the resumed
    demo continues, and the results, the pretrained weights and the epochs equal an uninterrupted demo's."""
    import torch
    from dinokit.commands.demo import DemoState, run_demo

    def plan(out):
        p = _tiny_plan(out)
        p.epochs = 2
        return p

    whole = run_demo(plan(tmp_path / "whole"))

    out = tmp_path / "cut"
    _interrupting(
        monkeypatch, lambda a: a[0] == "pretrain" and "calibration-run" not in " ".join(a) and "stop-after-1"
    )
    with pytest.raises(KeyboardInterrupt):
        run_demo(plan(out))
    assert DemoState.load(out).get("pretrain") is None and (out / "pretrain" / "checkpoint.pth").is_file()
    monkeypatch.undo()
    _interrupting(monkeypatch, lambda a: a[0] == "davis")
    with pytest.raises(KeyboardInterrupt):
        run_demo(plan(out), DemoState.load(out))
    state = DemoState.load(out)
    assert state.get("knn") is not None and state.get("davis") is None
    monkeypatch.undo()
    resumed = run_demo(plan(out), DemoState.load(out))

    assert resumed["results"] == whole["results"]
    assert resumed["pretrain_epochs_done"] == whole["pretrain_epochs_done"] == 2
    wa = torch.load(tmp_path / "whole" / "pretrain" / "backbone.pth", weights_only=True)
    wb = torch.load(out / "pretrain" / "backbone.pth", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_minutes_bounds_the_whole_demo(tmp_path, one_thread):
    """A budget far below what the work needs: the pretraining is cut at its share and the evaluation
    steps that would start after the budget are not run (the report says so) — the demo ends within
    seconds instead of running every step."""
    import time

    from dinokit.commands.demo import run_demo

    p = _tiny_plan(tmp_path / "d")
    p.epochs, p.minutes = None, 0.001  # 60 ms: spent before the first evaluation, however fast the machine
    t0 = time.monotonic()
    summary = run_demo(p)
    took = time.monotonic() - t0
    assert set(summary["skipped"]) == {"knn", "linear", "jaccard", "davis", "copydays", "segment"}
    assert summary["results"] == {"random": {}, "trained": {}}
    assert "Not run" in (tmp_path / "d" / "report.md").read_text()
    assert (
        took < 120
    )  # the data, a calibration epoch and at most one pretraining epoch of 24 tiny images (a busy machine)


def test_resume_without_a_stopped_demo_is_refused(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    r = run_cli(["demo", "--output", str(out), "--resume"])
    assert r.exit_code == 2
    assert "no stopped demo" in r.output and "dinokit demo --output" in r.output


def test_the_report_pictures_read_at_page_scale(tmp_path):
    """The attention figure is a named row per image and model, no wider than the report's 960-pixel column
    (so the masks' key, drawn at 13 pixels or more, is not shrunk); the duplicates sheet's score is
    drawn in letters at least 13 pixels high, ascenders to descenders (the bitmap font's were 10)."""
    import numpy as np
    from dinokit.commands.demo_report import compose_pictures
    from PIL import Image

    from dinokit.viz import contact_sheet

    evals = tmp_path / "eval"
    for name in ("random", "trained"):
        for stem in ("img_a", "img_b"):
            d = evals / name / "attn-maps" / stem
            d.mkdir(parents=True)
            Image.new("RGB", (220, 262), "gray").save(d / "masks.png")
            Image.new("RGB", (192, 192), "white").save(d / "overlay-mean.png")
    pics = compose_pictures(tmp_path, evals)
    fig = Image.open(tmp_path / pics["attention"])
    assert fig.width <= 960
    assert fig.height > 2 * 262  # two rows, each under its caption

    class Pair:
        def __init__(self, a, b, score):
            self.image_a, self.image_b, self.score = a, b, score

    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "white").save(img)
    sheet = contact_sheet([Pair(str(img), str(img), 0.999)], tmp_path / "sheet.png")
    px = np.asarray(Image.open(sheet).convert("L"))
    text = px[:, 2 * (160 + 8) + 16 :]  # the caption column
    dark = (text < 128).any(axis=1)
    top = int(np.argmax(dark))
    height = int(np.argmin(dark[top:]))  # the first line's rows of ink, up to the first blank row
    assert height >= 13


def test_resume_with_other_options_is_refused(tmp_path):
    """A stopped demo resumes with its own options: a different one typed is refused in one sentence."""
    from dinokit.commands.demo import DemoPlan, DemoState

    out = tmp_path / "d"
    out.mkdir()
    DemoState.begin(DemoPlan(output=out, seed=0)).save()
    r = run_cli(["demo", "--output", str(out), "--resume", "--seed", "3"])
    assert r.exit_code == 2
    assert "started with --seed 0" in r.output
