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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import save_backbone, save_checkpoint
from ..data.images import IMAGE_EXTENSIONS, data_fingerprint, find_images
from ..data.loader import DecodeAheadLoader, prefetch_threads
from ..data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop, count_new_unreadable
from ..errors import DataError, DinokitError
from ..io import append_jsonl, run_identity
from ..models.registry import canonical_arch
from ..progress import NULL_PROGRESS, Progress
from ..run import RunKind, RunOutcome, TrainingRun
from ..runtime import (
    GracefulStop,
    barrier,
    ensure_finite_loss,
    get_rng_state,
    is_dist,
    precision_name,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_rng_state,
)
from .dino import DINOTrainingState, build_student_teacher, build_training_state, dino_step
from .loop import (
    EpochSampler,
    EpochTally,
    leave_signals_to_main,
    loss_failure_message,
    numbered_checkpoint,
    start_loader,
)
from .pretrain_settings import (
    AUTO_FIELDS,
    AUTO_RULE,
    RUNTIME_FIELDS,
    PretrainConfig,
    auto_momentum_teacher,
    auto_out_dim,
    auto_warmup_epochs,
    resolve_auto_settings,
    settings_for_run,
    validate_config,
)
from .schedules import build_schedules

__all__ = [
    "AUTO_FIELDS",
    "AUTO_RULE",
    "PRETRAIN_RUN",
    "RUNTIME_FIELDS",
    "DINOTrainingState",
    "EpochSampler",
    "PretrainConfig",
    "PretrainResult",
    "PretrainRun",
    "auto_momentum_teacher",
    "auto_out_dim",
    "auto_warmup_epochs",
    "build_student_teacher",
    "build_training_state",
    "dino_step",
    "epoch_summary",
    "is_collapsed",
    "pretrain",
    "resolve_auto_settings",
    "resume_hint",
    "settings_for_run",
    "validate_config",
]

log = logging.getLogger("dinokit")

#: the files a pretraining run writes: a fresh run in the same folder (--overwrite) removes an
#: earlier run's before it writes anything, and nothing else of the folder
RUN_FILES = (
    "config.json",
    "checkpoint.pth",
    "checkpoint[0-9][0-9][0-9][0-9].pth",
    "backbone.pth",
    "log.jsonl",
    "metrics.json",
)
#: config fields that do not make a run another run: where and how it runs now, and how long it goes on
NOT_IDENTITY = (*RUNTIME_FIELDS, "epochs", "save_every", "checkpoint_minutes", "precision")
#: a pretraining run's folder, to the run skeleton
PRETRAIN_RUN = RunKind(
    command="pretrain", noun="pretraining run", files=RUN_FILES, formats=("dinokit-pretrain-1",),
    keys=("config", "epoch"), unit="epoch",
    may_change=frozenset({"data", "epochs", "save_every", "precision", "device", "num_workers", "compile", "strict",
                          "exact_decode"}),
)  # fmt: skip


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
    cpu_plan: dict[str, Any] | None = None
    collapsed_epochs: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    #: the trained student, teacher, optimiser and loss (not written anywhere; for callers and tests)
    state: DINOTrainingState | None = field(default=None, repr=False, compare=False)

    @property
    def checkpoint(self) -> Path:
        return self.output / "checkpoint.pth"

    @property
    def backbone(self) -> Path:
        return self.output / "backbone.pth"


# ---------------------------------------------------------------------------------------------
# The epoch summary
# ---------------------------------------------------------------------------------------------
def is_collapsed(epoch_losses: torch.Tensor, out_dim: int) -> bool:
    """True when the loss stayed at ln(out_dim) for the whole epoch: the teacher's outputs are uniform
    (the collapse that centring and sharpening must balance, Sec. 5.3)."""
    ln_k = math.log(out_dim)
    return bool(len(epoch_losses)) and bool(((epoch_losses - ln_k).abs() < 0.05 * max(1.0, ln_k / 10)).all())


