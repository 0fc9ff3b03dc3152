"""``dinokit attn``: self-attention maps of images, their Jaccard against ground-truth objects, and
attention over a video."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, plural, print_table, setup_logging
from ._options import (
    Arch,
    BatchSize,
    CheckpointKey,
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
    Weights,
    config_from,
)
from ._progress import RichProgress


def attn(
    images: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Images, folders or glob patterns to draw attention maps of (the maps form).",
            show_default=False,
        ),
    ] = None,
    weights: Weights = ...,
    output: Output = ...,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size",
            min=0,
            help="Resize images to (S, S) (video frames: shorter side S) before cropping to a multiple "
            "of the patch size; 0 keeps the original size.",
        ),
    ] = 480,
    keep_aspect: Annotated[
        bool,
        typer.Option(
            "--keep-aspect",
            help="Resize the shorter side to S and keep the photo's aspect ratio "
            "(maps and evaluation; the Jaccard protocol's default is the square resize).",
        ),
    ] = False,
    threshold: Annotated[
        float,
        typer.Option("--attention-mass", help="Fraction of each head's attention mass its mask keeps (0-1]."),
    ] = 0.6,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            min=1,
            help="The most patch tokens an image may become at the asked size; an image beyond it is "
            "refused before the work, with the size that fits (attention's cost grows with the square "
            "of the count).",
        ),
    ] = 100_000,
    images_dir: Annotated[
        Optional[Path],
        typer.Option("--images", help="Evaluation form: the folder of images to score against ground truth."),
    ] = None,
    masks: Annotated[
        Optional[Path],
        typer.Option(
            "--masks",
            help="Ground-truth masks named like the images (indexed/8-bit PNGs: 0 background, "
            "255 void, other values objects).",
        ),
    ] = None,
    coco: Annotated[
        Optional[Path],
        typer.Option("--coco", help="Ground truth from a COCO annotation file (polygons or RLE)."),
    ] = None,
    objects: Annotated[
        str,
        typer.Option("--objects", help="COCO objects: instance, or class (instances of a category merged)."),
    ] = "instance",
    binary_masks: Annotated[
        bool, typer.Option("--binary-masks", help="Read any nonzero mask pixel as one foreground object.")
    ] = False,
    ignore_void: Annotated[
        bool, typer.Option("--ignore-void", help="Leave void (255) pixels out of every Jaccard's union.")
    ] = False,
    image_list: Annotated[
        Optional[Path],
        typer.Option(
            "--image-list",
            help="Evaluate only the images named in this file, one per line "
            "(e.g. VOC's ImageSets/Segmentation/val.txt).",
        ),
    ] = None,
    video: Annotated[
        Optional[Path],
        typer.Option(
            "--video", help="Video form: a folder of frames or a video file (files need dinokit[video])."
        ),
    ] = None,
    fps: Annotated[
        Optional[float],
        typer.Option("--fps", min=0.1, help="Frame rate of the GIF/MP4 (default: the file's, or 10)."),
    ] = None,
    mp4: Annotated[
        bool, typer.Option("--mp4", help="Also write attention.mp4 (needs dinokit[video]).")
    ] = False,
    batch_size: BatchSize = 8,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Self-attention maps of the last block's CLS token (DINO Fig. 1/3), masked at a fraction of the
    attention mass; with --images and --masks/--coco, the paper's attention-mask Jaccard; with --video,
    the maps of every frame as pictures and an animated GIF."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import check_run_folder, write_metrics

    setup_logging(quiet)
    check_run_folder(output, overwrite)  # the run takes the folder once the model is loaded
    from dinokit.eval.attention import UNITS  # torch: once the checks above passed
    from dinokit.eval.attention_run import AttentionRunConfig, run_attention
    from dinokit.runtime import embedding_precision

    # the maps of images and videos are embeddings; the Jaccard evaluation keeps the reference's fp32
    embedding = precision if images_dir is not None else embedding_precision(precision, device)
    cfg = config_from(AttentionRunConfig, options, image_size=image_size or None, precision=embedding)
    with RichProgress(quiet=quiet) as progress:
        result = run_attention(cfg, progress)
    write_metrics(
        result.output, result.metrics, result.config, units=UNITS if result.form == "evaluation" else None
    )
    print_result(result)


def print_result(result) -> None:
    """What the run wrote; for the evaluation form, the Jaccard table."""
    out = result.output
    if result.form == "video":
        console.print(f"Wrote {plural(result.frames, 'frame')} and attention.gif to {out}.")
    elif result.form == "evaluation":
        r = result.jaccard
        rows = [
            ["Jaccard (best head per object)", r.jaccard],
            [f"best single head ({r.best_head})", r.jaccard_per_head[r.best_head]],
        ]
        rows += [[f"head {h}", v] for h, v in enumerate(r.jaccard_per_head)]
        print_table(
            f"Attention-mask Jaccard: {plural(r.images, 'image')}, {plural(r.objects, 'object')}",
            ["", "Jaccard (0-1)"],
            rows,
        )
        if r.images_without_objects:
            console.print(f"{plural(r.images_without_objects, 'image')} without any object skipped.")
        if r.unreadable_images:
            console.print(
                f"{plural(r.unreadable_images, 'unreadable image')} skipped (--strict stops at the first)."
            )
        console.print(f"Results in {out / 'metrics.json'}.")
    else:
        console.print(
            f"Wrote the attention maps of {plural(result.images, 'image')} ({plural(result.heads, 'head')}) to {out}."
        )
        if result.skipped:
            console.print(
                f"{plural(result.skipped, 'unreadable image')} skipped (--strict stops at the first)."
            )


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("attn")(attn)
