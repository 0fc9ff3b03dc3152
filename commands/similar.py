"""``dinokit similar``: a folder's images ranked by similarity to query images."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ._console import console, is_main_process, plural, print_table, setup_logging
from ._option_checks import require_inputs, require_weights
from ._options import (
    Arch,
    BatchSize,
    CacheDir,
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


def similar(
    queries: Annotated[
        list[str],
        typer.Argument(help="Query images: files, folders or glob patterns.", show_default=False),
    ],
    against: Annotated[
        Path,
        typer.Option("--against", help="The folder of images to rank (recursively).", show_default=False),
    ],
    output: Output,
    k: Annotated[int, typer.Option("--k", min=1, help="Matches kept per query, most similar first.")] = 5,
    whitening: Whitening = None,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    image_size: Annotated[
        int, typer.Option("--image-size", min=1, help="Images are resized to this square (aspect ignored).")
    ] = 320,
    sheet_queries: Annotated[
        int, typer.Option("--sheet-queries", min=0, help="Queries shown in the contact sheet (0: no sheet).")
    ] = 24,
    batch_size: BatchSize = 32,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    cache_dir: CacheDir = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Rank the images of a folder by similarity to query images (the copy-detection descriptor of
    duplicates, cosine similarity): the top --k per query in similar.csv and similar.json, and a
    contact sheet of each query with its matches (similar.png). A query's own file is never its match.
    Descriptors are shared with duplicates runs of the same weights and settings (--cache-dir)."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import prepare_output_dir, write_metrics

    setup_logging(quiet)
    require_weights(weights)
    require_inputs(("folder given with --against", against), ("whitening folder", whitening))
    prepare_output_dir(output, overwrite=overwrite)
    from dinokit.eval.similar import SimilarConfig, find_similar, write_similar  # torch: once checked
    from dinokit.runtime import embedding_precision
    from dinokit.viz import similar_sheet

    cfg = config_from(SimilarConfig, options, precision=embedding_precision(precision, device))
    with RichProgress(quiet=quiet) as progress:
        result = find_similar(cfg, progress)
    if not is_main_process():
        return
    write_similar(result, output)
    sheet = (
        similar_sheet(result.queries, output / "similar.png", max_rows=sheet_queries)
        if sheet_queries
        else None
    )
    write_metrics(output, result.summary(), config={**asdict(cfg), "normalization": result.normalization})
    rows = [
        [Path(q.query).name, m.rank, f"{m.score:.3f}", m.image] for q in result.queries[:5] for m in q.matches
    ]
    if rows:
        print_table("Most similar images (cosine similarity)", ["query", "rank", "similarity", "image"], rows)
    console.print(
        f"{plural(result.n_queries, 'query')} against {plural(result.n_against, 'image')}; embedded "
        f"{plural(result.embedded, 'new image')}, reused {result.reused}"
        + (f", skipped {result.unreadable} unreadable" if result.unreadable else "")
        + "."
    )
    console.print(f"Results in {output / 'similar.csv'}" + (f" and {sheet}" if sheet else ""))


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("similar")(similar)