def epoch_summary(
    epoch: int,
    epoch_losses: torch.Tensor,
    end_values: dict[str, float],
    tally: EpochTally,
    skipped: int,
    out_dim: int,
) -> dict[str, Any]:
    """The ``log.jsonl`` line of a finished epoch (``epoch`` counted from 0; the line from 1), with
    the collapse check; ``end_values`` are the schedules at its last iteration."""
    line = {
        "epoch": epoch + 1,
        "loss": float(epoch_losses.mean()) if len(epoch_losses) else float("nan"),
        "lr": end_values["lr"],
        "wd": end_values["wd"],
        "momentum": end_values["momentum"],
        "teacher_temp": end_values["teacher_temp"],
        "images_per_second": tally.images / max(tally.seconds, 1e-9),
        "seconds": tally.seconds,
        "skipped_images": skipped,
    }
    if is_collapsed(epoch_losses, out_dim):
        line["collapsed"] = True
        log.warning(
            "the loss stayed at ln(out_dim) = %.3f for all of epoch %d: the outputs have collapsed to "
            "uniform; try a lower --teacher-temp, more epochs of warm-up, or a larger data set",
            math.log(out_dim), epoch + 1,
        )  # fmt: skip
    if skipped:
        log.warning("epoch %d skipped %d unreadable images", epoch + 1, skipped)
    return line


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def pretrain(
    cfg: PretrainConfig, progress: Progress = NULL_PROGRESS, explicit: set[str] | None = None
) -> PretrainResult:
    """Run (or resume) DINO pretraining as ``cfg`` says; returns when the schedule ends, when
    ``stop_after`` epochs of it are done, or when SIGINT/SIGTERM arrives (after writing a checkpoint).
    Writes the run folder, ``metrics.json`` included. The result's ``state`` is the trained
    :class:`DINOTrainingState`.

    ``explicit`` names the options the user typed (the CLI passes them): a resumed run takes the rest
    from its saved config; ``None`` (a library call) means every field of ``cfg`` that is not None
    is asked for. Raises :class:`DinokitError` for bad input, a changed recipe on resume, and a
    non-finite loss (the last good checkpoint is kept).
    """
    validate_config(cfg)
    device = resolve_device(cfg.device)
    with TrainingRun(PRETRAIN_RUN, cfg.output, cfg, device) as run:
        fields = [f.name for f in dataclasses.fields(PretrainConfig)]
        cfg = PretrainConfig.from_dict(run.resumed_config(cfg.to_dict(), explicit, fields))
        if cfg.data is None:
            raise DataError("Give the image folder with --data (or --resume to continue a run).")
        run.plan_threads(cfg.threads, cfg.num_workers)
        return PretrainRun(cfg, run, progress if run.env.is_main else NULL_PROGRESS).run()


def _image_paths(cfg: PretrainConfig, world_size: int) -> list[Path]:
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
    if len(paths) < world_size:
        raise DataError(
            f"{len(paths)} image{'s' if len(paths) != 1 else ''} cannot be shared by {world_size} processes."
        )
    return paths


