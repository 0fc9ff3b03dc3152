"""Where a photo's time goes, per image, in this process's CPU milliseconds: decoding (in full, and at
the reduced scale dinokit uses), the evaluation transform from each, and a ViT-S/16 forward (batch
16) of dinokit in fp32 and bf16 and of timm in fp32 and under bf16 autocast. Uses the pictures that
benchmarks/photos.py made (run it first); the figures explain its ratios.

    python benchmarks/photo_parts.py [--work /tmp/dinokit-photos-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import timm
import torch
from PIL import Image

from dinokit.data.images import read_image
from dinokit.data.transforms import decode_need, eval_transform
from dinokit.models import build_backbone
from dinokit.runtime import inference_model


def cost(fn, reps: int = 1) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call of ``fn``, averaged over ``reps``."""
    t, w = time.process_time(), time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps, (time.perf_counter() - w) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp") / "dinokit-photos-bench")
    args = ap.parse_args()
    tf = eval_transform()
    need = decode_need(tf)
    print("load", os.getloadavg())
    for folder in sorted(args.work.glob("phone-*")) + sorted(args.work.glob("small-*")):
        paths = sorted(folder.glob("*.jpg"))[:8]
        full = [Image.open(p).convert("RGB") for p in paths]
        reduced = [read_image(p, need).image for p in paths]
        c_full = statistics.mean(cost(lambda p=p: Image.open(p).convert("RGB"))[0] for p in paths)
        c_red = statistics.mean(cost(lambda p=p: read_image(p, need))[0] for p in paths)
        r_full = statistics.mean(cost(lambda i=i: tf(i))[0] for i in full)
        r_red = statistics.mean(cost(lambda i=i: tf(i))[0] for i in reduced)
        print(
            f"{folder.name}: decode in full {1000 * c_full:.0f}, reduced {1000 * c_red:.0f}; transform from the "
            f"full picture {1000 * r_full:.0f}, from the reduced one {1000 * r_red:.0f} (CPU ms per image)"
        )
    x = torch.randn(16, 3, 224, 224)
    torch.manual_seed(0)
    ours = build_backbone("vit_small", 16).eval()
    ours16, _ = inference_model(ours, torch.bfloat16)
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()

    def autocast_timm():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return theirs(x)

    with torch.inference_mode():
        for label, f in (
            ("dinokit fp32", lambda: ours(x)),
            ("dinokit bf16 (weights cast once)", lambda: ours16(x)),
            ("timm fp32", lambda: theirs(x)),
            ("timm bf16 autocast", autocast_timm),
        ):
            f()
            runs = [cost(f) for _ in range(3)]
            print(
                f"{label}: {1000 * min(c for c, _ in runs) / 16:.0f} CPU ms, {1000 * min(w for _, w in runs) / 16:.0f} "
                f"wall ms per image (best of 3, {torch.get_num_threads()} threads)"
            )
    print("load", os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
