"""``dinokit finetune``: a new linear head on a backbone, the whole network fine-tuned (DeiT recipe)."""

from __future__ import annotations

import signal
import sys
from typing import Annotated, Optional

import typer

from ._console import console, console_err, is_main_process, print_table, setup_logging, short_run_note
from ._options import (
    Arch,
    BatchSize,
    CheckpointKey,
    CheckpointMinutes,
    Device,
    ExactDecode,
    Mean,
    NumWorkers,
    Output,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    Seed,
    Std,
    Strict,
    Train,
    Val,
    Weights,
    config_from,
)
from ._progress import RichProgress
from ._runs import Resume, StopAfter, Threads, check_run_output, report_stop, typed_options


def finetune(
    ctx: typer.Context,
    output: Output,
    weights: Weights = "random",
    train: Train = None,
    val: Val = None,
    val_split: Annotated[
        Optional[float],
        typer.Option(
            "--val-split",
            help="Hold out this fraction of each training class for validation "
            "(0.1 when --val is not given).",
        ),
    ] = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs, head-only warm-up included.")] = 100,
    batch_size: BatchSize = 64,
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            help="Base learning rate at a global batch of 1024; the peak lr is lr * global_batch / 1024.",
        ),
    ] = 5e-4,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Learning rate at the end of the cosine.")] = 1e-6,
    weight_decay: Annotated[
        float,
        typer.Option(
            "--weight-decay", help="AdamW weight decay (not on biases, norms, cls_token, pos_embed)."
        ),
    ] = 0.05,
    layer_decay: Annotated[
        float,
        typer.Option(
            "--layer-decay",
            help="Layer-wise lr decay d: block i of L trains at lr*d^(L-i), the "
            "embeddings at lr*d^(L+1), the head at lr. 1 = off; 0.65-0.75 suit small data.",
        ),
    ] = 1.0,
    drop_path: Annotated[float, typer.Option("--drop-path", help="Stochastic depth rate.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing.")] = 0.1,
    randaugment: Annotated[
        int, typer.Option("--randaugment", min=0, help="RandAugment magnitude (2 ops); 0 = off, DeiT uses 9.")
    ] = 0,
    mixup: Annotated[float, typer.Option("--mixup", help="Mixup alpha; 0 = off, DeiT uses 0.8.")] = 0.0,
    cutmix: Annotated[float, typer.Option("--cutmix", help="CutMix alpha; 0 = off, DeiT uses 1.0.")] = 0.0,
    clip_grad: Annotated[
        Optional[float], typer.Option("--clip-grad", help="Clip the global gradient norm to this value.")
    ] = None,
    head_warmup_epochs: Annotated[
        int,
        typer.Option(
            "--head-warmup-epochs",
            min=0,
            help="First epochs train the head alone on the frozen backbone (helps small data).",
        ),
    ] = 0,
    warmup_epochs: Annotated[
        float,
        typer.Option("--warmup-epochs", min=0, help="Linear lr warm-up epochs of the full fine-tuning."),
    ] = 5.0,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size",
            help="Training crop and evaluation crop size in pixels (the evaluation resize is size/0.875).",
        ),
    ] = 224,
    min_crop_scale: Annotated[
        float, typer.Option("--min-crop-scale", help="Smallest random-resized-crop area fraction.")
    ] = 0.08,
    num_workers: NumWorkers = 4,
    threads: Threads = None,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    resume: Resume = False,
    stop_after: StopAfter = None,
    checkpoint_minutes: CheckpointMinutes = 10.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a backbone with a new linear head on a labelled image folder.

    Writes OUTPUT/log.jsonl, metrics.json, confusion.png, checkpoint.pth, best.pth and model.pth.

    Use the result with: dinokit predict --model OUTPUT/model.pth IMAGES...
    """
    options = dict(locals())  # the parsed options by name, before any other local
    setup_logging(quiet or not is_main_process())
    explicit = typed_options(ctx)
    if train is None and not resume:
        raise typer.BadParameter("give the training images with --train DIR.", param_hint="--train")
    check_run_output("finetune", output, resume=resume, overwrite=overwrite)
    from dinokit.runtime import signal_exit_code  # torch: once the checks above passed
    from dinokit.train.finetune import FinetuneConfig
    from dinokit.train.finetune import finetune as run_finetune

    cfg = config_from(FinetuneConfig, options)
    with RichProgress(quiet=quiet or not is_main_process()) as progress:
        result = run_finetune(cfg, progress, explicit=explicit)
    if not is_main_process():
        if result.signal:
            sys.exit(signal_exit_code(result.signal))
        return
    rows = [
        [
            h["epoch"],
            h["phase"],
            h["train_loss"],
            h["val_top1"],
            h["val_top5"],
            f"{h['lr']:.3g}",
            h["seconds"],
        ]
        for h in result.history
    ]
    if rows:
        print_table(
            f"dinokit finetune: {result.output}",
            ["epoch", "phase", "train loss", "val top-1 %", "val top-5 %", "lr", "seconds"],
            rows,
        )
    if result.best_top1 is not None:
        last = "final" if result.finished else f"after epoch {result.epochs_done}:"
        now = (
            f"{last} top-1 {result.final_top1:.2f}%  top-5 {result.final_top5:.2f}%   "
            if result.final_top1 is not None
            else ""
        )
        console.print(f"{now}best top-1 {result.best_top1:.2f}% (epoch {result.best_epoch})", highlight=False)
    stopped_by = (
        signal.Signals(result.signal).name if result.signal else (None if result.finished else "stop-after")
    )
    where = (
        f"in epoch {result.stopped_at[0]} after step {result.stopped_at[1]}" if result.stopped_at else None
    )
    report_stop("finetune", result.output, "epoch", result.epochs_done, result.epochs, stopped_by, where)
    if result.signal:
        sys.exit(signal_exit_code(result.signal))
    if result.finished:
        console.print(f"Model written to {result.output / 'model.pth'}.", highlight=False)
    steps = result.epochs_done * -(-result.num_train // max(1, result.batch_size))
    note = short_run_note(
        "finetune", steps, "lr" in explicit, f"{lr:g} x global batch / 1024 = peak {result.peak_lr:.3g}"
    )
    if note:
        console_err.print(note, highlight=False)


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("finetune")(finetune)
