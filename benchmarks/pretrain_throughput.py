"""Throughput of `dinokit pretrain` against a plain fp32 eager loop of the same DINO recipe.

Both train vit_tiny/16 for one epoch of 128 images with 2x224 + 2x96 crops, batch 16, out_dim 4096,
on the same generated images and the same multi-crop pipeline. The plain loop is what a first
implementation looks like: fp32, per-parameter Python loops for clipping and the teacher EMA, a
log-softmax per (teacher, student) pair, a `.item()` every step; it runs with the requested data
workers and with none, and the ratio is taken to the faster of the two. images/s counts the epoch's images
over its wall time (data loading and the first step included), as `dinokit pretrain` logs it.

    python benchmarks/pretrain_throughput.py [--images 128] [--workers 2] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dinokit
from dinokit.data.images import find_images
from dinokit.data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from dinokit.models.head import DINOHead, MultiCropWrapper
from dinokit.runtime import has_native_bf16
from dinokit.train.pretrain import PretrainConfig, pretrain
from dinokit.train.schedules import build_schedules


def make_images(root: Path, n: int, size: int = 256) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = rng.integers(0, 255, 3)
        img = np.zeros((size, size, 3), np.float32) + base
        for _ in range(4):  # a few coloured discs on a tinted background
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(20, 80))]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg", quality=90)


def plain_loop(data: Path, workers: int, batch: int, out_dim: int) -> float:
    """The same recipe, written the straightforward way, in fp32 eager mode."""
    torch.manual_seed(0)
    student_bb = dinokit.build_backbone("vit_tiny", 16, drop_path_rate=0.1)
    teacher_bb = dinokit.build_backbone("vit_tiny", 16)
    student = MultiCropWrapper(student_bb, DINOHead(192, out_dim))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(192, out_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    decay = [p for n, p in student.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, foreach=False)
    ncrops = 4
    center = torch.zeros(1, out_dim)
    paths = find_images(data)
    ds = MultiCropDataset(paths, MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 2, 224, 96), seed=0)
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                         collate_fn=collate_multicrop)
    iters = len(paths) // batch
    sched = build_schedules(epochs=100, niter_per_epoch=iters, global_batch=batch, warmup_epochs=10)
    t0 = time.perf_counter()
    n = 0
    for it, (crops, _) in enumerate(loader):
        for pg in opt.param_groups:
            pg["lr"] = sched.lr[it]
        opt.param_groups[0]["weight_decay"] = sched.wd[it]
        t_out = teacher(crops[:2])
        s_out = student(crops)
        t_chunks = F.softmax((t_out - center) / 0.04, dim=-1).detach().chunk(2)
        s_chunks = (s_out / 0.1).chunk(ncrops)
        total, pairs = 0.0, 0
        for iq, q in enumerate(t_chunks):
            for v in range(ncrops):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
                pairs += 1
        loss = total / pairs
        center = center * 0.9 + t_out.detach().mean(dim=0, keepdim=True) * 0.1
        if not math.isfinite(loss.item()):
            raise RuntimeError("non-finite loss")
        opt.zero_grad()
        loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                coef = 3.0 / (norm + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        for nme, p in student.named_parameters():
            if "last_layer" in nme:
                p.grad = None
        opt.step()
        with torch.no_grad():
            m = float(sched.momentum[it])
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        n += len(crops[0])
    return n / (time.perf_counter() - t0)


def dinokit_run(data: Path, out: Path, workers: int, batch: int, out_dim: int, compile_model: bool) -> tuple[float, str]:
    cfg = PretrainConfig(
        data=str(data), output=str(out), arch="vit_tiny", patch_size=16, epochs=100, stop_after=1,
        batch_size=batch, out_dim=out_dim, local_crops=2, global_size=224, local_size=96, precision="auto",
        num_workers=workers, overwrite=True, compile=compile_model, save_every=0,
    )
    result = pretrain(cfg)
    line = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return line["images_per_second"], result.precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--compile", action="store_true", help="also time dinokit pretrain --compile")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both loops")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {has_native_bf16('cpu')}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        make_images(data, args.images)
        # the plain loop with the requested workers, and with the data loaded in the main process
        # (what dinokit does when the compute threads take every core): the ratio is to the faster
        plain = 0.0
        for w in sorted({args.workers, 0}, reverse=True):
            ips = plain_loop(data, w, args.batch_size, args.out_dim)
            print(f"plain fp32 eager loop, {w} workers: {ips:7.2f} images/s")
            plain = max(plain, ips)
        fast, prec = dinokit_run(data, Path(tmp) / "run", args.workers, args.batch_size, args.out_dim, False)
        print(f"dinokit pretrain ({prec:4s})        : {fast:7.2f} images/s   ratio {fast / plain:.2f}x (goal 1.5x, aim 2x)")
        if args.compile:
            comp, prec = dinokit_run(data, Path(tmp) / "run_c", args.workers, args.batch_size, args.out_dim, True)
            print(f"dinokit pretrain --compile      : {comp:7.2f} images/s   ratio {comp / plain:.2f}x (compile time included)")


if __name__ == "__main__":
    main()
