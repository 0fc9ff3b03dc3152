"""``dinokit demo``: the whole paper in miniature on a laptop CPU, with nothing to download.

It generates the built-in data (``dinokit synth``), pretrains a small ViT with DINO for a fixed
number of epochs (a fixed recipe: the same numbers on every run and every machine of a kind; a time
budget is an option), then evaluates the trained model and the same model at random init side by side with the
paper's protocols (k-NN, linear probe, attention Jaccard, DAVIS J&F on synthetic videos, Copydays
``strong`` mAP) and writes ``report.md`` and ``report.html`` with the table and pictures. Every
step is an ordinary dinokit command whose run folder stays in the output for inspection.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from dinokit.errors import DinokitError
from dinokit.io import prepare_output_dir, versions, write_json

from ._console import console, console_err
from ._options import RUN_PANEL, Overwrite, Quiet, config_from

#: the default demo's pretraining length: a fixed recipe, so that its numbers do not depend on the
#: machine's speed or load (chosen so that the whole demo stays within 10 minutes on an idle 2-core CPU)
DEMO_EPOCHS = 12
#: compute threads of every step: fixed, because reductions split over threads sum in another order;
#: two, the cores of the small machines the demo is sized for (a bigger machine gives the same numbers)
DEMO_THREADS = 2
#: the projection head's output dimensions in the demo's recipe
DEMO_OUT_DIM = 256
#: the demo's training settings beyond the data and crop sizes (``dinokit pretrain`` option names with
#: ``_`` for ``-``; also PretrainConfig fields): a short run, a teacher of momentum 0.99 (the paper's
#: 0.996 barely leaves random init in a few hundred steps; 0.9, faster, collapsed: the teacher's
#: output stopped depending on the image within the first epochs), a high lr and a small head; the
#: teacher temperature stays at the paper's starting 0.04. The benchmarks that time or test "the
#: demo's recipe" take it from here.
DEMO_RECIPE = {
    "lr": 5e-3, "out_dim": DEMO_OUT_DIM, "momentum_teacher": 0.99, "weight_decay_end": 0.04,
    "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
}  # fmt: skip


def recipe_args(recipe: dict) -> list[str]:
    """``{"out_dim": 256}`` -> ``["--out-dim", "256"]``: a recipe as ``dinokit pretrain`` options."""
    return [a for k, v in recipe.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@dataclass
class DemoPlan:
    output: Path
    minutes: float | None = None
    arch: str = "vit_tiny"
    patch_size: int = 16
    image_size: int = 96
    global_size: int = 64
    local_size: int = 32
    local_crops: int = 4
    batch_size: int = 32
    classes: int = 10
    per_class: int = 100
    video_sequences: int = 2
    video_frames: int = 12
    video_size: tuple[int, int] = (240, 427)
    copydays_originals: int = 24
    copydays_distractors: int = 48
    copydays_size: int = 160
    copy_image_size: int = 128
    attn_picture_size: int = 192
    seed: int = 0
    data_seed: int = 0
    epochs: int | None = None
    threads: int = DEMO_THREADS
    numerics: dict = field(default_factory=dict)
    quiet: bool = False
    overwrite: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _run(args: list[str], what: str) -> None:
    """Run one dinokit command in this process; a failure stops the demo with its name."""
    from . import app

    code = app(args=[str(a) for a in args], prog_name="dinokit", standalone_mode=False)
    if code not in (None, 0):
        raise DinokitError(f"The demo step '{what}' failed (dinokit {' '.join(map(str, args[:1]))} exited {code}).")


def _pretrain_losses(run: Path) -> list[float]:
    """The mean loss of each pretraining epoch, from the run's log.jsonl."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [round(float(json.loads(line)["loss"]), 4) for line in lines if line.strip()]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DinokitError(f"The demo could not read {path} ({e}).") from e


