"""``dinokit retrieval``: landmark retrieval on revisited Oxford and Paris (mAP, mP@k)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ._console import console, is_main_process, plural, print_table, setup_logging
from ._option_checks import require_weights
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


def retrieval(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="The folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (or the dataset folder itself).",
        ),
    ],
    dataset: Annotated[str, typer.Option("--dataset", help="roxford5k or rparis6k.")],
    output: Output,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    image_size: Annotated[
        int, typer.Option("--image-size", min=1, help="Long side of the images (aspect kept, Lanczos).")
    ] = 224,
    multiscale: Annotated[
        bool, typer.Option("--multiscale", help="Average the descriptor over scales 1, 1/sqrt(2) and 1/2.")
    ] = False,
    crop_queries: Annotated[
        bool,
        typer.Option(
            "--crop-queries",
            help="Crop each query to its ground-truth box first (the revisited toolkit's protocol); by default "
            "the whole query image is used, as the DINO reference did for the paper's table.",
        ),
    ] = False,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Image retrieval on revisited Oxford or Paris: mAP and mP@1/5/10 (percent) under the Medium
    and Hard protocols."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import prepare_output_dir, write_metrics

    setup_logging(quiet)
    require_weights(weights)
    prepare_output_dir(output, overwrite=overwrite)
    from dinokit.eval.retrieval import UNITS, RetrievalConfig, image_retrieval  # torch: once checked

    cfg = config_from(RetrievalConfig, options)
    with RichProgress(quiet=quiet) as progress:
        result = image_retrieval(cfg, progress)
    if not is_main_process():
        return
    write_metrics(
        output,
        result.to_metrics(),
        config={**asdict(cfg), "normalization": result.normalization},
        units=UNITS,
    )
    rows = [
        [proto.capitalize(), result.mAP[proto], *(result.mP[proto][k] for k in ("1", "5", "10"))]
        for proto in ("medium", "hard")
    ]
    print_table(
        f"{dataset}: {result.queries} queries, {result.database} images (percent)",
        ["protocol", "mAP", "mP@1", "mP@5", "mP@10"],
        rows,
    )
    unreadable = sum(result.unreadable.values())
    if unreadable:
        console.print(f"{plural(unreadable, 'unreadable image')} skipped.")
    console.print(f"Queries: {result.query_region}. Results in {output / 'metrics.json'}")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("retrieval")(retrieval)
