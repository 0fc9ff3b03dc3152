"""DINO pretraining: self-distillation with no labels (Caron et al. 2021, Sec. 3 and Algorithm 1).

A student and a teacher (backbone + DINO head) see multi-crop views of unlabelled images; the
student learns to match the teacher's centred, sharpened output; the teacher is an EMA of the
student. :func:`pretrain` runs the whole loop on one CPU, one GPU, or many processes under
``torchrun`` (DistributedDataParallel), and keeps a run folder that can always be resumed.

Run folder: ``config.json``; ``checkpoint.pth`` (every epoch, and when stopped by a signal);
``checkpoint{epoch:04d}.pth`` every ``save_every`` epochs; ``backbone.pth`` (the teacher backbone
as a flat state dict, the released-weights format); ``log.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoints import read_checkpoint, save_backbone, save_checkpoint
from ..data.images import IMAGE_EXTENSIONS, find_images
from ..data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from ..errors import DataError, DinokitError
from ..io import append_jsonl, prepare_output_dir, write_json
from ..models.head import DINOHead, MultiCropWrapper
from ..models.registry import build_backbone, canonical_arch
from ..progress import NULL_PROGRESS, Progress
from ..runtime import (
    GracefulStop,
    autocast,
    barrier,
    cleanup_distributed,
    get_rng_state,
    init_distributed,
    is_dist,
    loader_workers,
    precision_name,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_rng_state,
)
from .loss import DINOLoss
from .optim import (
    OPTIMIZERS,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_parameter,
    ema_update,
    get_params_groups,
)
from .schedules import build_schedules

log = logging.getLogger("dinokit")

#: config fields a resumed run takes from the command line rather than from the saved config
RUNTIME_FIELDS = (
    "resume", "overwrite", "stop_after", "num_workers", "threads", "device", "compile", "output", "data",
)
#: settings chosen from the data when left unset
AUTO_FIELDS = ("out_dim", "momentum_teacher", "warmup_epochs", "global_scale")


@dataclass
class PretrainConfig:
    """Everything a DINO run needs; defaults are the paper's ViT recipe (spec "Schedules").

    ``out_dim``, ``momentum_teacher`` and ``warmup_epochs`` left as None are chosen from the data
    (see :func:`resolve_auto_settings`).
    """

    data: str | None = None
    output: str = "runs/pretrain"
    arch: str = "vit_small"
    patch_size: int = 16
    depth: int | None = None
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float | None = None
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float | None = None
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    out_dim: int | None = None
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    freeze_last_layer: int = 1
    clip_grad: float = 3.0
    clip_mode: str = "param"
    drop_path: float = 0.1
    optimizer: str = "adamw"
    local_crops: int = 8
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] = (0.05, 0.4)
    center_momentum: float = 0.9
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    num_workers: int = 4
    threads: int | None = None
    seed: int = 0
    save_every: int = 20
    stop_after: int | None = None
    resume: bool = False
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("global_scale", "local_scale"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass
class PretrainResult:
    output: Path
    epochs: int
    epochs_done: int
    finished: bool
    stopped_by: str | None
    exit_code: int
    loss: float | None
    images_per_second: float | None
    seconds: float
    n_images: int
    skipped_images: int
    world_size: int
    precision: str
    device: str
    settings: dict[str, Any] = field(default_factory=dict)
    collapsed_epochs: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.output / "checkpoint.pth"

    @property
    def backbone(self) -> Path:
        return self.output / "backbone.pth"


# ---------------------------------------------------------------------------------------------
# Settings that follow the data
# ---------------------------------------------------------------------------------------------
AUTO_RULE = (
    "Left unset, out_dim is the power of two nearest the number of images, between 1024 and 65536 "
    "(65536 from about 46k images); the teacher momentum is 0.996, lowered to 1 - 10/T (at least 0.99) "
    "when the run has fewer than T = 2500 iterations; the lr warm-up is 10 epochs, or a tenth of "
    "--epochs when that is fewer; the per-process batch is cut to fit a data set smaller than one "
    "global batch."
)


def auto_out_dim(n_images: int) -> int:
    return int(min(65536, max(1024, 2 ** round(math.log2(max(n_images, 1))))))


def auto_momentum_teacher(total_iterations: int) -> float:
    if total_iterations >= 2500:
        return 0.996
    return float(max(0.99, 1.0 - 10.0 / max(total_iterations, 1)))


def auto_warmup_epochs(epochs: int) -> float:
    return float(min(10.0, epochs / 10.0))


def resolve_auto_settings(cfg: PretrainConfig, n_images: int, world_size: int) -> tuple[PretrainConfig, list[str]]:
    """Fill the settings left as None from the data (rule: :data:`AUTO_RULE`); returns notes for the log."""
    notes = []
    cfg = dataclasses.replace(cfg)
    if cfg.batch_size * world_size > n_images:
        new = max(1, n_images // world_size)
        notes.append(f"batch size {cfg.batch_size} per process is more than the data set allows; using {new}")
        cfg.batch_size = new
    iters = n_images // (cfg.batch_size * world_size)
    if cfg.out_dim is None:
        cfg.out_dim = auto_out_dim(n_images)
        notes.append(f"out_dim {cfg.out_dim} for {n_images} images")
    if cfg.momentum_teacher is None:
        cfg.momentum_teacher = auto_momentum_teacher(iters * cfg.epochs)
        notes.append(f"teacher momentum {cfg.momentum_teacher:.4g} for {iters * cfg.epochs} iterations")
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = auto_warmup_epochs(cfg.epochs)
        notes.append(f"lr warm-up {cfg.warmup_epochs:g} epochs")
    if cfg.global_scale is None:
        cfg.global_scale = (0.4, 1.0) if cfg.local_crops > 0 else (0.14, 1.0)
    return cfg, notes


def validate_config(cfg: PretrainConfig) -> None:
    canonical_arch(cfg.arch)
    if cfg.epochs < 1:
        raise DinokitError("--epochs must be at least 1.")
    if cfg.warmup_epochs is not None and cfg.warmup_epochs > cfg.epochs:
        raise DinokitError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs {cfg.epochs}.")
    if cfg.local_crops < 0:
        raise DinokitError("--local-crops must be 0 or more.")
    if cfg.optimizer.lower() not in OPTIMIZERS:
        raise DinokitError(f"Unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if cfg.clip_mode not in ("param", "global"):
        raise DinokitError("--clip-mode must be 'param' or 'global'.")
    for name, scale in (("--global-scale", cfg.global_scale), ("--local-scale", cfg.local_scale)):
        if scale is not None and not (0 < scale[0] <= scale[1] <= 1):
            raise DinokitError(f"{name} must be two fractions 0 < min <= max <= 1, got {scale}.")
    if cfg.arch != "resnet50" and canonical_arch(cfg.arch) != "resnet50":
        for name, size in (("--global-size", cfg.global_size), ("--local-size", cfg.local_size)):
            if size < cfg.patch_size:
                raise DinokitError(f"{name} {size} is smaller than one {cfg.patch_size}-pixel patch.")
    if cfg.out_dim is not None and cfg.out_dim < 2:
        raise DinokitError("--out-dim must be at least 2.")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise DinokitError("--stop-after must be at least 1.")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _fp32_head(head: nn.Module) -> None:
    """Run the head outside autocast: its logits are divided by temperatures as low as 0.04, where
    bf16's 8-bit mantissa would visibly blur the targets. The head is a few percent of the compute."""
    inner = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return inner(x.float())

    head.forward = forward