class _Stages:
    def __init__(self, plan: DemoPlan, total: int):
        self.plan, self.total, self.i = plan, total, 0
        self.t0 = time.monotonic()

    def __call__(self, title: str):
        self.i += 1
        elapsed = time.monotonic() - self.t0
        if not self.plan.quiet and console_err.is_terminal:
            console_err.rule(f"[bold]demo {self.i}/{self.total}[/]  {title}  ({elapsed / 60:.1f} min elapsed)")
        elif not self.plan.quiet:  # a log: one plain line, not a rule as wide as the page
            console_err.print(f"== demo {self.i}/{self.total}: {title} ({elapsed / 60:.1f} min elapsed)", highlight=False)
        return _Timer(self.plan.timings, title)


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.monotonic() - self.t, 1)




def _common(plan: DemoPlan) -> list[str]:
    flags = ["--quiet"] if plan.quiet else []
    if plan.overwrite:
        flags.append("--overwrite")
    return flags


def _calibrate_pretrain(plan: DemoPlan, data: Path) -> float:
    """Seconds per training image of the demo's pretraining recipe on this machine (a 64-image epoch)."""
    calib_data = plan.output / "work" / "calibration-images"
    if calib_data.exists():
        shutil.rmtree(calib_data)
    calib_data.mkdir(parents=True)
    from dinokit.data.images import find_images

    images = find_images(data)
    for i, p in enumerate(images[:: max(1, len(images) // 64)][:64]):
        shutil.copy(p, calib_data / f"{i:03d}{p.suffix}")
    run = plan.output / "work" / "calibration-run"
    if run.exists():
        shutil.rmtree(run)
    _run(
        ["pretrain", "--data", calib_data, "--output", run, *_pretrain_recipe(plan), "--epochs", "1", "--quiet"],
        "pretrain calibration",
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    ips = float(log[-1]["images_per_second"])
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(calib_data, ignore_errors=True)
    return 1.0 / max(ips, 1e-6)


def _pretrain_recipe(plan: DemoPlan) -> list[str]:
    return [
        "--arch", plan.arch, "--patch-size", plan.patch_size,
        "--batch-size", plan.batch_size,
        "--global-size", plan.global_size, "--local-size", plan.local_size,
        "--local-crops", plan.local_crops,
        *recipe_args(DEMO_RECIPE),
        "--num-workers", 1, "--seed", plan.seed, "--precision", "fp32", "--threads", plan.threads,
    ]  # fmt: skip


def run_demo(plan: DemoPlan) -> dict:
    out = plan.output
    data = out / "data"
    stage = _Stages(plan, total=10 if plan.minutes is not None else 9)
    t_start = time.monotonic()
    common = _common(plan)
    fp32 = ["--precision", "fp32"]

    with stage("built-in data: dinokit synth classify / video / copydays"):
        # flat shapes with class-correlated (noisy) colours and surface patterns, as real classes have,
        # on one shared grey background: minutes of DINO on a CPU can learn from these, not from the
        # fully cluttered default set, and a background colour of each image's own would be what it
        # learns instead of the object
        _run(["synth", "classify", "--output", data / "classify", "--classes", plan.classes,
              "--per-class", plan.per_class, "--image-size", plan.image_size, "--seed", plan.data_seed,
              "--style", "simple", "--class-colour", 0.7, "--class-texture", 1.0, "--background", "grey", *common],
             "synth classify")  # fmt: skip
        _run(["synth", "video", "--output", data / "video", "--sequences", plan.video_sequences,
              "--frames", plan.video_frames, "--height", plan.video_size[0], "--width", plan.video_size[1],
              "--seed", plan.data_seed, *common], "synth video")  # fmt: skip
        _run(["synth", "copydays", "--output", data / "copydays", "--originals", plan.copydays_originals,
              "--distractors", plan.copydays_distractors, "--whitening", plan.copydays_distractors,
              "--image-size", plan.copydays_size, "--seed", plan.data_seed, *common], "synth copydays")  # fmt: skip

    pretrain_data = data / "classify" / "train"
    n_train = sum(1 for _ in pretrain_data.rglob("*.png"))
    if plan.minutes is None:
        epochs = plan.epochs or DEMO_EPOCHS
    else:
        with stage("measuring this machine's pretraining speed (--minutes)"):
            sec_per_image = _calibrate_pretrain(plan, data / "classify" / "train")
            # evaluating two models takes roughly a third of the budget on a 2-core CPU; the rest trains
            spent = time.monotonic() - t_start
            pretrain_budget = max(30.0, 0.62 * plan.minutes * 60.0 - spent)
            epochs = int(max(2, min(300, pretrain_budget / (sec_per_image * n_train * 1.1))))
    plan.timings["pretrain_epochs"] = epochs

    trained = out / "pretrain"
    with stage(f"dinokit pretrain: {plan.arch}/{plan.patch_size}, {epochs} epoch{'s' if epochs != 1 else ''} of {n_train} images"):
        _run(["pretrain", "--data", pretrain_data, "--output", trained,
              *_pretrain_recipe(plan), "--epochs", epochs, *common], "pretrain")  # fmt: skip
    weights = {
        "trained": ["--weights", trained / "backbone.pth"],
        # the network the pretraining started from
        "random": ["--weights", "random", "--arch", plan.arch, "--patch-size", plan.patch_size, "--seed", plan.seed],
    }
    results: dict[str, dict] = {"trained": {}, "random": {}}
    evals = out / "eval"

    with stage("weighted k-NN (dinokit knn)"):
        for name, w in weights.items():
            run = evals / name / "knn"
            _run(["knn", *w, "--train", data / "classify" / "train", "--val", data / "classify" / "val",
                  "--resize", plan.image_size, "--image-size", plan.image_size, "--k", "10,20",
                  "--output", run, *fp32, *common], f"knn {name}")  # fmt: skip
            m = _read_json(run / "metrics.json")
            results[name]["knn"] = float(m["knn"]["20"]["top1"])

    with stage("linear probe on frozen features (dinokit linear --features-only)"):
        for name, w in weights.items():
            run = evals / name / "linear"
            _run(["linear", *w, "--train", data / "classify" / "train", "--val", data / "classify" / "val",
                  "--resize", plan.image_size, "--image-size", plan.image_size, "--features-only",
                  # the reference's probe of ViT-B: the last block's CLS token with the mean patch token
                  "--n-last-blocks", 1, "--avgpool-patch-tokens", "--epochs", 100, "--lr", 0.5, "--output", run, *fp32, *common], f"linear {name}")  # fmt: skip
            m = _read_json(run / "metrics.json")
            results[name]["linear"] = float(m["linear"]["top1"])  # the best epoch, as the protocol reports it

    with stage("attention maps and their Jaccard against the object masks (dinokit attn)"):
        for name, w in weights.items():
            run = evals / name / "attn-eval"
            _run(["attn", *w, "--images", data / "classify" / "val", "--masks", data / "classify" / "masks" / "val",
                  "--image-size", plan.image_size, "--output", run, *fp32, *common], f"attn eval {name}")  # fmt: skip
            results[name]["jaccard"] = float(_read_json(run / "metrics.json")["jaccard"])
            samples = sorted((data / "classify" / "val").rglob("*.png"))[::40][:4]
            _run(["attn", *[str(s) for s in samples], *w, "--image-size", plan.attn_picture_size,
                  "--output", evals / name / "attn-maps", *fp32, *common], f"attn maps {name}")  # fmt: skip

    with stage("video object segmentation by label propagation (dinokit davis)"):
        for name, w in weights.items():
            run = evals / name / "davis"
            _run(["davis", "--data", data / "video", *w, "--image-size", plan.video_size[0], "--visualize",
                  "--num-workers", 0, "--output", run, *fp32, *common], f"davis {name}")  # fmt: skip
            results[name]["davis"] = float(_read_json(run / "metrics.json")["J&F-Mean"])

    with stage("copy detection, Copydays protocol (dinokit copydetect)"):
        for name, w in weights.items():
            run = evals / name / "copydetect"
            _run(["copydetect", "--data", data / "copydays" / "copydays", *w,
                  "--distractors", data / "copydays" / "distractors", "--image-size", plan.copy_image_size,
                  "--output", run, *fp32, *common], f"copydetect {name}")  # fmt: skip
            results[name]["copydays"] = float(_read_json(run / "metrics.json")["mAP"]["strong"])

    with stage("near-duplicate search with the trained model (dinokit duplicates)"):
        _run(["duplicates", data / "copydays" / "copydays" / "strong",
              "--against", data / "copydays" / "copydays" / "original", *weights["trained"],
              "--image-size", plan.copy_image_size, "--min-similarity", 0.5, "--sheet-pairs", 8,
              "--output", evals / "trained" / "duplicates", *fp32, *common], "duplicates")  # fmt: skip

    with stage("report"):
        from .demo_report import compose_pictures, write_reports

        pictures = compose_pictures(out, evals)
        summary = {
            "results": results,
            "units": {"knn": "percent", "linear": "percent", "jaccard": "fraction", "davis": "fraction",
                      "copydays": "fraction"},
            "pretrain_epochs": epochs,
            "pretrain_losses": _pretrain_losses(trained),
            "out_dim": DEMO_OUT_DIM,
            "numerics": plan.numerics,
            "seconds": round(time.monotonic() - t_start, 1),
            "timings": plan.timings,
            "config": {k: str(v) for k, v in plan.__dict__.items() if k != "timings"},
            "versions": versions(),
        }
        write_json(out / "metrics.json", summary)
        write_reports(out, results, pictures, summary)
    return summary


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", rich_help_panel=RUN_PANEL, help="The demo's run folder.")],
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help=f"Pretraining epochs (default {DEMO_EPOCHS}, the fixed recipe)."),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            "--minutes", min=2.0,
            help="A time budget instead of the fixed recipe: the pretraining length is fitted to this "
            "machine's speed, so the numbers then depend on the machine and its load.",
        ),
    ] = None,
    arch: Annotated[str, typer.Option("--arch", help="Backbone to pretrain (vit_tiny keeps it quick).")] = "vit_tiny",
    per_class: Annotated[
        int, typer.Option("--per-class", min=4, help="Images per class in the built-in classification set.")
    ] = 100,
    seed: Annotated[
        int, typer.Option("--seed", help="The training seed: the initialisation and the augmentations.")
    ] = 0,
    data_seed: Annotated[
        int, typer.Option("--data-seed", help="The seed of the built-in data (part of the fixed recipe).")
    ] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Generate built-in data, pretrain a small ViT with DINO, and compare it with random init on every
    protocol of the paper; writes OUT/report.md and OUT/report.html. The default recipe is fixed and
    computes on two threads with pinned CPU kernels, so its numbers are the same on every run."""
    options = dict(locals())  # the parsed options by name, before any other local
    from ._console import setup_logging

    if epochs is not None and minutes is not None:
        raise DinokitError("Give --epochs or --minutes, not both: --minutes fits the number of epochs to a time budget.")
    setup_logging(quiet)
    out = prepare_output_dir(output, overwrite=overwrite)
    from dinokit.runtime import pin_cpu_numerics  # torch: only once the folder is taken

    # before anything computes: the kernels are chosen at the first tensor operation of the process
    numerics = pin_cpu_numerics(threads=DEMO_THREADS)
    plan = config_from(DemoPlan, options, output=out, threads=DEMO_THREADS, numerics=numerics)
    summary = run_demo(plan)
    from rich.table import Table

    from .demo_report import table_rows

    table = Table(title=f"dinokit demo ({summary['seconds'] / 60:.1f} min)")
    for col in ("metric", "random init", "DINO (this run)", "trained beats random", "paper (context)"):
        table.add_column(col)
    for row in table_rows(summary["results"]):
        table.add_row(*row)
    console.print(table)
    console.print(f"Report: {out / 'report.html'} and {out / 'report.md'}")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("demo")(demo)
