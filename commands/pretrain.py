"""``dinokit pretrain``: DINO self-distillation on a folder of unlabelled images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, console_err, is_main_process, plural, print_table, setup_logging
from ._option_checks import require_inputs
from ._options import (
    RUN_PANEL,
    RUNTIME_PANEL,
    CheckpointMinutes,
    Device,
    ExactDecode,
    NumWorkers,
    Output,
    Overwrite,
    Precision,
    Quiet,
    Seed,
    Strict,
    config_from,
)
from ._progress import RichProgress
from ._runs import Resume, StopAfter, Threads, check_run_output, report_stop, typed_options

MODEL_PANEL = "Model"
OPTIM_PANEL = "Optimisation"
TEACHER_PANEL = "Teacher"
CROPS_PANEL = "Multi-crop augmentation"

HELP = "\n\n".join(
    [
        "Pretrain a backbone with DINO (self-distillation, no labels) on a folder of images.",
        "The folder is searched recursively (class sub-folders of an ImageFolder are ignored); unreadable images are skipped and counted. Defaults are the reference code's (the paper's ViT recipe with a constant teacher temperature 0.04). The same command runs under `torchrun --nproc-per-node N -m dinokit pretrain ...` for DistributedDataParallel; --batch-size is per process and the lr scales with the global batch (lr * global_batch / 256).",
        "Small data sets: left unset, --out-dim is the power of two nearest the number of images (1024 to 65536), --momentum-teacher is 0.996 lowered to 1 - 10/T (at least 0.99) for runs of fewer than T = 2500 iterations, and --warmup-epochs is 10 or a tenth of --epochs, whichever is fewer.",
        "The run folder gets config.json, log.jsonl (one line per epoch), checkpoint.pth (every epoch; --resume continues from it), checkpoint{epoch:04d}.pth every --save-every epochs, backbone.pth (the teacher backbone in the released-weights format, usable as --weights anywhere) and metrics.json. Ctrl-C or SIGTERM finishes the step, saves, and exits 130/143.",
    ]
)


def pretrain_command(
    ctx: typer.Context,
    data: Annotated[
        Optional[Path],
        typer.Option(
            "--data", "-d", help="Folder of images (searched recursively); not needed with --resume."
        ),
    ] = None,
    output: Output = ...,
    arch: Annotated[
        str,
        typer.Option(
            "--arch", rich_help_panel=MODEL_PANEL, help="vit_tiny, vit_small, vit_base or resnet50."
        ),
    ] = "vit_small",
    patch_size: Annotated[
        int, typer.Option("--patch-size", rich_help_panel=MODEL_PANEL, help="ViT patch size in pixels.")
    ] = 16,
    depth: Annotated[
        Optional[int],
        typer.Option(
            "--depth",
            rich_help_panel=MODEL_PANEL,
            help="Transformer blocks (default: the arch's 12); for quick experiments.",
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", rich_help_panel=OPTIM_PANEL, min=1, help="Epochs of the schedule.")
    ] = 100,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", rich_help_panel=OPTIM_PANEL, min=1, help="Images per batch, per process."
        ),
    ] = 64,
    lr: Annotated[
        float,
        typer.Option(
            "--lr", rich_help_panel=OPTIM_PANEL, help="Base lr at batch 256 (scaled by global_batch / 256)."
        ),
    ] = 5e-4,
    min_lr: Annotated[
        float,
        typer.Option("--min-lr", rich_help_panel=OPTIM_PANEL, help="lr at the end of the cosine schedule."),
    ] = 1e-6,
    warmup_epochs: Annotated[
        Optional[float],
        typer.Option(
            "--warmup-epochs",
            rich_help_panel=OPTIM_PANEL,
            help="Linear lr warm-up (default: min(10, epochs/10)).",
        ),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", rich_help_panel=OPTIM_PANEL, help="Weight decay at the start.")
    ] = 0.04,
    weight_decay_end: Annotated[
        float,
        typer.Option("--weight-decay-end", rich_help_panel=OPTIM_PANEL, help="Weight decay at the end."),
    ] = 0.4,
    momentum_teacher: Annotated[
        Optional[float],
        typer.Option(
            "--momentum-teacher",
            rich_help_panel=TEACHER_PANEL,
            help="Teacher EMA momentum at the start, cosine to 1 (default: see above).",
        ),
    ] = None,
    teacher_temp: Annotated[
        float,
        typer.Option(
            "--teacher-temp", rich_help_panel=TEACHER_PANEL, help="Teacher temperature after warm-up."
        ),
    ] = 0.04,
    warmup_teacher_temp: Annotated[
        float,
        typer.Option(
            "--warmup-teacher-temp", rich_help_panel=TEACHER_PANEL, help="Teacher temperature at epoch 0."
        ),
    ] = 0.04,
    warmup_teacher_temp_epochs: Annotated[
        int,
        typer.Option(
            "--warmup-teacher-temp-epochs",
            rich_help_panel=TEACHER_PANEL,
            help="Epochs of teacher-temperature warm-up (paper: 30).",
        ),
    ] = 0,
    out_dim: Annotated[
        Optional[int],
        typer.Option(
            "--out-dim",
            rich_help_panel=MODEL_PANEL,
            help="DINO head outputs (paper 65536; default: see above).",
        ),
    ] = None,
    norm_last_layer: Annotated[
        bool,
        typer.Option(
            "--norm-last-layer/--no-norm-last-layer",
            rich_help_panel=MODEL_PANEL,
            help="Fix the head's weight-norm gain at 1.",
        ),
    ] = True,
    freeze_last_layer: Annotated[
        int,
        typer.Option(
            "--freeze-last-layer",
            rich_help_panel=MODEL_PANEL,
            help="Epochs during which the head's last layer is not trained.",
        ),
    ] = 1,
    clip_grad: Annotated[
        float,
        typer.Option("--clip-grad", rich_help_panel=OPTIM_PANEL, help="Gradient clipping norm (0 = off)."),
    ] = 3.0,
    clip_mode: Annotated[
        str,
        typer.Option(
            "--clip-mode",
            rich_help_panel=OPTIM_PANEL,
            help="param: each parameter's gradient separately (reference); global.",
        ),
    ] = "param",
    drop_path: Annotated[
        float,
        typer.Option(
            "--drop-path", rich_help_panel=MODEL_PANEL, help="Stochastic depth rate of the student."
        ),
    ] = 0.1,
    optimizer: Annotated[
        str, typer.Option("--optimizer", rich_help_panel=OPTIM_PANEL, help="adamw, sgd or lars.")
    ] = "adamw",
    local_crops: Annotated[
        int, typer.Option("--local-crops", rich_help_panel=CROPS_PANEL, min=0, help="Local crops per image.")
    ] = 8,
    global_size: Annotated[
        int, typer.Option("--global-size", rich_help_panel=CROPS_PANEL, help="Global crop size in pixels.")
    ] = 224,
    local_size: Annotated[
        int, typer.Option("--local-size", rich_help_panel=CROPS_PANEL, help="Local crop size in pixels.")
    ] = 96,
    global_scale: Annotated[
        Optional[tuple[float, float]],
        typer.Option(
            "--global-scale",
            rich_help_panel=CROPS_PANEL,
            help="Area range of global crops (default 0.4 1, or 0.14 1 with no local crops).",
        ),
    ] = None,
    local_scale: Annotated[
        tuple[float, float],
        typer.Option("--local-scale", rich_help_panel=CROPS_PANEL, help="Area range of local crops."),
    ] = (0.05, 0.4),
    precision: Precision = "auto",
    device: Device = "auto",
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile", rich_help_panel=RUNTIME_PANEL, help="torch.compile the student and teacher."
        ),
    ] = False,
    num_workers: NumWorkers = 4,
    threads: Threads = None,
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every",
            rich_help_panel=RUN_PANEL,
            min=0,
            help="Keep checkpoint{epoch:04d}.pth every N epochs (0 = never).",
        ),
    ] = 20,
    checkpoint_minutes: CheckpointMinutes = 10.0,
    stop_after: StopAfter = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Pretrain a backbone with DINO on a folder of unlabelled images."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.errors import DinokitError

    setup_logging(quiet or not is_main_process())
    if data is None and not resume:
        raise DinokitError("Give the image folder with --data (or --resume to continue a run).")
    require_inputs(("data folder", data))
    check_run_output("pretrain", output, resume=resume, overwrite=overwrite)
    from dinokit.train.pretrain import PretrainConfig, pretrain  # torch: once the checks above passed

    explicit = {"compile" if name == "compile_model" else name for name in typed_options(ctx)}
    cfg = config_from(
        PretrainConfig, options, data=str(data) if data is not None else None, output=str(output),
        global_scale=tuple(global_scale) if global_scale else None, local_scale=tuple(local_scale),
        compile=compile_model,
    )  # fmt: skip

    with RichProgress(quiet=quiet or not is_main_process()) as progress:
        result = pretrain(cfg, progress, explicit=explicit)

    if not is_main_process():
        if result.exit_code:
            sys.exit(result.exit_code)
        return
    _report(result)


def _report(result) -> None:
    """The last epochs' table and how to go on (exits 128 + signal when stopped by one); the library
    wrote metrics.json."""
    rows = [
        [h["epoch"], h["loss"], f"{h['lr']:.3g}", f"{h['momentum']:.5f}", f"{h['images_per_second']:.1f}"]
        for h in result.history[-5:]
    ]
    if rows:
        print_table("dinokit pretrain", ["epoch", "loss", "lr", "momentum", "images/s"], rows)
    if result.finished and not result.history:
        console.print(
            f"The run in {result.output} had already finished its {plural(result.epochs, 'epoch')}.",
            highlight=False,
        )
    console.print(f"backbone: {result.backbone}  (use it as --weights)", highlight=False)
    if result.skipped_images:
        console.print(
            f"{plural(result.skipped_images, 'unreadable image')} skipped, each counted once "
            "(--strict stops at the first).",
            highlight=False,
        )
    if result.collapsed_epochs:
        console_err.print(
            f"[yellow]Warning:[/] the loss sat at ln(out_dim) in epochs {result.collapsed_epochs}: collapse."
        )
    report_stop("pretrain", result.output, "epoch", result.epochs_done, result.epochs, result.stopped_by)
    if result.exit_code:
        sys.exit(result.exit_code)


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("pretrain", help=HELP)(pretrain_command)
