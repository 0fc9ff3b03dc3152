"""Pretraining throughput: `dinokit pretrain` against a reference-style plain loop and lightly's DINO.

All three train vit_tiny/16 on the same generated images with 2x224 + 2x96 crops, batch 16,
out_dim 4096 (bottleneck 256, hidden 2048), lr and weight decay on the same schedule:

- plain: the DINO reference's training loop as a first implementation writes it, eager: the
  reference's ViT, which forms attention explicitly (softmax of q k^T, then times v: dinokit's ViT
  with its fused attention switched off), per-parameter Python loops for clipping and the teacher
  EMA, a log-softmax per (teacher, student) pair, a `.item()` every step, dinokit's multi-crop
  pipeline (the reference's augmentations);
- lightly: lightly's DINO as its users write it (`DINOTransform`, `DINOProjectionHead`, `DINOLoss`,
  `update_momentum`, a timm ViT with `dynamic_img_size`, one forward per view, AdamW);
- dinokit: `dinokit.train.pretrain.pretrain` (its own choice of threads and data workers).

Each loop runs in fp32 and under bf16 autocast (dinokit: `--precision bf16`), for `--epochs` epochs;
images/s of the first epoch (set-up excluded, data loading and warm-up included) and of the later
ones (steady state) are reported separately, as `dinokit pretrain` logs them. The peers run with
each of `--peer-workers` data-loader workers and their faster variant counts. With `--repeats` the
loops alternate, and the ratios are given for every repeat. `--json` writes every figure.

    pip install -e .[bench]
    python benchmarks/pretrain_throughput.py [--images 128] [--epochs 3] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from dinokit.runtime import has_native_bf16, precision_name, resolve_precision
from dinokit.train.pretrain import PretrainConfig, pretrain
from dinokit.train.schedules import build_schedules

EPOCHS_OF_SCHEDULE = 100  # the schedules (lr warm-up, cosine) are those of a 100-epoch run


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


def autocast_for(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed_epochs(loader, epochs: int, step) -> list[float]:
    """images/s of each epoch: ``step(it, epoch, crops) -> batch size`` over the loader."""
    rates = []
    it = 0
    for epoch in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += step(it, epoch, batch)
            it += 1
        rates.append(n / (time.perf_counter() - t0))
    return rates


# ---------------------------------------------------------------------------------------------
# The reference-style plain loop
# ---------------------------------------------------------------------------------------------
class PlainDINO:
    """The DINO reference's training step as a first implementation writes it, eager, on ``device``:
    explicit attention as in the reference's ViT, per-parameter clipping and EMA loops, a log-softmax per (teacher, student) pair, a ``.item()``
    every step; ``precision`` fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler, as the
    reference trains on GPUs)."""

    def __init__(
        self,
        arch: str,
        out_dim: int,
        ncrops: int,
        niter_per_epoch: int,
        batch: int,
        device: torch.device,
        precision: str,
    ):
        torch.manual_seed(0)
        dim = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[arch]
        self.student = MultiCropWrapper(
            dinokit.build_backbone(arch, 16, drop_path_rate=0.1), DINOHead(dim, out_dim)
        )
        self.teacher = MultiCropWrapper(dinokit.build_backbone(arch, 16), DINOHead(dim, out_dim))
        self.teacher.load_state_dict(self.student.state_dict())
        for net in (self.student, self.teacher):  # the reference's ViT: attention formed explicitly
            net.backbone.set_fused_attention(False)
        self.student.to(device)
        self.teacher.to(device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
        no_decay = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
        self.opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, foreach=False
        )
        self.ncrops, self.device, self.precision = ncrops, device, precision
        self.center = torch.zeros(1, out_dim, device=device)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.sched = build_schedules(
            epochs=EPOCHS_OF_SCHEDULE, niter_per_epoch=niter_per_epoch, global_batch=batch, warmup_epochs=10
        )

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step(self, it: int, epoch: int, crops: list[torch.Tensor]) -> int:
        opt, student, teacher, sched = self.opt, self.student, self.teacher, self.sched
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        for pg in opt.param_groups:
            pg["lr"] = sched.lr[it]
        opt.param_groups[0]["weight_decay"] = sched.wd[it]
        with self.autocast():
            t_out = teacher(crops[:2]).float()
            s_out = student(crops).float()
        t_chunks = F.softmax((t_out - self.center) / 0.04, dim=-1).detach().chunk(2)
        s_chunks = (s_out / 0.1).chunk(self.ncrops)
        total, pairs = 0.0, 0
        for iq, q in enumerate(t_chunks):
            for v in range(self.ncrops):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
                pairs += 1
        loss = total / pairs
        self.center = self.center * 0.9 + t_out.detach().mean(dim=0, keepdim=True) * 0.1
        if not math.isfinite(loss.item()):
            raise RuntimeError("non-finite loss")
        opt.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                coef = 3.0 / (norm + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        if epoch < 1:
            for nme, p in student.named_parameters():
                if "last_layer" in nme:
                    p.grad = None
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        with torch.no_grad():
            m = float(sched.momentum[it])
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        return len(crops[0])


def plain_loop(
    data: Path, workers: int, batch: int, out_dim: int, epochs: int, precision: str
) -> list[float]:
    """The reference-style step over dinokit's multi-crop pipeline, on the CPU."""
    paths = find_images(data)
    model = PlainDINO("vit_tiny", out_dim, 4, len(paths) // batch, batch, torch.device("cpu"), precision)
    ds = MultiCropDataset(paths, MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 2, 224, 96), seed=0)
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate_multicrop,
        persistent_workers=workers > 0,
    )
    return timed_epochs(loader, epochs, lambda it, epoch, b: model.step(it, epoch, b[0]))


