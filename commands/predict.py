"""``dinokit predict``: class probabilities from a model that ``dinokit finetune`` wrote."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated

import typer

from ._console import console, plural, setup_logging
from ._options import (
    BatchSize,
    Device,
    ExactDecode,
    Mean,
    NumWorkers,
    Overwrite,
    Precision,
    Quiet,
    Std,
    Strict,
)
from ._progress import RichProgress


def predict(
    images: Annotated[
        list[str], typer.Argument(help="Images, folders (searched recursively) or glob patterns.")
    ],
    model: Annotated[
        Path, typer.Option("--model", "-m", help="A fine-tuned model: RUN/model.pth or RUN/best.pth.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="A .csv or .json file, or - to print a table.")
    ],
    top: Annotated[
        int, typer.Option("--k", min=1, help="How many classes to report per image (the top k).")
    ] = 5,
    mean: Mean = None,
    std: Std = None,
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict the classes of images with a fine-tuned model, batched.

    --output preds.csv or preds.json writes the predictions to that file; --output - prints them as a
    table instead, one row per image with its top classes and their probabilities.
    """
    from dinokit.errors import DinokitError
    from dinokit.io import check_output_file

    setup_logging(quiet)
    to_table = str(output) == "-"
    if not to_table:
        if output.suffix.lower() not in (".csv", ".json"):
            raise DinokitError(f"--output {output} must end in .csv or .json (or be - to print a table).")
        check_output_file(output, overwrite)
    from dinokit.eval.predict import predict_images  # torch: once the checks above passed

    with RichProgress(quiet=quiet) as progress:
        res = predict_images(
            model,
            images,
            top=top,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            progress=progress,
            strict=strict,
            exact_decode=exact_decode,
            mean=mean,
            std=std,
        )
    k = len(res.top_classes[0]) if res.top_classes else min(top, len(res.classes))
    if res.skipped:
        import logging

        logging.getLogger("dinokit").warning(
            "%s skipped (first: %s).", plural(len(res.skipped), "unreadable image"), res.skipped[0]
        )
    if to_table:
        _print_table(res, model, k)
        return
    _write_predictions(res, model, k, output)
    if not quiet:
        console.print(f"{plural(len(res.paths), 'prediction')} written to {output}.", highlight=False)


def _print_table(res, model, k: int) -> None:
    """The predictions as a table on the terminal, paths relative to the folder they share."""
    import os

    from rich.table import Table

    base = os.path.commonpath([str(p.parent.resolve()) for p in res.paths]) if res.paths else ""
    table = Table(title=f"dinokit predict: {model}" + (f"\nimages under {base}" if base else ""))
    table.add_column("image", overflow="fold")
    for i in range(k):
        table.add_column(f"#{i + 1}")
    for p, cs, ps in zip(res.paths, res.top_classes, res.top_probs):
        table.add_row(os.path.relpath(p.resolve(), base), *[f"{c} {100 * q:.1f}%" for c, q in zip(cs, ps)])
    console.print(table)


def _write_predictions(res, model, k: int, output: Path) -> None:
    """preds.csv (one row per image: path, then class and probability per rank) or preds.json."""
    from dinokit.io import atomic_write_text, inert_cell, to_json

    if output.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["path"]
        for i in range(1, k + 1):
            header += [f"class_{i}", f"prob_{i}"]
        writer.writerow(header)
        for p, cs, ps in zip(res.paths, res.top_classes, res.top_probs):
            row: list = [inert_cell(p)]  # a name a spreadsheet would run as a formula is written inert
            for c, q in zip(cs, ps):
                row += [inert_cell(c), f"{q:.6f}"]
            writer.writerow(row)
        atomic_write_text(output, buf.getvalue())
    else:
        data = {
            "model": str(model),
            "classes": res.classes,
            "top": k,
            "predictions": [
                {"path": str(p), "top": [{"class": c, "probability": q} for c, q in zip(cs, ps)]}
                for p, cs, ps in zip(res.paths, res.top_classes, res.top_probs)
            ],
            "skipped": [str(p) for p in res.skipped],
            "normalization": res.normalization.record(),
        }
        atomic_write_text(output, to_json(data) + "\n")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("predict")(predict)