class PretrainRun:
    """One pretraining run inside its :class:`~dinokit.run.TrainingRun`: set-up (data, settings,
    state, resume), the epoch loop, and the checkpoints. :func:`pretrain` is the way to start one."""

    def __init__(self, cfg: PretrainConfig, run: TrainingRun, progress: Progress):
        self.cfg = cfg
        self.run_ = run
        assert run.plan is not None, "plan_threads runs before the run starts"
        self.plan = run.plan
        self.device = run.device
        self.env = run.env
        self.progress = progress
        self.out = Path(cfg.output)
        self.newest_checkpoint: dict | None = None
        self.cadence = run.cadence
        #: every image found unreadable in this run (on any rank, in any epoch): each counts once
        self.unreadable_run: set[int] = set()

    # -- set-up ---------------------------------------------------------------------------------
    def _set_up(self) -> tuple[EpochTally, int, int]:
        """Everything before the first step; returns the tally and (epoch, iteration) to start at."""
        env, device, run = self.env, self.device, self.run_
        paths = _image_paths(self.cfg, env.world_size)
        ckpt = run.checkpoint
        saved = run.saved_config if ckpt is not None else None
        self.cfg = cfg = settings_for_run(self.cfg, saved, len(paths), env.world_size)
        # _image_paths refuses a run without data; settings_for_run fills in what was left unset
        assert cfg.data is not None and cfg.global_scale is not None
        assert cfg.warmup_epochs is not None and cfg.momentum_teacher is not None
        # the images, not the folder's path: a data set that moved is the same run, one that changed is not
        identity = {
            **run_identity(cfg.to_dict(), NOT_IDENTITY),
            "data_files": data_fingerprint(paths, Path(cfg.data).expanduser()),
        }
        run.check_identity(identity, saved=run_identity(saved, NOT_IDENTITY) if saved else None)
        self.identity = identity
        self.dtype = resolve_precision(cfg.precision, device, training=True)
        self.n_images = len(paths)
        self.global_batch = cfg.batch_size * env.world_size
        self.iters = self.n_images // self.global_batch
        self.state = build_training_state(cfg, device, self.dtype, env.rank)
        self.schedules = build_schedules(
            epochs=cfg.epochs,
            niter_per_epoch=self.iters,
            global_batch=self.global_batch,
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
        start = (EpochTally(), 0, 0) if ckpt is None else self._restore(ckpt)
        run.write_config({
            **cfg.to_dict(),
            "n_images": self.n_images,
            "world_size": env.world_size,
            "global_batch": self.global_batch,
            "iterations_per_epoch": self.iters,
            "precision_used": precision_name(self.dtype),
            "device_used": str(device),
            "threads_used": self.plan.threads,
            "num_workers_used": self.plan.workers,
        })  # fmt: skip
        transform = MultiCropAugmentation(
            cfg.global_scale, cfg.local_scale, cfg.local_crops, cfg.global_size, cfg.local_size
        )
        self.dataset = MultiCropDataset(paths, transform, seed=cfg.seed, exact_decode=cfg.exact_decode)
        self.sampler = EpochSampler(self.dataset, env.world_size, env.rank, cfg.seed, cfg.batch_size)
        self.num_workers = self.plan.workers
        return start

    def _restore(self, ckpt: dict) -> tuple[EpochTally, int, int]:
        try:
            self.state.load_state_dict(ckpt)
        except (KeyError, RuntimeError, ValueError) as e:
            raise DinokitError(
                f"{self.out / 'checkpoint.pth'} does not fit this run's settings ({str(e).splitlines()[0]})."
            ) from e
        saved_iters = ckpt.get("iterations_per_epoch")
        if saved_iters is not None and int(saved_iters) != self.iters:
            log.warning(
                "the run had %d iterations per epoch and now has %d (other data or process count): the "
                "schedules continue from the same epoch but no longer match the original run",
                int(saved_iters), self.iters,
            )  # fmt: skip
        epoch, iteration = int(ckpt["epoch"]), int(ckpt.get("iteration", 0))
        self.unreadable_run = {int(i) for i in ckpt.get("unreadable") or []}
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == self.env.world_size:
            set_rng_state(rng[self.env.rank])
        else:
            seed_everything(self.cfg.seed + 7919 * (epoch * max(self.iters, 1) + iteration), self.env.rank)
        log.info("resuming %s at epoch %d, step %d", self.out, epoch + 1, iteration)
        return EpochTally.from_dict(ckpt.get("partial")), epoch, iteration

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> PretrainResult:
        resumed_tally, start_epoch, start_iteration = self._set_up()
        self.cadence.saved()  # the clock starts with the training, not with the set-up
        cfg, iters, run = self.cfg, self.iters, self.run_
        history: list[dict] = []
        collapsed: list[int] = []
        t_run = time.perf_counter()
        signum = 0
        epochs_done = start_epoch
        for epoch in range(start_epoch, run.end(cfg.epochs)):
            first = epoch == start_epoch
            tally = resumed_tally if first else EpochTally()
            done_steps, signum = self._train_epoch(epoch, start_iteration if first else 0, tally, run.stop)
            skipped = self._sum_over_ranks(tally.skipped)
            if signum and done_steps < iters:  # stopped mid-epoch: keep what it counted
                self._save(epoch, done_steps, tally)
                break
            assert cfg.out_dim is not None, "settings_for_run chooses out_dim"
            line = epoch_summary(
                epoch,
                self._mean_over_ranks(torch.as_tensor(tally.losses)),
                self.schedules.at(epoch * iters + iters - 1, epoch),
                tally,
                skipped,
                cfg.out_dim,
            )
            if line.get("collapsed"):
                collapsed.append(epoch + 1)
            history.append(line)
            self._end_epoch(epoch, line)
            epochs_done = epoch + 1
            signum = signum or run.agreed_signal()
            if signum:
                break
        barrier()
        outcome = run.outcome(epochs_done, cfg.epochs, signum)
        result = PretrainResult(
            output=self.out,
            epochs=cfg.epochs,
            epochs_done=epochs_done,
            finished=outcome.finished,
            stopped_by=outcome.stopped_by,
            exit_code=outcome.exit_code,
            loss=history[-1]["loss"] if history else None,
            images_per_second=(
                float(np.mean([h["images_per_second"] for h in history])) if history else None
            ),
            seconds=time.perf_counter() - t_run,
            n_images=self.n_images,
            skipped_images=len(self.unreadable_run),
            world_size=self.env.world_size,
            precision=precision_name(self.dtype),
            device=str(self.device),
            settings={
                **{
                    k: getattr(cfg, k) for k in ("out_dim", "momentum_teacher", "warmup_epochs", "batch_size")
                },
                "threads": self.plan.threads,
                "num_workers": self.plan.workers,
            },
            cpu_plan=run.record()["cpu_plan"],
            collapsed_epochs=collapsed,
            history=history,
            state=self.state,
        )
        _write_metrics(run, outcome, result, cfg)
        return result

    def _train_epoch(
        self, epoch: int, first_step: int, tally: EpochTally, stop: GracefulStop
    ) -> tuple[int, int]:
        """Steps ``first_step`` .. the end of ``epoch`` (or until a signal); counts into ``tally``.
        Returns the steps done (including those before ``first_step``) and the agreed signal (0: none)."""
        cfg, iters, device, world = self.cfg, self.iters, self.device, self.env.world_size
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, first_step)
        t_epoch = time.perf_counter()
        seconds_before = tally.seconds
        loader: DecodeAheadLoader | torch.utils.data.DataLoader
        if self.num_workers == 0:  # the next batch's pictures decoded in threads while this one trains
            loader = DecodeAheadLoader(
                self.dataset, self.sampler, cfg.batch_size, prefetch_threads(device), collate_multicrop
            )
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=cfg.batch_size,
                sampler=self.sampler,
                num_workers=self.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=True,
                collate_fn=collate_multicrop,
                generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
                worker_init_fn=leave_signals_to_main,
            )
        losses = torch.zeros(iters, device=device)  # on the device: no sync per step
        check_every = 1 if device.type == "cpu" else 10
        task = self.progress.task(f"epoch {epoch + 1}/{cfg.epochs}", total=iters - first_step)
        last_ui = 0.0
        done_steps, signum = first_step, 0
        unreadable: set[int] = set()  # each bad file counts once, however many items tried it
        for it, (crops, skipped) in enumerate(start_loader(loader), start=first_step):
            tally.skipped += count_new_unreadable(skipped, unreadable)
            if cfg.strict and unreadable:
                raise DataError(
                    f"{self.dataset.paths[min(unreadable)]} is not a readable image (--strict stops "
                    "at the first; without it unreadable images are skipped and counted)."
                )
            if crops is None:
                raise DataError(f"No readable image was found in {cfg.data}; every image failed to decode.")
            values = self.schedules.at(epoch * iters + it, epoch)
            loss = dino_step(self.state, crops, epoch, values)
            losses[it] = loss
            due = False
            if (it - first_step) % check_every == 0 or it == iters - 1:
                agreed, due, (nonfinite,) = self.run_.poll(not torch.isfinite(loss))
                if nonfinite:  # on any rank: all stop together
                    ensure_finite_loss(
                        loss.item(),
                        loss_failure_message(
                            f"at epoch {epoch + 1}, step {it + 1}",
                            self.out / "checkpoint.pth",
                            "lower --lr, raise --clip-grad protection, or use --precision fp32",
                        ),
                        elsewhere=True,
                    )
                signum = int(agreed)
            tally.images += len(crops[0]) * world
            done_steps = it + 1
            stopping = signum or (stop.requested and not is_dist())
            if (
                due and not stopping and done_steps < iters
            ):  # the time cadence: a kill loses at most that much
                self.unreadable_run |= self._union_over_ranks(unreadable)
                self._save(
                    epoch,
                    done_steps,
                    self._tally_so_far(
                        tally, losses, first_step, done_steps, seconds_before + time.perf_counter() - t_epoch
                    ),
                )
            now = time.perf_counter()
            if now - last_ui > 1.0 or it == iters - 1:
                last_ui = now
                task.advance(1, loss=float(loss.item()), lr=values["lr"], mom=values["momentum"],
                             t_temp=values["teacher_temp"],
                             img_s=tally.images / max(seconds_before + now - t_epoch, 1e-9))  # fmt: skip
            else:
                task.advance(1)
            if signum or (stop.requested and not is_dist()):
                signum = signum or stop.signum or 0  # requested: signum is set
                break
        task.close()
        self.unreadable_run |= self._union_over_ranks(unreadable)
        tally.seconds = seconds_before + time.perf_counter() - t_epoch
        tally.losses = tally.losses[:first_step] + losses[first_step:done_steps].float().cpu().tolist()
        return done_steps, signum

    def _end_epoch(self, epoch: int, line: dict) -> None:
        """Checkpoint (and the numbered copy at the cadence), log line, progress message."""
        cfg = self.cfg
        self._save(epoch + 1, 0, None)
        if self.env.is_main:
            append_jsonl(self.out / "log.jsonl", line)
            numbered = numbered_checkpoint(self.out, epoch + 1, cfg.save_every)
            if numbered is not None:
                save_checkpoint(self.newest_checkpoint, numbered)
        self.newest_checkpoint = None
        self.progress.log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {line['loss']:.4f}  lr {line['lr']:.3g}  "
            f"momentum {line['momentum']:.5f}  teacher temp {line['teacher_temp']:.3g}  "
            f"{line['images_per_second']:.1f} images/s  {line['seconds']:.1f} s"
        )

    def _union_over_ranks(self, indices: set[int]) -> set[int]:
        if not is_dist():
            return set(indices)
        sets: list = [None] * self.env.world_size
        torch.distributed.all_gather_object(sets, sorted(indices))
        return {int(i) for s in sets for i in s}

    def _sum_over_ranks(self, count: int) -> int:
        if not is_dist():
            return count
        total = torch.tensor([float(count)], device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def _mean_over_ranks(self, epoch_losses: torch.Tensor) -> torch.Tensor:
        epoch_losses = epoch_losses.float()
        if not is_dist():
            return epoch_losses
        epoch_losses = epoch_losses.to(self.device)
        torch.distributed.all_reduce(epoch_losses)
        return (epoch_losses / self.env.world_size).cpu()

    # -- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def _tally_so_far(
        tally: EpochTally, losses: torch.Tensor, first_step: int, done: int, seconds: float
    ) -> EpochTally:
        """The epoch's tally after ``done`` steps, for a checkpoint written while the epoch goes on."""
        return EpochTally(
            seconds=seconds,
            images=tally.images,
            skipped=tally.skipped,
            losses=tally.losses[:first_step] + losses[first_step:done].float().cpu().tolist(),
        )

    def _save(self, epoch: int, iteration: int, tally: EpochTally | None) -> None:
        """Write checkpoint.pth (and backbone.pth) atomically on rank 0; every rank's RNG state goes in.
        ``tally`` is the epoch so far when the checkpoint is written mid-epoch. Ctrl-C and SIGTERM
        wait until both files are written."""
        with self.run_.saving():
            self._write_checkpoint(epoch, iteration, tally)

    def _write_checkpoint(self, epoch: int, iteration: int, tally: EpochTally | None) -> None:
        rng = get_rng_state()
        if is_dist():
            states: list = [None] * self.env.world_size
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        self.newest_checkpoint = None
        if not self.env.is_main:
            return
        ckpt = {
            **self.state.state_dict(),
            "epoch": int(epoch),
            "iteration": int(iteration),
            "global_step": int(epoch * self.iters + iteration),
            "iterations_per_epoch": int(self.iters),
            "world_size": int(self.env.world_size),
            "partial": tally.to_dict() if tally is not None else None,
            "unreadable": sorted(self.unreadable_run),
            "config": self.cfg.to_dict(),
            "rng": states,
            "arch": canonical_arch(self.cfg.arch),
            "patch_size": int(self.cfg.patch_size),
            "format": "dinokit-pretrain-1",
        }
        self.run_.write_checkpoint(ckpt)
        save_backbone(self.state.teacher.backbone, self.out / "backbone.pth")
        self.newest_checkpoint = {**ckpt, **self.run_.record()}


def _write_metrics(
    run: TrainingRun, outcome: RunOutcome, result: PretrainResult, cfg: PretrainConfig
) -> None:
    """The run's metrics.json: the outcome and its figures (on rank 0)."""
    metrics = {
        "loss": result.loss,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
        "n_images": result.n_images,
        "skipped_images": result.skipped_images,
        "world_size": result.world_size,
        "precision": result.precision,
        "device": result.device,
        "settings": result.settings,
        "collapsed_epochs": result.collapsed_epochs,
        "checkpoint": str(result.checkpoint),
        "backbone": str(result.backbone),
    }
    run.write_metrics(
        outcome,
        metrics,
        config=cfg.to_dict(),
        units={"loss": "nats (cross-entropy)", "images_per_second": "images/s", "seconds": "s"},
    )


def resume_hint(output: str | os.PathLike) -> str:
    return PRETRAIN_RUN.resume_hint(output)
