"""Fine-tuning transfer (paper, Sec. 4.2.3 / Table 6): a new linear head on a (DINO-pretrained or
randomly initialised) backbone, the whole network trained with the DeiT recipe.

Recipe: AdamW, linear warm-up then cosine, peak lr = ``lr * global_batch / 1024`` (base 5e-4),
weight decay 0.05 (not on biases, norms, cls_token, pos_embed), label smoothing 0.1, drop path 0.1,
optional layer-wise lr decay, RandAugment, mixup / cutmix, gradient clipping and head-only warm-up
epochs (backbone frozen).

Layer-wise lr decay (``layer_decay`` = d, ViT with L blocks): block i (0-based) is trained at
``lr * d**(L - i)``; the patch embedding, cls_token and pos_embed at ``lr * d**(L + 1)``; the final
norm and the head at ``lr``. ``d = 1`` turns it off (the DeiT recipe the paper uses).

Every random draw is a function of (seed, epoch, image index) for augmentation and of (seed, rank,
global step) for drop path / mixup, so a run stopped at any step and resumed continues bitwise as
the uninterrupted run would (same precision, same device, same number of processes).

Here: the recipe (config, result), the step and the loop; what a run is built from is in
finetune_state.py, the model in models/head.py, the layer decay in optim.py, ``model.pth`` in checkpoints/finetuned.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoints import (
    FINETUNE_CHECKPOINT_FORMAT,
    BackboneOptions,
    export_finetuned,
    save_checkpoint,
)
from ..data.images import collate_skip_none, data_fingerprint
from ..data.normalization import check_normalization
from ..data.splits import Splits, epoch_indices, load_splits
from ..errors import DataError, DinokitError
from ..eval.predict import evaluate_classifier
from ..io import append_jsonl, atomic_write_text, run_identity, to_json, write_json, write_metrics
from ..models.head import FinetuneModel
from ..progress import NULL_PROGRESS, Progress
from ..run import RunKind, RunOptions, TrainingRun
from ..runtime import (
    DistEnv,
    RuntimeOptions,
    all_reduce_mean,
    autocast,
    barrier,
    check_numbers,
    derive_seed,
    ensure_finite_loss,
    is_dist,
    precision_name,
    resolve_device,
    resolve_precision,
)
from ..viz import draw_confusion
from .augment import BatchMixer, soft_cross_entropy
from .finetune_state import (
    EpochTotals,
    FinetuneSetup,
    FinetuneState,
    build_datasets,
    build_model,
    plan_batches,
    spec_normalization,
)
from .loop import leave_signals_to_main, loss_failure_message, start_loader
from .optim import apply_lr
from .schedules import finetune_lr_schedule

log = logging.getLogger("dinokit")

#: the files a run writes (an --overwrite run removes an earlier run's first)
RUN_FILES = (
    "log.jsonl",
    "metrics.json",
    "confusion.png",
    "model.pth",
    "best.pth",
    "checkpoint.pth",
    "config.json",
    "split.json",
)


# ---------------------------------------------------------------------------------------------
# The recipe: configuration and result
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig(BackboneOptions, RuntimeOptions, RunOptions):
    """Everything a fine-tuning run needs; saved in its checkpoint and ``metrics.json`` (the backbone,
    runtime and run fields, ``batch_size`` per process, come from the shared option sets)."""

    train: Path | None
    output: Path
    val: Path | None = None
    val_split: float | None = None  # fraction of train held out when ``val`` is None (0.1 by default)
    weights: str = field(default="random", kw_only=True)
    epochs: int = 100
    lr: float = 5e-4  # at a global batch of 1024; the peak lr is lr * global_batch / 1024
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    randaugment: int = 0  # RandAugment magnitude (2 ops); 0 = off, DeiT uses 9
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off, DeiT uses 0.8
    cutmix: float = 0.0  # 0 = off, DeiT uses 1.0
    clip_grad: float | None = None  # global gradient-norm clip; None = off
    head_warmup_epochs: int = 0  # epochs that train the head alone on the frozen backbone
    warmup_epochs: float = 5.0  # linear lr warm-up of the full fine-tuning phase
    image_size: int = 224
    min_crop_scale: float = 0.08
    num_workers: int = field(default=4, kw_only=True)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d


#: options a resumed run may change when typed; every other option is the run's recipe and stays as saved
RUN_CONTROL = frozenset(
    {
        "train",
        "val",
        "epochs",
        "num_workers",
        "device",
        "precision",
        "checkpoint_minutes",
        "strict",
        "threads",
        "exact_decode",
    }
)
#: config fields that do not make a run another run (where its data is, how long and how it runs)
NOT_IDENTITY = (*RUN_CONTROL, "output", "resume", "overwrite", "stop_after")
#: a fine-tuning run's folder, to the run skeleton
FINETUNE_RUN = RunKind(command="finetune", noun="fine-tuning run", files=RUN_FILES, formats=(FINETUNE_CHECKPOINT_FORMAT,),
                       unit="epoch", may_change=RUN_CONTROL)  # fmt: skip


@dataclass
class FinetuneResult:
    output: Path
    classes: list[str]
    epochs_done: int
    epochs: int
    finished: bool
    signal: int | None = None  # the signal that stopped the run, if any
    stopped_at: tuple[int, int] | None = None  # (epoch, step) of a checkpoint written mid-epoch
    final_top1: float | None = None
    final_top5: float | None = None
    best_top1: float | None = None
    best_top5: float | None = None
    best_epoch: int | None = None
    per_class_top1: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    batch_size: int = 0
    peak_lr: float = 0.0
    num_train: int = 0
    num_val: int = 0


def build_schedule(cfg: FinetuneConfig, niter_per_epoch: int, peak_lr: float) -> np.ndarray:
    """The per-iteration lr of the recipe (see :func:`dinokit.train.schedules.finetune_lr_schedule`)."""
    return finetune_lr_schedule(
        epochs=cfg.epochs,
        niter_per_epoch=niter_per_epoch,
        peak_lr=peak_lr,
        min_lr=cfg.min_lr,
        warmup_epochs=cfg.warmup_epochs,
        head_warmup_epochs=cfg.head_warmup_epochs,
    )


def set_up(
    cfg: FinetuneConfig, run: TrainingRun, dtype: torch.dtype | None
) -> tuple[FinetuneSetup, FinetuneState, Splits, int, int]:
    """Data, model, optimiser and schedule of a run (restored from the checkpoint ``run`` resumes);
    returns them with the (epoch, step) to start from."""
    out, env, device, resume_state = Path(cfg.output), run.env, run.device, run.checkpoint
    splits = load_splits(cfg.train, cfg.val, cfg.val_split, cfg.seed)
    run.check_identity({**run_identity(cfg.to_dict(), NOT_IDENTITY), "classes": list(splits.classes),
                        "data_files": _split_fingerprint(splits, cfg)})  # fmt: skip
    if resume_state is not None and list(resume_state["classes"]) != splits.classes:
        raise DataError(f"The classes in {cfg.train} are not those of the run being resumed.")
    num_classes = len(splits.classes)
    plan = plan_batches(cfg, len(splits.train), env.world_size, device)

    model, spec = build_model(cfg, resume_state, num_classes)
    state = FinetuneState.create(model.to(device), cfg, plan.peak_lr, device, dtype)
    schedule = build_schedule(cfg, plan.niter, plan.peak_lr)
    mixer = BatchMixer(num_classes, cfg.mixup, cfg.cutmix, cfg.label_smoothing)

    start_epoch, start_step = 0, 0
    if resume_state is not None:
        start_epoch, start_step = state.restore(resume_state)
        state.history = _truncate_log(out, start_epoch, env)
        if int(resume_state.get("niter", plan.niter)) != plan.niter:
            raise DataError(
                f"The training set gives {plan.niter} steps per epoch, the resumed run had "
                f"{resume_state['niter']}; resume with the same images, batch size and number of processes."
            )
    train_ds, val_ds = build_datasets(cfg, splits, spec_normalization(spec))
    setup = FinetuneSetup(cfg, out, env, device, dtype, splits.classes, spec, plan, schedule, mixer, train_ds, val_ds,
                          run)  # fmt: skip
    return setup, state, splits, start_epoch, start_step


def _split_fingerprint(splits: Splits, cfg: FinetuneConfig) -> str:
    """The images of both splits (their names within their folders and their sizes, not the folders'
    paths): the same data moved elsewhere is the same run, other data is another."""
    assert cfg.train is not None, "load_splits refuses a run without --train"
    train = data_fingerprint([p for p, _ in splits.train], Path(cfg.train))
    val = data_fingerprint([p for p, _ in splits.val], Path(cfg.val if cfg.val is not None else cfg.train))
    return f"{train}:{val}"


# ---------------------------------------------------------------------------------------------
# The step and the epoch
# ---------------------------------------------------------------------------------------------
def train_step(
    setup: FinetuneSetup, state: FinetuneState, runner: nn.Module, batch, head_only: bool
) -> tuple[torch.Tensor, int]:
    """One optimisation step on one batch (mixing, soft cross-entropy, backward, clip, update); returns
    this rank's loss and its number of images. ``batch`` None (every image unreadable) still steps,
    with a zero loss, so that the ranks stay in step."""
    cfg, device, dtype = setup.cfg, setup.device, setup.dtype
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    if batch is not None:
        x, y, _ = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, targets = setup.mixer(x, y)
        with autocast(device, dtype):
            if head_only:
                with torch.no_grad():
                    feats = model.backbone(x)
                logits = model.head(feats)
            else:
                logits = runner(x)
        loss = soft_cross_entropy(logits, targets)
        n_img = len(y)
    else:  # every image of the batch was unreadable: keep ranks in step with a zero loss
        blank = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)
        with autocast(device, dtype):
            loss = (model.head(model.backbone(blank).detach()) if head_only else runner(blank)).sum() * 0.0
        n_img = 0
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if head_only and is_dist():
        for p in model.head.parameters():
            if p.grad is not None:
                all_reduce_mean(p.grad)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss, n_img


def train_epoch(
    setup: FinetuneSetup,
    state: FinetuneState,
    runner: nn.Module,
    epoch: int,
    first_step: int,
    head_only: bool,
    progress: Progress,
) -> tuple[int, int]:
    """Train ``epoch`` from ``first_step`` to its end, or until the ranks agree to stop; returns the
    steps done and the stop signal (0 for none)."""
    cfg, env, plan = setup.cfg, setup.env, setup.plan
    setup.train_ds.epoch = epoch
    if first_step == 0:
        state.totals = EpochTotals()
    order = epoch_indices(len(setup.train_ds), cfg.seed, epoch, env.rank, env.world_size, plan.batch_size)
    loader = torch.utils.data.DataLoader(
        setup.train_ds,
        batch_size=plan.batch_size,
        sampler=order[first_step * plan.batch_size :],
        num_workers=plan.num_workers,
        collate_fn=collate_skip_none,
        pin_memory=setup.device.type == "cuda",
        drop_last=True,
        worker_init_fn=leave_signals_to_main if plan.num_workers > 0 else None,
    )
    task = progress.task(
        f"epoch {epoch + 1}/{cfg.epochs}" + (" (head only)" if head_only else ""), total=plan.niter
    )
    task.advance(first_step)
    t0 = time.monotonic()
    step = first_step
    signum = 0
    for batch, _skipped in start_loader(loader):
        it = epoch * plan.niter + step
        lr = float(setup.schedule[it])
        apply_lr(state.optimizer, lr)
        torch.manual_seed(derive_seed(cfg.seed, 31, env.rank, it))  # drop path, mixup, cutmix
        loss, n_img = train_step(setup, state, runner, batch, head_only)
        loss_value = float(all_reduce_mean(loss.detach().float().clone()).item())
        if not math.isfinite(loss_value):  # the sentence looks for the checkpoint: only build it then
            ensure_finite_loss(
                loss_value,
                loss_failure_message(
                    f"at epoch {epoch} step {step}",
                    setup.out / "checkpoint.pth",
                    "try a lower --lr, --clip-grad 1.0 or --precision fp32",
                ),
            )
        state.totals.loss_sum += loss_value
        state.totals.loss_count += 1
        state.totals.images += n_img * env.world_size
        step += 1
        task.advance(1, loss=loss_value, lr=lr)
        # one collective a step: the stop and the checkpoint cadence are agreed across ranks together
        signum, due, _ = setup.run.poll()
        if signum and step < plan.niter:
            break
        if (
            step < plan.niter and due
        ):  # the time cadence: a run killed without warning loses at most that much
            save_training_checkpoint(setup, state, epoch, step)
    task.close()
    state.totals.seconds += time.monotonic() - t0
    return step, signum


def end_epoch(
    setup: FinetuneSetup,
    state: FinetuneState,
    epoch: int,
    head_only: bool,
    result: FinetuneResult,
    progress: Progress,
) -> dict:
    """Validate, log, keep the best model, checkpoint and write the metrics after ``epoch``; returns
    the validation (see :func:`dinokit.eval.predict.evaluate_classifier`)."""
    cfg, env, out, plan = setup.cfg, setup.env, setup.out, setup.plan
    ev = evaluate_classifier(state.model, setup.val_ds, len(setup.classes), plan.batch_size, plan.num_workers,
                             setup.device, setup.dtype, progress)  # fmt: skip
    improved = state.best["top1"] is None or ev["top1"] > state.best["top1"]
    if improved:
        state.best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1}
    totals = state.totals
    entry = {
        "epoch": epoch + 1,
        "phase": "head" if head_only else "full",
        "train_loss": totals.loss_sum / max(totals.loss_count, 1),
        "val_top1": ev["top1"],
        "val_top5": ev["top5"],
        "lr": float(setup.schedule[epoch * plan.niter + plan.niter - 1]),
        "images_per_second": totals.images / max(totals.seconds, 1e-9),
        "seconds": totals.seconds,
    }
    state.history.append(entry)
    if env.is_main:
        append_jsonl(out / "log.jsonl", entry)
        extra = {"epoch": epoch + 1, "val_top1": ev["top1"], "val_top5": ev["top5"]}
        if improved:
            save_checkpoint(export_finetuned(state.model, setup.classes, setup.spec, cfg.image_size, extra),
                            out / "best.pth")  # fmt: skip
    progress.log(
        f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f}  val top-1 {ev['top1']:.2f}  "
        f"top-5 {ev['top5']:.2f}  ({entry['seconds']:.1f} s)"
    )
    state.totals = EpochTotals()
    save_training_checkpoint(setup, state, epoch + 1, 0)
    result.epochs_done = epoch + 1
    _fill_result(result, ev, state.best, setup.classes)
    if env.is_main:
        _write_outputs(
            out,
            cfg,
            result,
            ev,
            setup.classes,
            final=False,
            cpu_plan=setup.run.record()["cpu_plan"],
            normalization=spec_normalization(setup.spec).record(),
        )
    return ev


def save_training_checkpoint(setup: FinetuneSetup, state: FinetuneState, epoch: int, step: int) -> None:
    with setup.run.saving():
        setup.run.write_checkpoint(state.checkpoint(setup, epoch, step))
    barrier()


def enter_phase(
    model: FinetuneModel, head_only: bool, ddp_model: nn.Module | None, device: torch.device
) -> tuple[nn.Module, nn.Module | None]:
    """Freeze or unfreeze the backbone for a head-only or full epoch; returns the module to run (the
    DDP wrapper in a full epoch under torchrun) and the DDP wrapper, built at the first full epoch."""
    for p in model.backbone.parameters():
        p.requires_grad_(not head_only)  # before DDP is built: it syncs only trainable parameters
    if not head_only and is_dist() and ddp_model is None:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    runner = model if head_only or ddp_model is None else ddp_model
    model.train()
    if head_only:
        model.backbone.eval()  # frozen: no drop path while only the head learns
    return runner, ddp_model


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def finetune(
    cfg: FinetuneConfig, progress: Progress = NULL_PROGRESS, explicit: set[str] | None = None
) -> FinetuneResult:
    """Fine-tune a backbone with a new linear head; writes the run folder (see docs/finetune.md).

    ``explicit`` names the options the user typed (the CLI passes them): a resumed run takes the rest
    from its checkpoint and refuses a typed recipe option that differs; ``None`` (a library call)
    means every field of ``cfg`` that is not None is asked for.
    """
    _validate(cfg)
    device = resolve_device(cfg.device)
    with TrainingRun(FINETUNE_RUN, cfg.output, cfg, device) as run:
        cfg = _resumed(cfg, run, explicit)
        run.plan_threads(cfg.threads, cfg.num_workers)
        dtype = resolve_precision(cfg.precision, device, training=True)
        return _train(cfg, run, dtype, progress if run.env.is_main else NULL_PROGRESS)


def _train(
    cfg: FinetuneConfig, run: TrainingRun, dtype: torch.dtype | None, progress: Progress
) -> FinetuneResult:
    """The epochs of a run inside its skeleton, from set-up to the final outputs."""
    setup, state, splits, start_epoch, start_step = set_up(cfg, run, dtype)
    _write_run_config(setup, splits)
    result = FinetuneResult(
        output=setup.out, classes=setup.classes, epochs_done=start_epoch, epochs=cfg.epochs, finished=False,
        batch_size=setup.plan.global_batch, peak_lr=setup.plan.peak_lr, num_train=len(splits.train),
        num_val=len(splits.val), best_top1=state.best["top1"], best_top5=state.best["top5"],
        best_epoch=state.best["epoch"], history=state.history,
    )  # fmt: skip
    ddp_model: nn.Module | None = None
    last_eval: dict | None = None
    for epoch in range(start_epoch, run.end(cfg.epochs)):
        head_only = epoch < cfg.head_warmup_epochs
        runner, ddp_model = enter_phase(state.model, head_only, ddp_model, run.device)
        first_step = start_step if epoch == start_epoch else 0
        step, signum = train_epoch(setup, state, runner, epoch, first_step, head_only, progress)
        if signum and step < setup.plan.niter:  # stopped mid-epoch: save where it stands
            save_training_checkpoint(setup, state, epoch, step)
            result.signal = signum
            result.stopped_at = (epoch + 1, step)
            break
        last_eval = end_epoch(setup, state, epoch, head_only, result, progress)
        signum = run.agreed_signal()
        if signum:
            result.signal = signum
            break
    result.history = state.history
    outcome = run.outcome(result.epochs_done, cfg.epochs, result.signal or 0)
    result.finished = outcome.finished
    if result.finished and run.env.is_main:
        _write_final_outputs(setup, state, result, last_eval)
    barrier()
    return result


def _write_run_config(setup: FinetuneSetup, splits: Splits) -> None:
    cfg, out = setup.cfg, setup.out
    if setup.env.is_main:
        setup.run.write_config({**cfg.to_dict(), "classes": setup.classes})
        if cfg.val is None:
            write_json(
                out / "split.json",
                {"val": [str(p) for p, _ in splits.val], "train_count": len(splits.train)},
            )
    spec = setup.spec
    log.info(
        "fine-tuning %s on %d images of %d classes (%d val); batch %d, peak lr %.3g, %s",
        spec["arch"] if spec["patch_size"] is None else f"{spec['arch']}/{spec['patch_size']}", len(splits.train),
        len(setup.classes), len(splits.val), setup.plan.global_batch, setup.plan.peak_lr, precision_name(setup.dtype),
    )  # fmt: skip


def _write_final_outputs(
    setup: FinetuneSetup, state: FinetuneState, result: FinetuneResult, last_eval: dict | None
) -> None:
    """``model.pth`` and the final ``metrics.json`` of a finished run."""
    out = setup.out
    extra = {"epoch": result.epochs_done}
    if last_eval is not None:
        extra.update(val_top1=last_eval["top1"], val_top5=last_eval["top5"])
    save_checkpoint(export_finetuned(state.model, setup.classes, setup.spec, setup.cfg.image_size, extra),
                    out / "model.pth")  # fmt: skip
    if last_eval is not None:
        _write_outputs(
            out,
            setup.cfg,
            result,
            last_eval,
            setup.classes,
            final=True,
            cpu_plan=setup.run.record()["cpu_plan"],
            normalization=spec_normalization(setup.spec).record(),
        )
    elif (out / "metrics.json").is_file():
        # resumed after the last epoch had already been validated: mark the metrics final
        m = json.loads((out / "metrics.json").read_text())
        m["finished"] = True
        write_json(out / "metrics.json", m)


def _fill_result(result: FinetuneResult, ev: dict, best: dict, classes: list[str]) -> None:
    result.final_top1, result.final_top5 = ev["top1"], ev["top5"]
    result.best_top1, result.best_top5, result.best_epoch = best["top1"], best["top5"], best["epoch"]
    result.per_class_top1 = {classes[i]: v for i, v in ev["per_class"].items()}


def _write_outputs(
    out: Path,
    cfg: FinetuneConfig,
    result: FinetuneResult,
    ev: dict,
    classes,
    final: bool,
    cpu_plan: dict | None = None,
    normalization: dict | None = None,
) -> None:
    drawn = draw_confusion(
        ev["confusion"],
        classes,
        out / "confusion.png",
        title=f"Confusion matrix, epoch {result.epochs_done}: val top-1 {ev['top1']:.1f}%",
    )
    metrics: dict[str, Any] = {
        "finished": final,
        "epochs_done": result.epochs_done,
        "epochs": result.epochs,
        "top1": result.final_top1,
        "top5": result.final_top5,
        "best_top1": result.best_top1,
        "best_top5": result.best_top5,
        "best_epoch": result.best_epoch,
        "per_class_top1": result.per_class_top1,
        "num_classes": len(classes),
        "num_train": result.num_train,
        "num_val": result.num_val,
        "global_batch_size": result.batch_size,
        "peak_lr": result.peak_lr,
        "confusion_png": drawn,
        "cpu_plan": cpu_plan,
    }
    units = {k: "percent" for k in ("final_top1", "final_top5", "best_top1", "best_top5", "per_class_top1")}
    write_metrics(out, metrics, config={**cfg.to_dict(), "normalization": normalization}, units=units)


def _validate(cfg: FinetuneConfig) -> None:
    check_normalization(cfg.mean, cfg.std)
    if cfg.epochs < 1:
        raise DinokitError("--epochs must be at least 1.")
    if not 0 <= cfg.head_warmup_epochs <= cfg.epochs:
        raise DinokitError("--head-warmup-epochs must be between 0 and --epochs.")
    if not 0 < cfg.layer_decay <= 1:
        raise DinokitError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}.")
    if not 0 <= cfg.label_smoothing < 1:
        raise DinokitError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}.")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise DinokitError("--mixup and --cutmix are Beta-distribution alphas: 0 (off) or positive.")
    if not 0 <= cfg.drop_path < 1:
        raise DinokitError(f"--drop-path must be in [0, 1), got {cfg.drop_path}.")
    if cfg.image_size < 8:
        raise DinokitError(f"--image-size must be at least 8 pixels, got {cfg.image_size}.")
    if not 0 < cfg.min_crop_scale <= 1:
        raise DinokitError(f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}.")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise DinokitError("--stop-after must be at least 1.")
    check_numbers(
        cfg,
        positive=("lr",),
        non_negative=("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "checkpoint_minutes"),
    )


# ---------------------------------------------------------------------------------------------
# Resume: the run's checkpoint, its recipe, and its log up to the resumed epoch
# ---------------------------------------------------------------------------------------------
def _resumed(cfg: FinetuneConfig, run: TrainingRun, explicit: set[str] | None) -> FinetuneConfig:
    """The run's settings: ``cfg`` for a fresh run; for a resumed one its recipe with this command
    line's run control on top (see :meth:`dinokit.run.TrainingRun.resumed_config`)."""
    if run.checkpoint is None:
        return cfg
    merged = run.resumed_config(cfg.to_dict(), explicit, [f.name for f in dataclasses.fields(FinetuneConfig)])
    for k in ("train", "val", "output"):
        if merged.get(k) is not None:
            merged[k] = Path(merged[k])
    saved_epochs = (run.saved_config or {}).get("epochs")
    cfg = FinetuneConfig(**merged)
    _validate(cfg)
    if saved_epochs is not None and cfg.epochs != saved_epochs:
        log.warning("resuming a %d-epoch run for %d epochs: the lr schedule is recomputed for the new length.",
                    saved_epochs, cfg.epochs)  # fmt: skip
    return cfg


def _truncate_log(out: Path, epoch: int, env: DistEnv) -> list[dict]:
    """The log lines up to ``epoch`` (the resumed run writes the later ones again), rewritten on disk."""
    history = [h for h in _read_log(out / "log.jsonl") if h.get("epoch", 0) <= epoch]
    if env.is_main:
        atomic_write_text(out / "log.jsonl", "".join(to_json(h, indent=None) + "\n" for h in history))
    return history


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line
    return lines


__all__ = [
    "FINETUNE_RUN",
    "RUN_CONTROL",
    "FinetuneConfig",
    "FinetuneResult",
    "build_schedule",
    "finetune",
    "train_epoch",
    "train_step",
]
