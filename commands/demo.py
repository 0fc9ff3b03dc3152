"""``dinokit demo``: the whole paper in miniature on a laptop CPU, with nothing to download.

It generates the built-in data (``dinokit synth``), pretrains a small ViT with DINO for a fixed
number of epochs (a fixed recipe: the same numbers on every run and every machine of a kind; a time
budget is an option), then evaluates the trained model and the same model at random init side by side with the
paper's protocols (k-NN, linear probe, attention Jaccard, DAVIS J&F on synthetic videos, Copydays
``strong`` mAP) and the linear segmentation probe of DINOv2/v3 (mIoU on synthetic scenes) and writes ``report.md`` and ``report.html`` with the table and pictures. Every
step is an ordinary dinokit command whose run folder stays in the output for inspection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import click
import typer

from dinokit.errors import DinokitError
from dinokit.io import prepare_output_dir, versions, write_json

from ._console import console, console_err
from ._options import RUN_PANEL, Overwrite, Quiet
from ._runs import stop_reported_by, typed_options

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
    segment_train: int = 48
    segment_val: int = 16
    segment_size: int = 96
    segment_iterations: int = 300
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
        raise DinokitError(
            f"The demo step '{what}' failed (dinokit {' '.join(map(str, args[:1]))} exited {code})."
        )


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
            console_err.rule(
                f"[bold]demo {self.i}/{self.total}[/]  {title}  ({elapsed / 60:.1f} min elapsed)"
            )
        elif not self.plan.quiet:  # a log: one plain line, not a rule as wide as the page
            console_err.print(
                f"== demo {self.i}/{self.total}: {title} ({elapsed / 60:.1f} min elapsed)", highlight=False
            )
        return _Timer(self.plan.timings, title)


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc):
        # a resumed demo adds this invocation's seconds of a step to those its earlier ones spent
        self.timings[self.name] = round(self.timings.get(self.name, 0.0) + time.monotonic() - self.t, 1)


def _step_flags(plan: DemoPlan) -> list[str]:
    """The flags of every step: --quiet as asked, and --overwrite always, since the demo owns its
    folder and a step cut off by a stop runs again from its start into its own sub-folder."""
    return [*(["--quiet"] if plan.quiet else []), "--overwrite"]


#: what a demo records of itself in its folder, so that ``--resume`` continues it: the options it
#: started with and every finished step's results
STATE_FILE = "demo-state.json"
#: the plan's fields that are the demo's options (a resumed demo keeps them)
OPTION_FIELDS = ("minutes", "arch", "per_class", "seed", "data_seed", "epochs")


class DemoState:
    """The finished steps of one demo (``OUT/demo-state.json``, rewritten atomically after each step)
    and the seconds its invocations have spent, so that a demo stopped anywhere is finished by
    ``dinokit demo --output OUT --resume`` with the numbers of an uninterrupted run: finished steps
    are not run again, a stopped pretraining resumes from its checkpoint (exactly), and a step cut
    off in the middle runs again from its start."""

    def __init__(
        self,
        path: Path,
        options: dict,
        steps: dict | None = None,
        seconds: float = 0.0,
        timings: dict | None = None,
    ):
        self.path, self.options, self.steps, self.seconds_before = path, options, steps or {}, seconds
        self.timings: dict[str, float] = timings or {}  #: seconds per step over all invocations
        self.t0 = time.monotonic()

    @classmethod
    def begin(cls, plan: DemoPlan) -> DemoState:
        return cls(plan.output / STATE_FILE, {k: getattr(plan, k) for k in OPTION_FIELDS})

    @classmethod
    def load(cls, out: Path) -> DemoState:
        path = out / STATE_FILE
        if not path.is_file():
            raise DinokitError(
                f"There is no stopped demo in {out} to resume (no {STATE_FILE}); start one with "
                f"dinokit demo --output {out}."
            )
        data = _read_json(path)
        return cls(
            path, data["options"], data.get("steps"), float(data.get("seconds", 0.0)), data.get("timings")
        )

    def seconds(self) -> float:
        """Seconds spent by this demo over all its invocations."""
        return self.seconds_before + time.monotonic() - self.t0

    def get(self, step: str):
        return self.steps.get(step)

    def done(self, step: str, value=True):
        self.steps[step] = value
        self.save()
        return value

    def save(self) -> None:
        write_json(self.path, {"options": self.options, "steps": self.steps, "seconds": round(self.seconds(), 1),
                               "timings": self.timings})  # fmt: skip


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
        [
            "pretrain",
            "--data",
            calib_data,
            "--output",
            run,
            *_pretrain_recipe(plan),
            "--epochs",
            "1",
            "--quiet",
        ],
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


#: the evaluation steps' time in pretraining epochs of the same machine: the default demo's
#: evaluations of two models (seed 1, idle 2-core AMD EPYC) took 71.6 s against 22.7 s per
#: pretraining epoch, 3.2 epochs; the estimate and the time budget use it
EVAL_EPOCHS = 3.5
#: the README's time for the default demo on an idle 2-core CPU (minutes), which the estimate compares with
README_MINUTES = 6.0


def _plan_length(plan: DemoPlan, state: DemoState, data: Path, stage) -> int:
    """The pretraining epochs: the fixed recipe's, or as many as fit --minutes; prints the estimate of
    the whole demo measured on this machine (a warning when it is far above the README's)."""
    known = state.get("length")
    if known:
        return int(known["epochs"])
    n_train = sum(1 for _ in (data / "classify" / "train").rglob("*.png"))
    with stage("measuring this machine's speed (a 64-image pretraining epoch)"):
        epoch_seconds = _calibrate_pretrain(plan, data / "classify" / "train") * n_train
    if plan.minutes is None:
        epochs = plan.epochs or DEMO_EPOCHS
    else:  # the budget left once the evaluations are paid for
        left = plan.minutes * 60.0 - state.seconds()
        epochs = int(max(1, min(300, (left - EVAL_EPOCHS * epoch_seconds) / (1.1 * epoch_seconds))))
    estimate = state.seconds() + (epochs + EVAL_EPOCHS) * epoch_seconds
    if not plan.quiet:
        console_err.print(
            f"This machine: about {epoch_seconds:.0f} s per pretraining epoch; the demo should take about "
            f"{estimate / 60:.1f} min in all ({epochs} epochs).", highlight=False)  # fmt: skip
        if plan.minutes is None and estimate > 2 * README_MINUTES * 60:
            console_err.print(
                f"[yellow]Warning:[/] that is far above the README's {README_MINUTES:.0f} minutes: this machine "
                "is busy or slow. The numbers will be the same, only later; --minutes fits a shorter run to a "
                "budget (its numbers then depend on the machine), and Ctrl-C stops a demo that --resume finishes.")  # fmt: skip
    return int(state.done("length", {"epochs": epochs, "epoch_seconds": round(epoch_seconds, 2)})["epochs"])


class _Budget:
    """--minutes as a bound on the whole demo: the pretraining is stopped (cleanly, as by SIGTERM, with
    its checkpoint and backbone written) when its share of the budget is spent, and evaluation steps
    that would start after the budget are not run (the report says so)."""

    def __init__(self, plan: DemoPlan, state: DemoState):
        self.plan, self.state, self.spent = plan, state, False

    def left(self) -> float | None:
        return None if self.plan.minutes is None else self.plan.minutes * 60.0 - self.state.seconds()

    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    @contextlib.contextmanager
    def pretraining(self, epoch_seconds: float) -> Iterator[None]:
        left = self.left()
        if left is None or not hasattr(signal, "setitimer"):
            yield
            return
        seconds = max(1.0, left - EVAL_EPOCHS * epoch_seconds)

        def on_alarm(signum, frame):
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.setitimer(signal.ITIMER_REAL, 0.5)  # the run's graceful stop is not listening yet
                return
            self.spent = True
            os.kill(os.getpid(), signal.SIGTERM)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _pretrain_step(
    plan: DemoPlan, state: DemoState, budget: _Budget, pretrain_data: Path, epochs: int
) -> int:
    """Pretrain (or resume the stopped pretraining); returns the epochs done."""
    trained = plan.output / "pretrain"
    if state.get("pretrain") is None:
        go_on = ["--resume"] if (trained / "checkpoint.pth").is_file() else ["--overwrite"]
        with (
            budget.pretraining(state.get("length")["epoch_seconds"]),
            stop_reported_by(lambda by: _say_pretraining_stopped(plan, budget, by)),
        ):
            try:
                _run(["pretrain", "--data", pretrain_data, "--output", trained, *_pretrain_recipe(plan),
                      "--epochs", epochs, *go_on, *(["--quiet"] if plan.quiet else [])], "pretrain")  # fmt: skip
            except SystemExit as e:  # stopped by a signal: the demo's budget goes on, Ctrl-C stops the demo
                if not (budget.spent and e.code == 128 + int(signal.SIGTERM)):
                    raise
        done = _read_json(trained / "metrics.json").get("epochs_done", epochs)
        state.done("pretrain", {"epochs_done": done, "stopped_by_budget": budget.spent})
    return int(state.get("pretrain")["epochs_done"])


def _say_pretraining_stopped(plan: DemoPlan, budget: _Budget, stopped_by: str | None) -> None:
    if budget.spent:
        console_err.print("The pretraining ended where the time budget (--minutes) left the evaluations their "
                          "share; its checkpoint is the model evaluated.", highlight=False)  # fmt: skip


def _eval_step(plan: DemoPlan, state: DemoState, budget: _Budget, key: str, run_one) -> None:
    """One evaluation step for both models, unless already done (a resumed demo) or the budget is spent."""
    if state.get(key) is not None:
        return
    if budget.over():
        state.done(key, {"skipped": "time budget (--minutes) spent"})
        return
    state.done(key, {name: run_one(name) for name in ("trained", "random")})


def run_demo(plan: DemoPlan, state: DemoState | None = None) -> dict:
    out = plan.output
    data = out / "data"
    state = state or DemoState.begin(plan)
    plan.timings = state.timings  # one dict: the steps' seconds are kept with the finished steps
    state.save()
    budget = _Budget(plan, state)
    stage = _Stages(plan, total=10)
    common = _step_flags(plan)
    fp32 = ["--precision", "fp32"]

    with stage("built-in data: dinokit synth classify / video / copydays"):
        if state.get("data") is None:
            _make_data(plan, data, common)
            state.done("data")

    pretrain_data = data / "classify" / "train"
    n_train = sum(1 for _ in pretrain_data.rglob("*.png"))
    epochs = _plan_length(plan, state, data, stage)
    plan.timings["pretrain_epochs"] = epochs

    trained = out / "pretrain"
    with stage(
        f"dinokit pretrain: {plan.arch}/{plan.patch_size}, {epochs} epoch{'s' if epochs != 1 else ''} of {n_train} images"
    ):
        epochs_done = _pretrain_step(plan, state, budget, pretrain_data, epochs)
    weights = {
        "trained": ["--weights", trained / "backbone.pth"],
        # the network the pretraining started from
        "random": [
            "--weights",
            "random",
            "--arch",
            plan.arch,
            "--patch-size",
            plan.patch_size,
            "--seed",
            plan.seed,
        ],
    }
    evals = out / "eval"
    steps = _eval_steps(plan, data, evals, weights, common, fp32)
    for key, (title, run_one) in steps.items():
        with stage(title):
            _eval_step(plan, state, budget, key, run_one)

    with stage("report"):
        results: dict[str, dict] = {"trained": {}, "random": {}}
        skipped = {}
        for key in ("knn", "linear", "jaccard", "davis", "copydays", "segment"):
            got = state.get(key) or {}
            if "skipped" in got:
                skipped[key] = got["skipped"]
                continue
            for name in results:
                results[name][key] = got[name]
        from .demo_report import compose_pictures, write_reports  # PIL: only when the report is drawn

        pictures = compose_pictures(out, evals)
        summary = {
            "results": results,
            "units": {"knn": "percent", "linear": "percent", "jaccard": "fraction", "davis": "fraction",
                      "copydays": "fraction", "segment": "percent"},
            "pretrain_epochs": epochs,
            "pretrain_epochs_done": epochs_done,
            "pretrain_losses": _pretrain_losses(trained),
            "collapsed_epochs": _read_json(trained / "metrics.json").get("collapsed_epochs", []),
            "out_dim": DEMO_OUT_DIM,
            "skipped": skipped,
            "fixed_recipe": plan.minutes is None and (plan.epochs or DEMO_EPOCHS) == DEMO_EPOCHS
            and plan.per_class == 100 and plan.data_seed == 0 and plan.arch == "vit_tiny",
            "numerics": plan.numerics,
            "seconds": round(state.seconds(), 1),
            "timings": plan.timings,
            "config": {k: str(v) for k, v in plan.__dict__.items() if k != "timings"},
            "versions": versions(),
        }  # fmt: skip
        write_json(out / "metrics.json", summary)
        write_reports(out, results, pictures, summary)
        state.done("report")
    return summary


def _make_data(plan: DemoPlan, data: Path, common: list[str]) -> None:
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
    _run(["synth", "segment", "--output", data / "segment", "--train", plan.segment_train, "--val", plan.segment_val,
          "--image-size", plan.segment_size, "--style", "simple", "--seed", plan.data_seed, *common],
         "synth segment")  # fmt: skip


def _eval_steps(
    plan: DemoPlan, data: Path, evals: Path, weights: dict, common: list[str], fp32: list[str]
) -> dict:
    """The evaluation steps by result key: (title, a function of the model's name -> its result)."""

    def knn(name):
        run = evals / name / "knn"
        _run(["knn", *weights[name], "--train", data / "classify" / "train", "--val", data / "classify" / "val",
              "--resize", plan.image_size, "--image-size", plan.image_size, "--k", "10,20",
              "--output", run, *fp32, *common], f"knn {name}")  # fmt: skip
        return float(_read_json(run / "metrics.json")["knn"]["20"]["top1"])

    def linear(name):
        run = evals / name / "linear"
        _run(["linear", *weights[name], "--train", data / "classify" / "train", "--val", data / "classify" / "val",
              "--resize", plan.image_size, "--image-size", plan.image_size, "--features-only",
              # the reference's probe of ViT-B: the last block's CLS token with the mean patch token
              "--n-last-blocks", 1, "--avgpool-patch-tokens", "--epochs", 100, "--lr", 0.5, "--output", run,
              *fp32, *common], f"linear {name}")  # fmt: skip
        return float(
            _read_json(run / "metrics.json")["linear"]["top1"]
        )  # the best epoch, as the protocol reports it

    def jaccard(name):
        run = evals / name / "attn-eval"
        _run(["attn", *weights[name], "--images", data / "classify" / "val", "--masks",
              data / "classify" / "masks" / "val", "--image-size", plan.image_size, "--output", run, *fp32,
              *common], f"attn eval {name}")  # fmt: skip
        samples = sorted((data / "classify" / "val").rglob("*.png"))[::40][:4]
        _run(["attn", *[str(s) for s in samples], *weights[name], "--image-size", plan.attn_picture_size,
              "--output", evals / name / "attn-maps", *fp32, *common], f"attn maps {name}")  # fmt: skip
        return float(_read_json(run / "metrics.json")["jaccard"])

    def davis(name):
        run = evals / name / "davis"
        _run(["davis", "--data", data / "video", *weights[name], "--image-size", plan.video_size[0], "--visualize",
              "--num-workers", 0, "--output", run, *fp32, *common], f"davis {name}")  # fmt: skip
        return float(_read_json(run / "metrics.json")["J&F-Mean"])

    def copydays(name):
        run = evals / name / "copydetect"
        _run(["copydetect", "--data", data / "copydays" / "copydays", *weights[name],
              "--distractors", data / "copydays" / "distractors", "--image-size", plan.copy_image_size,
              "--output", run, *fp32, *common], f"copydetect {name}")  # fmt: skip
        if name == "trained":
            _run(["duplicates", data / "copydays" / "copydays" / "strong",
                  "--against", data / "copydays" / "copydays" / "original", *weights["trained"],
                  "--image-size", plan.copy_image_size, "--min-similarity", 0.5, "--sheet-pairs", 8,
                  "--output", evals / "trained" / "duplicates", *fp32, *common], "duplicates")  # fmt: skip
        return float(_read_json(run / "metrics.json")["mAP"]["strong"])

    def segment(name):
        run = evals / name / "segment"
        _run(["segment", "--data", data / "segment", "--dataset", "folder", *weights[name],
              # a few hundred iterations need a larger lr than the official 1e-3 made for 40,000
              "--iterations", plan.segment_iterations, "--batch-size", 8, "--lr", 1e-2, "--image-size", plan.segment_size,
              "--pictures", 2, "--output", run, *fp32, *common], f"segment {name}")  # fmt: skip
        # the dense features themselves, fitted over a few validation scenes
        scenes = sorted((data / "segment" / "val" / "images").glob("*"))[:4]
        _run(["patches", *[str(s) for s in scenes], *weights[name], "--image-size", plan.segment_size,
              "--parts", 4, "--output", evals / name / "patches", *fp32, *common], f"patches {name}")  # fmt: skip
        return float(_read_json(run / "metrics.json")["segmentation"]["mIoU"])

    return {
        "knn": ("weighted k-NN (dinokit knn)", knn),
        "linear": ("linear probe on frozen features (dinokit linear --features-only)", linear),
        "jaccard": ("attention maps and their Jaccard against the object masks (dinokit attn)", jaccard),
        "davis": ("video object segmentation by label propagation (dinokit davis)", davis),
        "copydays": (
            "copy detection, Copydays protocol, and near-duplicate search (dinokit copydetect, duplicates)",
            copydays,
        ),
        "segment": (
            "linear segmentation of patch features, and their pictures (dinokit segment, patches)",
            segment,
        ),
    }


def demo(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", rich_help_panel=RUN_PANEL, help="The demo's run folder.")
    ],
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs", min=1, help=f"Pretraining epochs (default {DEMO_EPOCHS}, the fixed recipe)."
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            "--minutes",
            min=2.0,
            help="A time budget instead of the fixed recipe: the pretraining length is fitted to this "
            "machine's speed, so the numbers then depend on the machine and its load.",
        ),
    ] = None,
    arch: Annotated[
        str, typer.Option("--arch", help="Backbone to pretrain (vit_tiny keeps it quick).")
    ] = "vit_tiny",
    per_class: Annotated[
        int, typer.Option("--per-class", min=4, help="Images per class in the built-in classification set.")
    ] = 100,
    seed: Annotated[
        int, typer.Option("--seed", help="The training seed: the initialisation and the augmentations.")
    ] = 0,
    data_seed: Annotated[
        int, typer.Option("--data-seed", help="The seed of the built-in data (part of the fixed recipe).")
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            rich_help_panel=RUN_PANEL,
            help="Finish a demo that was stopped (Ctrl-C, SIGTERM) in --output: finished steps are kept, "
            "a stopped pretraining continues from its checkpoint, and the numbers are those of an "
            "uninterrupted run.",
        ),
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Generate built-in data, pretrain a small ViT with DINO, and compare it with random init on every
    protocol of the paper; writes OUT/report.md and OUT/report.html. The default recipe is fixed and
    computes on two threads with pinned CPU kernels, so its numbers are the same on every run."""
    if epochs is not None and minutes is not None:
        raise DinokitError(
            "Give --epochs or --minutes, not both: --minutes fits the number of epochs to a time budget."
        )
    if resume and overwrite:
        raise DinokitError("Give --resume or --overwrite, not both: --resume finishes the demo in the folder, "
                           "--overwrite starts a new one over it.")  # fmt: skip
    options = {"minutes": minutes, "arch": arch, "per_class": per_class, "seed": seed, "data_seed": data_seed,
               "epochs": epochs}  # fmt: skip
    out = prepare_output_dir(output, overwrite=overwrite, resume=resume)
    state = None
    if resume:
        state = DemoState.load(out)
        typed = typed_options(ctx) & set(options)
        differ = sorted(k for k in typed if state.options.get(k) != options[k])
        if differ:
            k = differ[0]
            raise DinokitError(
                f"The demo in {out} was started with --{k.replace('_', '-')} {state.options.get(k)}; resume it "
                "without changing its options, or start another in a new folder."
            )
        options = {**options, **state.options}
    from dinokit.runtime import pin_cpu_numerics

    from ._console import setup_logging

    setup_logging(quiet)
    # before anything computes: the kernels are chosen at the first tensor operation of the process
    numerics = pin_cpu_numerics(threads=DEMO_THREADS)
    plan = DemoPlan(
        output=out, quiet=quiet, overwrite=overwrite, threads=DEMO_THREADS, numerics=numerics, **options
    )
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_demo(plan, state)
    except (KeyboardInterrupt, click.exceptions.Abort, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) else 130
        if isinstance(e, SystemExit) and code not in (130, 143):
            raise
        console_err.print(f"Stopped; the finished steps are kept. Resume with: dinokit demo --output {out} --resume",
                          highlight=False)  # fmt: skip
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    from rich.table import Table

    from .demo_report import table_rows

    table = Table(title=f"dinokit demo ({summary['seconds'] / 60:.1f} min)")
    for col in ("metric", "random init", "DINO (this run)", "trained beats random", "paper (context)"):
        table.add_column(col)
    for row in table_rows(summary["results"]):
        table.add_row(*row)
    console.print(table)
    console.print(f"Report: {out / 'report.html'} and {out / 'report.md'}")


def _raise_interrupt(signum, frame):
    """SIGTERM outside a training step stops the demo as Ctrl-C does (a training step stops cleanly on its own)."""
    raise SystemExit(128 + signum)


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("demo")(demo)
