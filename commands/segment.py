"""``dinokit segment``: linear semantic segmentation on frozen patch features (DINOv2/DINOv3 protocol),
and a trained head applied to new images (``--head``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, console_err, plural, print_table, setup_logging
from ._options import (
    Arch,
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
from ._runs import Resume, StopAfterIterations, Threads, check_run_output, report_stop, typed_options

CPU_NOTE = (
    "the defaults are scaled for a CPU (1000 iterations, batch 4, --image-size 224); the papers' setting is "
    "--iterations 40000 --warmup 1500 --image-size 512 with a global batch of 16 (e.g. torchrun "
    "--nproc-per-node 8 ... --batch-size 2)."
)


def segment(
    ctx: typer.Context,
    output: Output,
    images: Annotated[
        Optional[list[Path]],
        typer.Argument(help="With --head: the images or folders to segment.", show_default=False),
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="The data set's folder (its train and val splits).")
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="The layout of --data: voc2012, ade20k, cityscapes or folder (ROOT/{train,val}/{images,masks}, "
            "optional ROOT/classes.txt).",
        ),
    ] = "folder",
    head: Annotated[
        Optional[Path],
        typer.Option(
            "--head", help="A head.pth of an earlier run: segment the IMAGES with it instead of training."
        ),
    ] = None,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    iterations: Annotated[
        int, typer.Option("--iterations", min=1, help="Training iterations (official: 40000).")
    ] = 1000,
    warmup: Annotated[
        Optional[int],
        typer.Option(
            "--warmup",
            min=0,
            help="Warm-up iterations (default: 1500/40000 of --iterations, the official share).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per step, per process (official: 2 x 8 GPUs).")
    ] = 4,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (official: 1e-3).")] = 1e-3,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (official: 1e-3).")
    ] = 1e-3,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size",
            min=16,
            help="Training crop, evaluation shorter side and sliding window (stride 2/3 of it); "
            "official: 512.",
        ),
    ] = 224,
    blocks: Annotated[
        int,
        typer.Option("--blocks", help="Patch tokens of the last block (1) or of the last 4, concatenated."),
    ] = 1,
    ignore_index: Annotated[
        int, typer.Option("--ignore-index", help="The void label of a folder set's masks.")
    ] = 255,
    photometric: Annotated[
        bool,
        typer.Option(
            "--photometric/--no-photometric",
            help="The official photometric distortion of the training crops.",
        ),
    ] = True,
    pictures: Annotated[
        int, typer.Option("--pictures", min=0, help="Validation pictures image | truth | prediction.")
    ] = 4,
    resume: Resume = False,
    stop_after: StopAfterIterations = None,
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
    """Linear semantic segmentation on a frozen backbone (the DINOv2/DINOv3 protocol): BatchNorm + 1x1
    conv on the patch tokens, AdamW with warm-up and cosine, sliding-window evaluation; mIoU, aAcc and
    mAcc in metrics.json, per_class.csv, head.pth, predictions/ and pictures/. With --head: segment
    new images. Defaults are scaled for a CPU (1000 iterations, batch 4, --image-size 224); the papers'
    setting is --iterations 40000 --warmup 1500 --image-size 512 at a global batch of 16."""
    options = dict(locals())  # the parsed options by name, before any other local
    setup_logging(quiet)
    if head is not None:
        _predict(options)
        return
    if images:
        raise typer.BadParameter("images are segmented with --head RUN/head.pth; to train, give --data.")
    check_run_output("segment", output, resume=resume, overwrite=overwrite)
    from dinokit.eval.segmentation import (  # torch: once the checks above passed
        SegmentConfig,
        run_segmentation,
    )
    from dinokit.runtime import cleanup_distributed, dist_env, init_distributed, resolve_device

    cfg = config_from(SegmentConfig, options)
    init_distributed(resolve_device(device))
    try:
        with RichProgress(quiet=quiet or not dist_env().is_main) as progress:
            result = run_segmentation(cfg, progress, explicit=typed_options(ctx))
        if dist_env().is_main:
            _report(result, output)
    finally:
        cleanup_distributed()
    if result.exit_code:
        sys.exit(result.exit_code)


def _report(result, output: Path) -> None:
    if result.scores:
        s = result.scores
        print_table("Linear segmentation (val, sliding window)", ["mIoU %", "aAcc %", "mAcc %"],
                    [[s["mIoU"], s["aAcc"], s["mAcc"]]])  # fmt: skip
        console.print(f"{plural(len(result.classes), 'class')}, {result.n_train} training and {result.n_val} validation "
                      f"images, {result.feature_dim}-d patch features; per class: {output / 'per_class.csv'}",
                      highlight=False)  # fmt: skip
        if result.iterations < 40000:
            console_err.print(f"Note: {result.iterations} iterations, a CPU-sized run; {CPU_NOTE} A few hundred "
                              "iterations learn little at the official --lr 1e-3; short runs need a larger one (1e-2 "
                              "on the built-in set, docs/segmentation.md).", highlight=False)  # fmt: skip
    if result.skipped:
        console_err.print(f"{plural(result.skipped, 'unreadable image')} skipped.", highlight=False)
    console.print(f"metrics: {result.metrics_path}", highlight=False)
    report_stop("segment", output, "iteration", result.iterations_done, result.iterations, result.stopped_by)


def _predict(options: dict) -> None:
    """--head: the trained head segments the images given (their label maps and pictures in --output)."""
    from dinokit.io import check_run_folder

    output = options["output"]
    check_run_folder(output, options["overwrite"])
    from dinokit.eval.seg_predict import PredictConfig, predict_images  # torch: once the check above passed

    cfg = config_from(PredictConfig, options, images=list(options["images"] or []))
    with RichProgress(quiet=options["quiet"]) as progress:
        result = predict_images(cfg, progress)
    console.print(f"{plural(len(result.written), 'label map')} and pictures in {output} "
                  f"({plural(len(result.classes), 'class')})", highlight=False)  # fmt: skip
    if result.skipped:
        console_err.print(f"{plural(result.skipped, 'unreadable image')} skipped.", highlight=False)


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("segment")(segment)
