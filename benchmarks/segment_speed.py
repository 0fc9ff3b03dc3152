"""Speed of ``dinokit segment`` against the same recipe written as a plain PyTorch loop, side by side.

    python benchmarks/segment_speed.py [--iterations 20] [--arch vit_small] [--patch-size 14]
                                       [--image-size 224] [--batch-size 4] [--threads 2] [--device cpu]

Both train the linear head (frozen random ViT, Dropout2d + BatchNorm + 1x1 conv, AdamW with the
warm-up/cosine schedule, rescale/crop/flip/photometric augmentation) on the same ``synth segment``
data for the same iterations and evaluate it with the same sliding window on the same val images:

* dinokit: :func:`dinokit.eval.segmentation.run_segmentation` (checked inputs, the run skeleton,
  checkpoints, label PNGs and pictures written);
* plain loop: a DataLoader of the same augmented samples, the backbone under no_grad, the head, the
  loss, the optimiser step; evaluation by the official slide_inference as a plain double loop.

It prints training iterations/s and evaluation images/s of each, their ratios, and the processor.
Keep the default run short (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinokit.checkpoints import load_backbone
from dinokit.data.images import read_image
from dinokit.data.seg_transforms import eval_input, train_sample
from dinokit.data.segmentation import load_splits
from dinokit.data.synth_segment import make_segment_dataset
from dinokit.eval.segmentation import SegmentConfig, run_segmentation
from dinokit.runtime import describe_runtime


def plain_loop(args, train, val) -> tuple[float, float]:
    """The recipe as a plain loop: (training seconds, evaluation seconds)."""
    torch.manual_seed(0)
    model = load_backbone("random", args.arch, args.patch_size).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dim, k = model.embed_dim, len(train.classes)
    head = torch.nn.Sequential(torch.nn.Dropout2d(0.1), torch.nn.BatchNorm2d(dim), torch.nn.Conv2d(dim, k, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return args.iterations * args.batch_size

        def __getitem__(self, i):
            s = train.samples[i % len(train.samples)]
            return train_sample(
                np.random.default_rng(i), read_image(s.image).image, train.read_labels(s), args.image_size
            )

    loader = torch.utils.data.DataLoader(Samples(), batch_size=args.batch_size, shuffle=True)
    warm = max(1, round(args.iterations * 1500 / 40000))
    start = time.perf_counter()
    head.train()
    for it, (x, y) in enumerate(loader):
        lr = 1e-3 * (min(1.0, (it + 1) / warm)) * (math.cos(math.pi * (it + 1) / args.iterations) + 1) / 2
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            t = model.get_intermediate_layers(x, 1)[0][:, 1:]
            p = args.patch_size
            feats = t.transpose(1, 2).reshape(x.shape[0], dim, x.shape[2] // p, x.shape[3] // p)
        logits = F.interpolate(head(feats), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start
    head.eval()
    start = time.perf_counter()
    crop, stride = args.image_size, args.image_size * 2 // 3
    with torch.no_grad():
        for s in val.samples:
            x = eval_input(read_image(s.image).image, args.image_size)[None]
            labels = val.read_labels(s)
            H, W = x.shape[-2:]
            out, count = torch.zeros(1, k, H, W), torch.zeros(1, 1, H, W)
            for y1 in range(0, max(H - crop + stride - 1, 0) // stride + 1):
                for x1 in range(0, max(W - crop + stride - 1, 0) // stride + 1):
                    ye, xe = min(y1 * stride + crop, H), min(x1 * stride + crop, W)
                    ys, xs = max(ye - crop, 0), max(xe - crop, 0)
                    c = x[:, :, ys:ye, xs:xe]
                    t = model.get_intermediate_layers(c, 1)[0][:, 1:]
                    f = t.transpose(1, 2).reshape(
                        1, dim, c.shape[2] // args.patch_size, c.shape[3] // args.patch_size
                    )
                    out[:, :, ys:ye, xs:xe] += F.interpolate(head(f), size=c.shape[-2:], mode="bilinear")
                    count[:, :, ys:ye, xs:xe] += 1
            F.interpolate(out / count, size=labels.shape, mode="bilinear")[0].argmax(0)
    return train_s, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--val", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_segment_dataset(Path(tmp) / "data", layout="folder", classes=3, train=16, val=args.val,
                                    size=320).root  # fmt: skip
        train, val = load_splits(data, "folder")
        cfg = SegmentConfig(output=Path(tmp) / "run", data=data, dataset="folder", weights="random", arch=args.arch,
                            patch_size=args.patch_size, iterations=args.iterations, batch_size=args.batch_size,
                            image_size=args.image_size, threads=args.threads, device=args.device,
                            precision="fp32", pictures=0)  # fmt: skip
        ours = run_segmentation(cfg)
        plain_train, plain_eval = plain_loop(args, train, val)
    info = describe_runtime()
    rows = {
        "dinokit": {"train_it_per_s": args.iterations / ours.train_seconds, "eval_img_per_s": args.val / ours.eval_seconds},
        "plain loop": {"train_it_per_s": args.iterations / plain_train, "eval_img_per_s": args.val / plain_eval},
    }  # fmt: skip
    print(
        f"processor: {info['cpu']} ({info['cpu_count']} cores), {args.threads} threads, torch {info['torch']}"
    )
    print(f"{args.arch}/{args.patch_size}, crop {args.image_size}, batch {args.batch_size}, {args.iterations} "
          f"iterations, {args.val} val images of 320 px (fp32)")  # fmt: skip
    for name, r in rows.items():
        print(
            f"  {name:>10}: training {r['train_it_per_s']:.2f} it/s, evaluation {r['eval_img_per_s']:.2f} images/s"
        )
    ratio_t = rows["dinokit"]["train_it_per_s"] / rows["plain loop"]["train_it_per_s"]
    ratio_e = rows["dinokit"]["eval_img_per_s"] / rows["plain loop"]["eval_img_per_s"]
    print(f"  dinokit / plain: training {ratio_t:.2f}x, evaluation {ratio_e:.2f}x")
    print(json.dumps({"processor": info["cpu"], "threads": args.threads, **rows}))


if __name__ == "__main__":
    main()
