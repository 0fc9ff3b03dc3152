"""``dinokit duplicates``: every near-duplicate pair in a folder (or between two folders)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

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


def duplicates(
    folder: Annotated[Path, typer.Argument(help="The folder of images to search (recursively).")],
    output: Output,
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            help="Pair FOLDER's images only with this folder's images (e.g. a reference collection).",
        ),
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--min-similarity",
            help="Cosine similarity from which two images count as near-duplicates "
            "(default 0.9, or 0.5 with --whitening).",
        ),
    ] = None,
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
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="exact (every pair, in blocks) or faiss (approximate nearest neighbours, for millions of "
            "images; needs the faiss extra: pip install faiss-cpu).",
        ),
    ] = "exact",
    neighbours: Annotated[
        int, typer.Option("--k", min=1, help="With --backend faiss: neighbours looked at per image.")
    ] = 10,
    max_pairs: Annotated[
        int, typer.Option("--max-pairs", min=1, help="Keep at most this many pairs (the most similar).")
    ] = 100_000,
    sheet_pairs: Annotated[
        int, typer.Option("--sheet-pairs", min=0, help="Pairs shown in the contact sheet (0: no sheet).")
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
    """Find near-duplicate images: pairs with their similarity (pairs.csv, pairs.json), the groups
    they join (clusters.csv, clusters.json: an image and its copies are one cluster) and a contact
    sheet of the closest pairs (pairs.png). Descriptors are stored once per weights and settings
    (--cache-dir) and reused by later duplicates and similar runs: only new or changed images are
    embedded. Warns when the result cannot mean much (random weights, nearly every pair similar)."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import prepare_output_dir, write_metrics

    setup_logging(quiet)
    require_weights(weights)
    require_inputs(
        ("folder", folder), ("folder given with --against", against), ("whitening folder", whitening)
    )
    prepare_output_dir(output, overwrite=overwrite)
    from dinokit.eval.duplicates import (  # torch: once the checks above passed
        UNITS,
        DuplicatesConfig,
        find_duplicates,
        write_clusters,
        write_pairs,
    )
    from dinokit.runtime import embedding_precision
    from dinokit.viz import contact_sheet

    cfg = config_from(DuplicatesConfig, options, precision=embedding_precision(precision, device))
    with RichProgress(quiet=quiet) as progress:
        result = find_duplicates(cfg, progress)
    if not is_main_process():
        return
    write_pairs(result, output)
    write_clusters(result, output)
    sheet = contact_sheet(result.pairs, output / "pairs.png", max_pairs=sheet_pairs) if sheet_pairs else None
    write_metrics(
        output, result.summary(), config={**asdict(cfg), "normalization": result.normalization}, units=UNITS
    )
    rows = [[i + 1, f"{p.score:.3f}", p.image_a, p.image_b] for i, p in enumerate(result.pairs[:10])]
    if rows:
        print_table(
            f"Near-duplicate pairs (similarity >= {result.threshold:g})",
            ["#", "score", "image", "image"],
            rows,
        )
    searched = plural(result.n_images, "image") + (f" against {result.n_against}" if cfg.against else "")
    # images counts the readable ones searched; files read now and from the index count every file
    console.print(
        f"{plural(len(result.pairs), 'pair')} in {plural(len(result.clusters), 'cluster')} "
        f"({plural(sum(len(c.images) for c in result.clusters), 'image')}) among {searched}"
        + (f" ({plural(result.unreadable, 'unreadable image')} skipped)" if result.unreadable else "")
        + f"; {plural(result.embedded, 'file')} read now, {result.reused} from the index.",
        highlight=False,
    )
    q = result.nearest_neighbour_quantiles
    if q:
        console.print(
            f"Nearest-neighbour similarity: median {q['p50']:.3f}, 90th percentile {q['p90']:.3f}, "
            f"99th {q['p99']:.3f} (threshold {result.threshold:g})."
        )
    console.print(f"Results in {output / 'pairs.csv'}" + (f" and {sheet}" if sheet else ""))


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("duplicates")(duplicates)
