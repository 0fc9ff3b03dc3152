"""``dinokit copydetect``: the Copydays copy-detection protocol (mAP per block)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, is_main_process, plural, print_table, setup_logging
from ._option_checks import require_weights
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
    Whitening,
    config_from,
)
from ._progress import RichProgress


def copydetect(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="The Copydays root: original/, strong/, jpegqual/<q>/, crops/<c>/ (block sizes are read "
            "from the folders; other folders are ignored).",
        ),
    ],
    output: Output,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    image_size: Annotated[
        int, typer.Option("--image-size", min=1, help="Images are resized to this square (aspect ignored).")
    ] = 320,
    distractors: Annotated[
        Optional[Path],
        typer.Option("--distractors", help="A folder of distractor images added to the database."),
    ] = None,
    whitening: Whitening = None,
    top: Annotated[
        int, typer.Option("--k", min=0, help="Score the top N results of each query (0: the whole ranking).")
    ] = 20,
    batch_size: BatchSize = 32,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Copy detection on Copydays: rank the originals (plus distractors) for every edited copy and
    report the mAP of each block (strong is the headline)."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import prepare_output_dir, write_metrics

    setup_logging(quiet)
    require_weights(weights)
    prepare_output_dir(output, overwrite=overwrite)
    from dinokit.eval.copy_detection import UNITS, CopyDetectionConfig, copy_detection  # torch: once checked

    cfg = config_from(CopyDetectionConfig, options)
    with RichProgress(quiet=quiet) as progress:
        result = copy_detection(cfg, progress)
    if not is_main_process():
        return
    metrics = result.to_metrics()
    write_metrics(output, metrics, config={**asdict(cfg), "normalization": result.normalization}, units=UNITS)
    rows = [[block, result.queries[block], 100.0 * value] for block, value in result.mAP.items()]
    # strong first: it is the headline number
    rows.sort(key=lambda r: r[0] != "strong")
    title = f"Copydays mAP (%), database {plural(result.database_size, 'image')}"
    if result.whitening:
        title += ", whitened"
    print_table(title, ["block", "queries", "mAP"], rows)
    unreadable = sum(result.unreadable.values())
    if unreadable:
        console.print(f"{plural(unreadable, 'unreadable image')} skipped.")
    # one scale per score on screen (percent, as the table); metrics.json keeps the protocol's fraction
    console.print(
        f"strong mAP {100 * result.headline:.2f}% (metrics.json: fractions); results in {output / 'metrics.json'}",
        highlight=False,
    )


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("copydetect")(copydetect)
