"""``dinokit linear``: the linear probe on frozen features (and the logistic-regression probe)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, console_err, plural, print_table, setup_logging, short_run_note
from ._options import (
    Arch,
    BatchSize,
    CheckpointKey,
    Device,
    ExactDecode,
    Mean,
    NumWorkers,
    OptionalWeights,
    Output,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    Seed,
    Std,
    Strict,
    config_from,
)
from ._progress import RichProgress
from ._runs import Resume, StopAfter, Threads, check_run_output, report_stop, typed_options
from .features import Crop, Resize


def linear(
    ctx: typer.Context,
    output: Output,
    train: Annotated[
        Optional[Path], typer.Option("--train", help="Labelled training images (ROOT/<class>/<image>).")
    ] = None,
    val: Annotated[
        Optional[Path], typer.Option("--val", help="Labelled validation images (ROOT/<class>/<image>).")
    ] = None,
    train_features: Annotated[
        Optional[Path],
        typer.Option("--train-features", help="A features file from dinokit features (fast path)."),
    ] = None,
    val_features: Annotated[
        Optional[Path],
        typer.Option("--val-features", help="A features file from dinokit features (fast path)."),
    ] = None,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    n_last_blocks: Annotated[
        Optional[int],
        typer.Option(
            "--n-last-blocks",
            min=1,
            help="CLS tokens of the last n blocks (default: 4 for ViT-S/T and DINOv2/v3, 1 for ViT-B).",
        ),
    ] = None,
    avgpool_patch_tokens: Annotated[
        Optional[bool],
        typer.Option(
            "--avgpool-patch-tokens/--no-avgpool-patch-tokens",
            help="Append the patch-token average (default: on for ViT-B and DINOv2/v3, off otherwise).",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        Optional[str],
        typer.Option(
            "--protocol",
            help="Whose linear protocol: dino (one head, 100 epochs), dinov2 (a grid of 13 "
            "learning rates x the last 1 or 4 blocks x with/without the patch mean, trained together, "
            "best on --val) or dinov3 (13 learning rates, last block + patch mean). Default: the "
            "weights' generation.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs",
            min=1,
            help="Training epochs (cosine schedule to 0); DINOv2/v3: "
            "epochs of --epoch-length iterations, 10 by default.",
        ),
    ] = 100,
    epoch_length: Annotated[
        Optional[int],
        typer.Option(
            "--epoch-length",
            min=1,
            help="DINOv2/v3: iterations per epoch (default 1250, the official; "
            "on a CPU try --augment none, or --epochs 10 --epoch-length 100).",
            show_default=False,
        ),
    ] = None,
    augment: Annotated[
        str,
        typer.Option(
            "--augment",
            help="official (RandomResizedCrop + flip on every step) or none: features of the "
            "centre crops computed once and every head trained on them (fast; what --features-only does).",
        ),
    ] = "official",
    batch_size: BatchSize = 128,
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            min=0.0,
            help="Base learning rate, scaled by batch size x processes / "
            "256. Typed without --protocol, it (or --epochs) pins one head trained as DINO's probe; with "
            "--protocol dinov2/dinov3 it pins the grid to that one learning rate.",
        ),
    ] = 0.001,
    features_only: Annotated[
        bool,
        typer.Option("--features-only", help="Train on cached centre-crop features (fast; no augmentation)."),
    ] = False,
    logistic: Annotated[
        bool,
        typer.Option("--logistic", help="Fit scikit-learn's logistic regression on cached features instead."),
    ] = False,
    logistic_c: Annotated[
        float, typer.Option("--logistic-c", min=1e-12, help="Inverse regularisation strength of --logistic.")
    ] = 1.0,
    evaluate: Annotated[
        bool,
        typer.Option("--evaluate", help="Only validate the head given with --linear-weights (no training)."),
    ] = False,
    linear_weights: Annotated[
        Optional[str],
        typer.Option(
            "--linear-weights",
            help="A linear head (*_linearweights.pth, a preset name such as dino_vits16, or a checkpoint.pth of this command).",
        ),
    ] = None,
    resume: Resume = False,
    stop_after: StopAfter = None,
    val_every: Annotated[
        int, typer.Option("--val-every", min=1, help="Validate every n epochs (and after the last).")
    ] = 1,
    resize: Resize = 256,
    crop: Crop = 224,
    min_scale: Annotated[
        float,
        typer.Option("--min-scale", min=0.01, max=1.0, help="RandomResizedCrop's smallest area fraction."),
    ] = 0.08,
    num_workers: NumWorkers = 0,
    threads: Threads = None,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Linear probe on a frozen backbone (paper Sec. 4.1): SGD, cosine lr, a checkpoint each epoch;
    final and best top-1/top-5 in metrics.json. Also --evaluate for released heads and --logistic."""
    options = dict(locals())  # the parsed options by name, before any other local
    setup_logging(quiet)
    if evaluate or logistic:  # one evaluation, no training run: the folder as every evaluation takes it
        from dinokit.io import check_run_folder

        check_run_folder(output, overwrite)
    else:
        check_run_output("linear", output, resume=resume, overwrite=overwrite)
    from dinokit.eval.linear import LinearConfig, linear_eval  # torch: once the checks above passed
    from dinokit.runtime import cleanup_distributed, dist_env, init_distributed, resolve_device

    typed = typed_options(ctx)  # epochs and lr left out: the protocol's own (see --protocol)
    cfg = config_from(LinearConfig, options, epochs=epochs if "epochs" in typed else None,
                      lr=lr if "lr" in typed else None)  # fmt: skip
    init_distributed(resolve_device(device))
    try:
        with RichProgress(quiet=quiet or not dist_env().is_main) as progress:
            result = linear_eval(cfg, progress, explicit=typed)
        if not dist_env().is_main:
            if result.exit_code:
                sys.exit(result.exit_code)
            return
        _report(ctx, result, lr, batch_size)
    finally:
        cleanup_distributed()
    if result.exit_code:
        sys.exit(result.exit_code)


