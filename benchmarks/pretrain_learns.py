"""Does `dinokit pretrain` learn? A vit_tiny pretrained for a few minutes on `dinokit synth classify`
data against the same model at random init, on weighted k-NN top-1 (the paper's 20-NN, T = 0.07).

Two set-ups (``--recipe``):

- ``short`` (default), what `dinokit demo` runs: the learnable built-in set (`dinokit synth classify
  --style simple --class-colour 0.7 --class-texture 1.0 --background grey`: flat shapes whose
  colours and patterns correlate with the class, as real classes' do, on one shared grey) and the
  demo's recipe for a few hundred steps (`DEMO_RECIPE`: lr 5e-3, out_dim 256, teacher momentum 0.99,
  teacher temperature 0.04, weight decay 0.04);
- ``paper``: the fully cluttered default set (class = shape only) and the paper's recipe scaled by
  dinokit's small-folder rules. Minutes of DINO on a CPU stay near chance there.

Labels are used only by the k-NN evaluation, never by pretraining.

    python benchmarks/pretrain_learns.py [--recipe short|paper] [--minutes 5] [--seed 0] [--threads 1]
    python benchmarks/pretrain_learns.py --weights RUN/backbone.pth     # evaluate a finished run only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from dinokit.commands.demo import DEMO_RECIPE

import dinokit
from dinokit.data.images import ImageDataset, scan_labelled_folder
from dinokit.data.transforms import eval_transform
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_classify
from dinokit.train.pretrain import PretrainConfig, pretrain


class TimeBudget:
    """Progress sink that stops the run (as Ctrl-C would) once the budget is spent."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.sent = False

    def task(self, description, total=None):
        outer = self

        class _Task:
            def advance(self, n=1, **fields):
                if not outer.sent and time.monotonic() > outer.deadline:
                    outer.sent = True
                    os.kill(os.getpid(), signal.SIGINT)

            def update(self, **fields):
                pass

            def close(self):
                pass

        return _Task()

    def log(self, message):
        print(message, flush=True)


def knn_top1(model, data: Path, size: int) -> float:
    train = scan_labelled_folder(data / "train")
    val = scan_labelled_folder(data / "val", classes=train.classes)
    tf = eval_transform(resize=size, crop=size)
    f_tr, _ = extract_features(model, ImageDataset(train.paths, train.targets, tf), batch_size=64)
    f_va, _ = extract_features(model, ImageDataset(val.paths, val.targets, tf), batch_size=64)
    res = knn_classify(
        f_tr, torch.tensor(train.targets), f_va, torch.tensor(val.targets), ks=[20], temperature=0.07
    )
    return res[20][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=("short", "paper"), default="short")
    ap.add_argument(
        "--data", type=Path, default=None, help="a labelled train/ + val/ folder (default: generated)"
    )
    ap.add_argument("--output", type=Path, default=Path("runs/bench_pretrain_learns"))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--global-size", type=int, default=64)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="base lr at batch 256 (default: the recipe's)")
    ap.add_argument("--also", type=Path, default=None, help="another backbone.pth to evaluate the same way")
    ap.add_argument(
        "--weights", type=Path, default=None, help="evaluate this backbone instead of pretraining one"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy shared machine)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=None, help="k-NN image size (default: --global-size)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_size = args.eval_size or args.global_size
    short = args.recipe == "short"

    data = args.data or args.output / f"classify-{args.recipe}-seed{args.seed}"
    if not (data / "train").is_dir():
        style = (
            ["--style", "simple", "--class-colour", "0.7", "--class-texture", "1.0", "--background", "grey"]
            if short
            else []
        )
        cmd = [sys.executable, "-m", "dinokit", "synth", "classify", "--output", str(data), "--classes", "10",
               "--per-class", "100", "--image-size", "96", "--seed", str(args.seed), *style]  # fmt: skip
        subprocess.run(cmd, check=True)
    recipe = dict(DEMO_RECIPE) if short else dict(lr=5e-4)
    if args.lr is not None:
        recipe["lr"] = args.lr

    figures: dict = {}
    if args.weights is None:
        cfg = PretrainConfig(
            data=str(data / "train"),
            output=str(args.output / "run"),
            arch="vit_tiny",
            patch_size=args.patch_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            global_size=args.global_size,
            local_size=args.local_size,
            local_crops=4,
            precision="auto",
            num_workers=args.workers,
            overwrite=True,
            save_every=0,
            seed=args.seed,
            threads=args.threads,
            **recipe,
        )
        t0 = time.perf_counter()
        result = pretrain(cfg, TimeBudget(args.minutes * 60))
        minutes = (time.perf_counter() - t0) / 60
        print(
            f"pretrained {result.epochs_done} of {result.epochs} epochs in {minutes:.1f} min "
            f"({result.precision}, stopped by {result.stopped_by or 'end of schedule'}), last loss {result.loss}"
        )
        weights = result.backbone
        figures.update(recipe=args.recipe, seed=args.seed, minutes=minutes, epochs_done=result.epochs_done,
                       precision=result.precision)  # fmt: skip
    else:
        weights = args.weights

    trained = dinokit.load_backbone(weights)
    torch.manual_seed(0)
    random_model = dinokit.load_backbone("random", arch="vit_tiny", patch_size=trained.patch_size)
    figures["random_init_knn20_top1"] = knn_top1(random_model, data, eval_size)
    figures["pretrained_knn20_top1"] = knn_top1(trained, data, eval_size)
    figures["weights"] = str(weights)
    if args.also is not None and args.also.is_file():
        figures["also_knn20_top1"] = knn_top1(dinokit.load_backbone(args.also), data, eval_size)
        figures["also"] = str(args.also)
    print(json.dumps(figures, indent=2))
    print(
        f"pretrained beats random init: {figures['pretrained_knn20_top1'] > figures['random_init_knn20_top1']}"
    )


if __name__ == "__main__":
    main()
