"""Peak memory of ``dinokit segment``'s sliding-window evaluation of one Cityscapes-size image on a CPU.

    python benchmarks/segment_memory.py [--width 2048] [--height 1024] [--arch vit_small] [--patch-size 14]
                                        [--image-size 512] [--classes 19] [--threads 2]

A random ViT-S/14 and a linear head of 19 classes segment a 2048x1024 photograph as ``dinokit
segment`` evaluates a val image (the shorter side resized to --image-size, windows of --image-size
every 2/3 of it, the logits brought back to 2048x1024 and the arg max taken). Each setting runs in a
fresh process; the peak resident memory (ru_maxrss) of the whole process is printed, Python, torch
and the model included. The goal: under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from dinokit.checkpoints import load_backbone
    from dinokit.data.seg_transforms import eval_input
    from dinokit.eval.seg_head import SegmentationHead, predict_labels

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_backbone("random", args.arch, args.patch_size).eval()
    head = SegmentationHead(model.embed_dim, args.classes).eval()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8))
    start = time.perf_counter()
    x = eval_input(photo, args.image_size)[None]
    pred = predict_labels(
        model, head, x, (args.height, args.width), args.image_size, args.image_size * 2 // 3, 1
    )
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"image_size": args.image_size, "input": list(x.shape[-2:]), "prediction": list(pred.shape),
                      "peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 2)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--image-size", type=int, nargs="+", default=[224, 512, 1024])
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.image_size = args.image_size[0]
        child(args)
        return
    from dinokit.runtime import describe_runtime

    print(f"processor: {describe_runtime()['cpu']}, {args.threads} threads; {args.arch}/{args.patch_size}, "
          f"{args.classes} classes, a {args.width}x{args.height} image")  # fmt: skip
    for size in args.image_size:
        cmd = [sys.executable, __file__, "--child", "--image-size", str(size), "--width", str(args.width),
               "--height", str(args.height), "--arch", args.arch, "--patch-size", str(args.patch_size),
               "--classes", str(args.classes), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        verdict = "under" if r["peak_rss_mb"] < 4096 else "OVER"
        print(f"  --image-size {size}: input {r['input'][1]}x{r['input'][0]}, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({verdict} 4 GB), {r['seconds']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
