"""Throughput beside a busy program: `dinokit pretrain` on the demo's recipe and `dinokit features`
(ViT-S/16, fp32 and bf16), each alone and with one single-thread busy loop running beside it.

Each configuration runs as its own `dinokit` process (so that each makes its own choice of threads
and data workers, as a user's command does), alternating idle and busy, `--repeats` times; the
busy/idle ratio of every pair is printed (goal: >= 0.45 on a 2-core machine, where the free core
is half of the machine). `--threads N` passes `--threads N` to every command (the choice made by
hand, for comparison).

    python benchmarks/busy_machine.py [--repeats 2] [--images 64] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dinokit.commands.demo import DEMO_RECIPE, recipe_args
from PIL import Image

BUSY = "while True: pass"


def make_images(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(img).resize((size, size), Image.BILINEAR).save(root / f"{i:04d}.jpg", quality=90)


def dinokit(*args: str) -> str:
    cmd = [sys.executable, "-m", "dinokit", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def pretrain_rate(data: Path, out: Path, threads: list[str]) -> tuple[float, str]:
    """images/s of the last of two epochs of the demo's recipe, and the compute choice it logged."""
    log = dinokit("pretrain", "--data", str(data), "--output", str(out), "--overwrite", "--epochs", "2",
                  "--arch", "vit_tiny", "--patch-size", "16", "--batch-size", "32", "--global-size", "64",
                  "--local-size", "32", "--local-crops", "4", *recipe_args(DEMO_RECIPE),
                  "--num-workers", "1", "--save-every", "0", *threads)  # fmt: skip
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    choice = next((x.strip() for x in log.splitlines() if "compute thread" in x), "")
    return lines[-1]["images_per_second"], " ".join(choice.split())


def features_rate(data: Path, out: Path, n: int, precision: str, threads: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    log = dinokit("features", "--data", str(data), "--output", str(out), "--overwrite", "--weights", "random", "--arch", "vit_small",
                  "--batch-size", "16", "--precision", precision, *threads)  # fmt: skip
    choice = next((x.strip() for x in log.splitlines() if "compute thread" in x), "")
    return n / (time.perf_counter() - t), " ".join(choice.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="images for the pretraining epochs (96 px)")
    ap.add_argument("--feature-images", type=int, default=48, help="images for features (224 px)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, threads: {args.threads or 'dinokit chooses'}"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "small", args.images, 96)
        make_images(tmp / "large", args.feature_images, 256)
        jobs = {
            "pretrain (demo recipe)": lambda: pretrain_rate(tmp / "small", tmp / "run", threads),
            "features fp32": lambda: features_rate(
                tmp / "large", tmp / "f.pt", args.feature_images, "fp32", threads
            ),
            "features bf16": lambda: features_rate(
                tmp / "large", tmp / "f.pt", args.feature_images, "bf16", threads
            ),
        }
        for rep in range(args.repeats):
            for name, job in jobs.items():
                pair = {}
                for busy in (False, True) if rep % 2 == 0 else (True, False):
                    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
                    try:
                        time.sleep(1.0 if busy else 0.0)  # let the busy loop take its core
                        rate, choice = job()
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                    pair["busy" if busy else "idle"] = rate
                    pair["choice_busy" if busy else "choice_idle"] = choice
                ratio = pair["busy"] / pair["idle"]
                rows.append({"job": name, "repeat": rep, **pair, "ratio": ratio})
                print(f"[{rep}] {name:24s} idle {pair['idle']:6.2f}  busy {pair['busy']:6.2f} images/s  "
                      f"busy/idle {ratio:.2f}  (idle: {pair['choice_idle'] or '-'}; busy: {pair['choice_busy'] or '-'})",
                      flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
