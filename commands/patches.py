"""``dinokit patches``: pictures of a ViT's dense features without labels: PCA colours over the
foreground and k-means parts shared by the images."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._console import console, plural, setup_logging
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


def patches(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Images, folders or glob patterns: their patch features are fitted together.",
            show_default=False,
        ),
    ],
    weights: Weights = ...,
    output: Output = ...,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    parts: Annotated[
        int,
        typer.Option("--parts", min=1, help="k-means clusters of the patch features, shared by the images."),
    ] = 5,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size",
            min=0,
            help="Resize the shorter side to S, the aspect ratio kept, then crop to a multiple of the "
            "patch size; 0 keeps the original size.",
        ),
    ] = 448,
    foreground: Annotated[
        bool,
        typer.Option(
            "--foreground/--no-foreground",
            help="Colour only the foreground (the first principal component thresholded), with a PCA "
            "refitted on it, as DINOv2's Fig. 1; --no-foreground colours every patch.",
        ),
    ] = True,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            show_default=False,
            help="Foreground threshold on the first component scaled to [0, 1] over the images "
            "(default: Otsu's threshold of its values).",
        ),
    ] = None,
    fit_patches: Annotated[
        int,
        typer.Option(
            "--fit-patches",
            min=10,
            help="Fit the PCA and k-means on at most this many patches (a seeded sample beyond).",
        ),
    ] = 200_000,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            min=1,
            help="The most patch tokens an image may become at the asked size; an image beyond it is "
            "refused before the work, with the size that fits.",
        ),
    ] = 100_000,
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
    """Pictures of the patch features of images, fitted jointly over all of them so that a part gets
    the same colour in every image: the PCA colours of the foreground (DINOv2 Fig. 1), the foreground
    mask, and k-means parts (co-segmentation); the arrays (.npy) beside the pictures."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import check_run_folder, write_metrics

    setup_logging(quiet)
    check_run_folder(output, overwrite)  # the run takes the folder once the model is loaded
    from dinokit.eval.patches_run import PatchesRunConfig, run_patches  # torch: once the checks above passed
    from dinokit.runtime import embedding_precision

    cfg = config_from(PatchesRunConfig, options, image_size=image_size or None,
                      precision=embedding_precision(precision, device))  # fmt: skip
    with RichProgress(quiet=quiet) as progress:
        result = run_patches(cfg, progress)
    write_metrics(result.output, result.metrics, result.config)
    share = result.foreground_fraction
    console.print(
        f"Wrote the PCA colours, foreground and {plural(parts, 'part')} of "
        f"{plural(result.images, 'image')} to {result.output} (overview.png; "
        + (f"foreground {share:.0%} of the patches)." if share is not None else "every patch coloured).")
    )
    if result.skipped:
        console.print(f"{plural(result.skipped, 'unreadable image')} skipped (--strict stops at the first).")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("patches")(patches)