# ---------------------------------------------------------------------------------------------
# lightly's DINO, as its users write it
# ---------------------------------------------------------------------------------------------
class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def lightly_loop(
    data: Path, workers: int, batch: int, out_dim: int, epochs: int, precision: str
) -> list[float]:
    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform

    torch.manual_seed(0)

    class DINO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student_backbone = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, drop_path_rate=0.1
            )
            self.student_head = DINOProjectionHead(192, 2048, 256, out_dim, freeze_last_layer=1)
            self.teacher_backbone = copy.deepcopy(self.student_backbone)
            self.teacher_head = DINOProjectionHead(192, 2048, 256, out_dim)
            self.teacher_head.load_state_dict(self.student_head.state_dict())
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)

        def forward(self, x):
            return self.student_head(self.student_backbone(x).flatten(start_dim=1))

        def forward_teacher(self, x):
            return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    model = DINO()
    transform = DINOTransform(global_crop_size=224, local_crop_size=96, n_local_views=2)
    paths = find_images(data)
    loader = torch.utils.data.DataLoader(
        _FolderDataset(paths, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    criterion = DINOLoss(output_dim=out_dim, warmup_teacher_temp_epochs=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.04)
    sched = build_schedules(
        epochs=EPOCHS_OF_SCHEDULE, niter_per_epoch=len(paths) // batch, global_batch=batch, warmup_epochs=10
    )

    def step(it: int, epoch: int, views) -> int:
        for pg in optimizer.param_groups:
            pg["lr"] = sched.lr[it]
        m = float(sched.momentum[it])
        update_momentum(model.student_backbone, model.teacher_backbone, m=m)
        update_momentum(model.student_head, model.teacher_head, m=m)
        with autocast_for(precision):
            teacher_out = [model.forward_teacher(v) for v in views[:2]]
            student_out = [model.forward(v) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()
        return len(views[0])

    return timed_epochs(loader, epochs, step)


# ---------------------------------------------------------------------------------------------
# dinokit
# ---------------------------------------------------------------------------------------------
def dinokit_run(
    data: Path,
    out: Path,
    workers: int,
    batch: int,
    out_dim: int,
    epochs: int,
    precision: str,
    compile_model: bool = False,
) -> list[float]:
    cfg = PretrainConfig(
        data=str(data), output=str(out), arch="vit_tiny", patch_size=16, epochs=EPOCHS_OF_SCHEDULE,
        stop_after=epochs, batch_size=batch, out_dim=out_dim, local_crops=2, global_size=224, local_size=96,
        precision=precision, num_workers=workers, overwrite=True, compile=compile_model, save_every=0,
        warmup_epochs=10,
    )  # fmt: skip
    pretrain(cfg)
    used = json.loads((out / "config.json").read_text())
    print(
        f"  dinokit ran with {used['threads_used']} thread(s) and {used['num_workers_used']} data worker(s)"
    )
    return [json.loads(line)["images_per_second"] for line in (out / "log.jsonl").read_text().splitlines()]


def summary(rates: list[float]) -> dict[str, float]:
    return {"first": rates[0], "steady": float(np.mean(rates[1:])) if len(rates) > 1 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per loop: the first, then the steady state")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the loops this many times")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="dinokit's --num-workers"
    )
    ap.add_argument(
        "--peer-workers", default="0,2", help="data workers tried for the peers (the faster counts)"
    )
    ap.add_argument("--no-lightly", action="store_true", help="leave lightly out (not installed)")
    ap.add_argument("--compile", action="store_true", help="also time dinokit pretrain --compile")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every loop")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [p for p in args.precisions.split(",") if p]
    auto = precision_name(resolve_precision("auto", torch.device("cpu"), training=True))
    peer_workers = sorted({int(w) for w in args.peer_workers.split(",")}, reverse=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {has_native_bf16('cpu')}, "
          f"{args.images} images, {args.epochs} epochs per loop, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    loops = {"plain": plain_loop, **({} if args.no_lightly else {"lightly": lightly_loop})}
    figures: dict = {"args": vars(args) | {"json": str(args.json)}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        make_images(data, args.images)
        for rep in range(args.repeats):
            run: dict = {}
            for prec in precisions:
                for name, loop in loops.items():
                    best = None
                    for w in peer_workers:
                        s = summary(loop(data, w, args.batch_size, args.out_dim, args.epochs, prec))
                        print(
                            f"[{rep}] {name:8s} {prec} {w} workers: first {s['first']:6.2f}  steady {s['steady']:6.2f} images/s"
                        )
                        best = s if best is None else {k: max(best[k], s[k]) for k in s}
                    run[f"{name}_{prec}"] = best
                s = summary(
                    dinokit_run(
                        data,
                        Path(tmp) / "run",
                        args.workers,
                        args.batch_size,
                        args.out_dim,
                        args.epochs,
                        prec,
                    )
                )
                print(
                    f"[{rep}] dinokit  {prec}          : first {s['first']:6.2f}  steady {s['steady']:6.2f} images/s"
                )
                run[f"dinokit_{prec}"] = s
                if args.compile:
                    s = summary(
                        dinokit_run(
                            data,
                            Path(tmp) / "run_c",
                            args.workers,
                            args.batch_size,
                            args.out_dim,
                            args.epochs,
                            prec,
                            compile_model=True,
                        )
                    )
                    print(
                        f"[{rep}] dinokit --compile {prec}: first {s['first']:6.2f}  steady {s['steady']:6.2f} images/s"
                    )
                    run[f"dinokit_compile_{prec}"] = s
            ratios = {}
            for prec in precisions:  # the same precision on both sides
                for peer in loops:
                    for part in ("first", "steady"):
                        ratios[f"{prec}_vs_{peer}_{prec}_{part}"] = (
                            run[f"dinokit_{prec}"][part] / run[f"{peer}_{prec}"][part]
                        )
            if auto in precisions:  # what a user gets (--precision auto) against the goals' peers
                for peer, prec in (("plain", "fp32"), ("lightly", "bf16")):
                    if peer in loops and prec in precisions:
                        for part in ("first", "steady"):
                            ratios[f"auto_vs_{peer}_{prec}_{part}"] = (
                                run[f"dinokit_{auto}"][part] / run[f"{peer}_{prec}"][part]
                            )
            run["ratios"] = ratios
            figures["runs"].append(run)
            print(
                f"[{rep}] ratios, dinokit / peer (auto = dinokit's default, {auto} here; goals: auto_vs_plain_fp32 "
                ">= 2.2x, auto_vs_lightly_bf16 >= 1.6x):"
            )
            for k, v in ratios.items():
                print(f"[{rep}]   {k:34s} {v:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