def _report(ctx: typer.Context, result, lr: float, batch_size: int) -> None:
    """The table, the notes and how to go on; the library wrote metrics.json."""
    from dinokit.runtime import dist_env

    if result.mode.startswith("grid"):
        _report_grid(result)
        return
    if result.mode in ("evaluate", "logistic"):
        rows = [[result.mode, result.final["top1"], result.final["top5"]]]
    else:
        rows = []  # the best epoch first: the reference reports it, and the paper's table quotes it
        if result.best:
            rows.append([f"best (epoch {result.best['epoch']})", result.best["top1"], result.best["top5"]])
        if result.final:
            last = "final" if result.stopped_by is None else "last validated"
            rows.append([f"{last} (epoch {result.epochs_done})", result.final["top1"], result.final["top5"]])
    title = {
        "images": "Linear probe",
        "features": "Linear probe (cached features)",
        "evaluate": "Linear head",
        "logistic": "Logistic regression",
    }[result.mode]
    if rows:
        print_table(title, ["", "top-1 %", "top-5 %"], rows)
    if result.mode in ("images", "features"):
        world = dist_env().world_size
        steps = result.epochs_run * -(-result.n_train // (batch_size * world))
        note = short_run_note(
            "linear probe",
            steps,
            "lr" in typed_options(ctx),
            f"{lr:g} x global batch / 256 = {lr * batch_size * world / 256:.3g}",
        )
        if note and result.stopped_by is None:
            console_err.print(note, highlight=False)
    console.print(
        f"{result.feature_dim}-d features (last {result.n_last_blocks} CLS"
        f"{' + patch average' if result.avgpool_patch_tokens else ''}), {plural(result.num_classes, 'class')}",
        highlight=False,
    )
    console.print(f"metrics: {result.metrics_path}", highlight=False)
    if result.mode in ("images", "features"):
        report_stop("linear", result.metrics_path.parent if result.metrics_path else "", "epoch", result.epochs_done,
                    result.epochs, result.stopped_by)  # fmt: skip


def _report_grid(result) -> None:
    """Every head of the grid with its validation accuracy, the chosen one marked, and the run's end."""
    name = {"dinov2": "DINOv2", "dinov3": "DINOv3"}.get(result.protocol, result.protocol)
    rows = [[("* " if h is result.chosen or h == result.chosen else "") + f"{h['lr']:g}", h["n_last_blocks"],
             "yes" if h["avgpool_patch_tokens"] else "no", h.get("top1", "-"), h.get("top5", "-")]
            for h in result.heads]  # fmt: skip
    print_table(
        f"Linear heads ({name} protocol, {'cached features' if result.mode == 'grid-features' else 'images'})",
        ["lr", "blocks", "patch mean", "top-1 %", "top-5 %"],
        rows,
    )
    if result.chosen is not None and "top1" in result.chosen:
        c = result.chosen
        console.print(f"chosen on validation: {c['name']} (lr {c['lr']:g}, last {c['n_last_blocks']} block(s)"
                      f"{', with the patch mean' if c['avgpool_patch_tokens'] else ''}): top-1 {c['top1']:.2f}%",
                      highlight=False)  # fmt: skip
    console.print(f"metrics: {result.metrics_path}", highlight=False)
    report_stop("linear", result.metrics_path.parent if result.metrics_path else "", "epoch", result.epochs_done,
                result.epochs, result.stopped_by)  # fmt: skip


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("linear")(linear)