def build_student_teacher(cfg: PretrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path) and teacher (same weights, no gradients), both backbone + DINO head."""
    kw = {} if cfg.depth is None else {"depth": int(cfg.depth)}
    student_bb = build_backbone(cfg.arch, cfg.patch_size, drop_path_rate=cfg.drop_path, **kw)
    teacher_bb = build_backbone(cfg.arch, cfg.patch_size, **kw)
    dim = student_bb.embed_dim
    student = MultiCropWrapper(
        student_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
    )
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """A DistributedSampler (shuffle, drop_last) cut to whole batches, able to start mid-epoch."""

    def __init__(self, dataset, world_size: int, rank: int, seed: int, batch_size: int):
        self.inner = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.iters = len(self.inner) // batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start_iteration

    def __iter__(self):
        idx = list(self.inner)[: self.iters * self.batch_size]
        return iter(idx[self.start * self.batch_size :])

    def __len__(self) -> int:
        return (self.iters - self.start) * self.batch_size


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, progress: Progress = NULL_PROGRESS) -> PretrainResult:
    """Run (or resume) DINO pretraining as ``cfg`` says; returns when the schedule ends, when
    ``stop_after`` epochs are done, or when SIGINT/SIGTERM arrives (after writing a checkpoint).

    Raises :class:`DinokitError` for bad input and for a non-finite loss (the last good
    checkpoint is kept).
    """
    validate_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    env = init_distributed(device)
    try:
        return _Run(cfg, device, env, progress if env.is_main else NULL_PROGRESS).run()
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise DinokitError(
            f"A data-loading worker died ({str(e).strip().splitlines()[0]}); {Path(cfg.output) / 'checkpoint.pth'} "
            "keeps the last saved state: continue with --resume (with --num-workers 0 if it happens again)."
        ) from e
    finally:
        cleanup_distributed()


class _Run:
    def __init__(self, cfg: PretrainConfig, device: torch.device, env, progress: Progress):
        self.cfg = cfg
        self.device = device
        self.env = env
        self.progress = progress
        self.out = Path(cfg.output)

    # -- set-up ---------------------------------------------------------------------------------
    def _prepare_output(self) -> dict | None:
        ckpt_path = self.out / "checkpoint.pth"
        if self.cfg.resume:
            if not ckpt_path.is_file():
                raise DinokitError(
                    f"There is no {ckpt_path} to resume from; start the run without --resume."
                )
            return read_checkpoint(ckpt_path)
        if ckpt_path.is_file() and not self.cfg.overwrite:
            raise DinokitError(
                f"{self.out} already holds a pretraining run; pass --resume to continue it or --overwrite "
                "to start again."
            )
        prepare_output_dir(self.out, overwrite=self.cfg.overwrite)
        if self.cfg.overwrite and self.env.is_main:
            (self.out / "log.jsonl").unlink(missing_ok=True)
        return None

    def run(self) -> PretrainResult:
        cfg, env, device = self.cfg, self.env, self.device
        if cfg.data is None:
            raise DataError("Give the image folder with --data.")
        data = Path(cfg.data).expanduser()
        if not data.is_dir():
            raise DataError(f"The data folder {data} does not exist.")
        paths = find_images(data)
        if not paths:
            raise DataError(
                f"The folder {data} holds no images (searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
            )
        if len(paths) < env.world_size:
            raise DataError(f"{len(paths)} images cannot be shared by {env.world_size} processes.")
        ckpt = self._prepare_output()
        barrier()
        if ckpt is not None:
            # settings chosen from the data stay as the run chose them, even if the folder changed
            saved = ckpt.get("config", {}) if isinstance(ckpt.get("config"), dict) else {}
            fill = {k: saved[k] for k in AUTO_FIELDS if getattr(cfg, k) is None and saved.get(k) is not None}
            cfg = PretrainConfig.from_dict({**cfg.to_dict(), **fill})
        cfg, notes = resolve_auto_settings(cfg, len(paths), env.world_size)
        if ckpt is not None:
            changed = [
                k for k, v in cfg.to_dict().items()
                if k not in RUNTIME_FIELDS and k in saved and saved[k] != v
            ]
            if changed:
                log.warning("resuming with settings that differ from the saved run: %s", ", ".join(changed))
        for n in notes:
            log.info("%s", n)
        self.cfg = cfg
        validate_config(cfg)

        if device.type == "cpu" and not cfg.threads:
            _warn_if_cpu_busy()
        dtype = resolve_precision(cfg.precision, device, training=True)
        self.dtype = dtype
        n_images = len(paths)
        world, rank = env.world_size, env.rank
        global_batch = cfg.batch_size * world
        iters = n_images // global_batch
        self.iters = iters

        # identical initial weights on every rank; then each rank its own random stream
        seed_everything(cfg.seed, 0)
        student, teacher = build_student_teacher(cfg)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        if has_bn and is_dist():
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        _fp32_head(student.head)
        _fp32_head(teacher.head)
        student.to(device).train()
        teacher.to(device).train()
        seed_everything(cfg.seed, rank)

        student_ddp: nn.Module = student
        if is_dist():
            student_ddp = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )
        student_fwd, teacher_fwd = student_ddp, teacher
        if cfg.compile:
            student_fwd = torch.compile(student_ddp)
            teacher_fwd = torch.compile(teacher)

        optimizer = build_optimizer(cfg.optimizer, get_params_groups(student))
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        ncrops = 2 + cfg.local_crops
        dino_loss = DINOLoss(
            cfg.out_dim,
            ncrops,
            cfg.warmup_teacher_temp,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.epochs,
            center_momentum=cfg.center_momentum,
        ).to(device)
        sched = build_schedules(
            epochs=cfg.epochs,
            niter_per_epoch=iters,
            global_batch=global_batch,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_epochs=cfg.warmup_epochs,
            weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end,
            momentum_teacher=cfg.momentum_teacher,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
        )

        start_epoch, start_it, partial = 0, 0, None
        if ckpt is not None:
            try:
                student.load_state_dict(ckpt["student"])
                teacher.load_state_dict(ckpt["teacher"])
                optimizer.load_state_dict(ckpt["optimizer"])
                dino_loss.load_state_dict(ckpt["dino_loss"])
            except (KeyError, RuntimeError, ValueError) as e:
                raise DinokitError(
                    f"{self.out / 'checkpoint.pth'} does not fit this run's settings ({str(e).splitlines()[0]})."
                ) from e
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            saved_iters = ckpt.get("iterations_per_epoch")
            if saved_iters is not None and int(saved_iters) != iters:
                log.warning(
                    "the run had %d iterations per epoch and now has %d (other data or process count): the "
                    "schedules continue from the same epoch but no longer match the original run",
                    int(saved_iters), iters,
                )
            start_epoch = int(ckpt["epoch"])
            start_it = int(ckpt.get("iteration", 0))
            partial = ckpt.get("partial")
            rng = ckpt.get("rng")
            if isinstance(rng, list) and len(rng) == world:
                set_rng_state(rng[rank])
            else:
                seed_everything(cfg.seed + 7919 * (start_epoch * max(iters, 1) + start_it), rank)
            log.info("resuming %s at epoch %d, step %d", self.out, start_epoch + 1, start_it)

        info = {
            **cfg.to_dict(),
            "n_images": n_images,
            "world_size": world,
            "global_batch": global_batch,
            "iterations_per_epoch": iters,
            "precision_used": precision_name(dtype),
            "device_used": str(device),
        }
        if env.is_main:
            write_json(self.out / "config.json", info)

        transform = MultiCropAugmentation(
            cfg.global_scale, cfg.local_scale, cfg.local_crops, cfg.global_size, cfg.local_size
        )
        dataset = MultiCropDataset(paths, transform, seed=cfg.seed)
        sampler = EpochSampler(dataset, world, rank, cfg.seed, cfg.batch_size)

        self.student, self.teacher, self.optimizer, self.scaler = student, teacher, optimizer, scaler
        self.dino_loss, self.sched = dino_loss, sched
        last_layer_params = [p for n, p in student.named_parameters() if "last_layer" in n]
        s_params = list(student.parameters())
        t_params = list(teacher.parameters())
        all_params = [p for p in student.parameters() if p.requires_grad]

        num_workers = loader_workers(cfg.num_workers, device, world)
        if num_workers < cfg.num_workers:
            log.info(
                "%d data-loader worker(s) instead of %d: %s",
                num_workers, cfg.num_workers,
                "the compute threads use every core" if num_workers == 0 else "no more cores are free",
            )  # fmt: skip
        history: list[dict] = []
        collapsed: list[int] = []
        total_skipped = 0
        t_run = time.perf_counter()
        stopped_by: str | None = None
        exit_code = 0
        end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        check_every = 1 if device.type == "cpu" else 10
        ln_k = math.log(cfg.out_dim)
        epoch = start_epoch
        epochs_done = start_epoch

        with GracefulStop() as stop:
            for epoch in range(start_epoch, end_epoch):
                it0 = start_it if epoch == start_epoch else 0
                dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, it0)
                t_epoch = time.perf_counter()
                loader = torch.utils.data.DataLoader(
                    dataset,
                    batch_size=cfg.batch_size,
                    sampler=sampler,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                    drop_last=True,
                    collate_fn=collate_multicrop,
                    generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
                    worker_init_fn=_leave_signals_to_main if num_workers > 0 else None,
                )
                losses = torch.zeros(iters, dtype=torch.float32)
                if partial and epoch == start_epoch:
                    prev = partial
                else:
                    prev = {"seconds": 0.0, "images": 0, "skipped": 0, "losses": []}
                if prev.get("losses"):
                    losses[: len(prev["losses"])] = torch.as_tensor(prev["losses"], dtype=torch.float32)
                loss_dev = torch.zeros(iters, device=device)
                skipped = int(prev.get("skipped", 0))
                images = int(prev.get("images", 0))
                task = self.progress.task(f"epoch {epoch + 1}/{cfg.epochs}", total=iters - it0)
                last_ui = 0.0
                it = it0
                done_steps = it0
                for it, (crops, n_skipped) in enumerate(_start_loader(loader), start=it0):
                    skipped += n_skipped
                    if crops is None:
                        raise DataError(f"No readable image was found in {data}; every image failed to decode.")
                    step = epoch * iters + it
                    vals = sched.at(step, epoch)
                    for i, pg in enumerate(optimizer.param_groups):
                        pg["lr"] = vals["lr"]
                        if i == 0:
                            pg["weight_decay"] = vals["wd"]
                    crops = [c.to(device, non_blocking=True) for c in crops]
                    with autocast(device, dtype):
                        with torch.no_grad():
                            teacher_output = teacher_fwd(crops[:2])
                        student_output = student_fwd(crops)
                    loss = dino_loss(student_output, teacher_output, epoch)
                    loss_dev[it] = loss.detach()

                    if (it - it0) % check_every == 0 or it == iters - 1:
                        flags = torch.stack(
                            [(~torch.isfinite(loss.detach())).float(), torch.tensor(float(stop.requested), device=device)]
                        )
                        if is_dist():
                            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                        nonfinite, stop_now = (bool(v) for v in flags.tolist())
                        if nonfinite:
                            raise DinokitError(
                                f"The loss became {loss.item()} at epoch {epoch + 1}, step {it + 1}; the run stopped and "
                                f"{self.out / 'checkpoint.pth'} keeps the last good state (lower --lr, raise "
                                "--clip-grad protection, or use --precision fp32)."
                            )
                    else:
                        stop_now = False

                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    if cfg.clip_grad and cfg.clip_grad > 0:
                        if cfg.clip_mode == "global":
                            clip_gradients_global(all_params, cfg.clip_grad)
                        else:
                            clip_gradients_per_parameter(all_params, cfg.clip_grad)
                    cancel_last_layer_gradients(last_layer_params, epoch, cfg.freeze_last_layer)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    ema_update(t_params, s_params, vals["momentum"])

                    images += len(crops[0]) * world
                    done_steps = it + 1
                    now = time.perf_counter()
                    if now - last_ui > 1.0 or it == iters - 1:
                        last_ui = now
                        el = prev["seconds"] + now - t_epoch
                        task.advance(
                            1,
                            loss=float(loss.item()),
                            lr=vals["lr"],
                            mom=vals["momentum"],
                            t_temp=vals["teacher_temp"],
                            img_s=images / max(el, 1e-9),
                        )
                    else:
                        task.advance(1)
                    if stop_now or (stop.requested and not is_dist()):
                        stopped_by = signal.Signals(stop.signum).name if stop.signum else "signal"
                        exit_code = stop.exit_code
                        break
                task.close()
                seconds = prev["seconds"] + time.perf_counter() - t_epoch
                losses[it0:done_steps] = loss_dev[it0:done_steps].float().cpu()
                if is_dist():
                    red = torch.tensor([float(skipped)], device=device)
                    torch.distributed.all_reduce(red)
                    skipped_all = int(red.item())
                else:
                    skipped_all = skipped
                epoch_complete = done_steps == iters
                if stopped_by is not None and not epoch_complete:
                    self._save(epoch, done_steps, {
                        "seconds": seconds, "images": images, "skipped": skipped,
                        "losses": losses[:done_steps].tolist(),
                    })
                    epochs_done = epoch
                    break
                total_skipped += skipped_all
                epoch_losses = losses[:iters]
                if is_dist():
                    epoch_losses = epoch_losses.to(device)
                    torch.distributed.all_reduce(epoch_losses)
                    epoch_losses = (epoch_losses / world).cpu()
                mean_loss = float(epoch_losses.mean()) if iters else float("nan")
                last = sched.at(epoch * iters + iters - 1, epoch)
                line = {
                    "epoch": epoch + 1,
                    "loss": mean_loss,
                    "lr": last["lr"],
                    "wd": last["wd"],
                    "momentum": last["momentum"],
                    "teacher_temp": last["teacher_temp"],
                    "images_per_second": images / max(seconds, 1e-9),
                    "seconds": seconds,
                    "skipped_images": skipped_all,
                }
                if iters and bool(((epoch_losses - ln_k).abs() < 0.05 * max(1.0, ln_k / 10)).all()):
                    collapsed.append(epoch + 1)
                    line["collapsed"] = True
                    log.warning(
                        "the loss stayed at ln(out_dim) = %.3f for all of epoch %d: the outputs have collapsed to "
                        "uniform; try a lower --teacher-temp, more epochs of warm-up, or a larger data set",
                        ln_k, epoch + 1,
                    )
                if skipped_all:
                    log.warning("epoch %d skipped %d unreadable images", epoch + 1, skipped_all)
                history.append(line)
                self._save(epoch + 1, 0, None)
                if env.is_main:
                    append_jsonl(self.out / "log.jsonl", line)
                    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                        save_checkpoint(self._last_ckpt, self.out / f"checkpoint{epoch + 1:04d}.pth")
                self._last_ckpt = None
                epochs_done = epoch + 1
                self.progress.log(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {mean_loss:.4f}  lr {last['lr']:.3g}  "
                    f"momentum {last['momentum']:.5f}  teacher temp {last['teacher_temp']:.3g}  "
                    f"{line['images_per_second']:.1f} images/s  {seconds:.1f} s"
                )
                if stopped_by is None and self._agree(stop.requested):
                    stopped_by = signal.Signals(stop.signum).name if stop.signum else "signal"
                    exit_code = stop.exit_code
                if stopped_by is not None:
                    break
        barrier()
        finished = epochs_done >= cfg.epochs
        if stopped_by is None and not finished:
            stopped_by = "stop-after"
        return PretrainResult(
            output=self.out,
            epochs=cfg.epochs,
            epochs_done=epochs_done,
            finished=finished,
            stopped_by=stopped_by,
            exit_code=exit_code,
            loss=history[-1]["loss"] if history else None,
            images_per_second=(float(np.mean([h["images_per_second"] for h in history])) if history else None),
            seconds=time.perf_counter() - t_run,
            n_images=n_images,
            skipped_images=total_skipped,
            world_size=world,
            precision=precision_name(dtype),
            device=str(device),
            settings={k: getattr(cfg, k) for k in ("out_dim", "momentum_teacher", "warmup_epochs", "batch_size")},
            collapsed_epochs=collapsed,
            history=history,
        )

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so (one tiny all-reduce under torchrun)."""
        if not is_dist():
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, epoch: int, iteration: int, partial: dict | None) -> None:
        """Write checkpoint.pth (and backbone.pth) atomically on rank 0; every rank's RNG state goes in."""
        rng = get_rng_state()
        if is_dist():
            states: list = [None] * self.env.world_size
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        self._last_ckpt = None
        if not self.env.is_main:
            return
        ckpt = {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": self.dino_loss.state_dict(),
            "epoch": int(epoch),
            "iteration": int(iteration),
            "global_step": int(epoch * self.iters + iteration),
            "iterations_per_epoch": int(self.iters),
            "world_size": int(self.env.world_size),
            "partial": partial,
            "config": self.cfg.to_dict(),
            "rng": states,
            "arch": canonical_arch(self.cfg.arch),
            "patch_size": int(self.cfg.patch_size),
            "format": "dinokit-pretrain-1",
        }
        save_checkpoint(ckpt, self.out / "checkpoint.pth")
        save_backbone(self.teacher.backbone, self.out / "backbone.pth")
        self._last_ckpt = ckpt


def _warn_if_cpu_busy() -> None:
    """Several threads per process on a machine already busier than its cores wait on each other
    far more than they compute; one thread is then much faster."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return
    cores = os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load > 1.5 * cores:
        log.warning(
            "the machine is busy (load %.1f on %d cores); --threads 1 is likely to train faster here", load, cores
        )


def _start_loader(loader):
    """Start the loader's workers with SIGINT/SIGTERM blocked, so that a signal sent to the whole
    process group between a worker's fork and its ``worker_init_fn`` cannot kill it; the workers then
    ignore both and unblock, and the main process gets any pending signal as soon as it unblocks."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _leave_signals_to_main(worker_id: int) -> None:
    """Data workers ignore Ctrl-C and SIGTERM (also when sent to the whole process group): the main
    process finishes the step, saves, and shuts them down; they also exit when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started blocked by _start_loader; pending ones are dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def resume_hint(output: str | os.PathLike) -> str:
    return f"dinokit pretrain --output {output} --resume"
