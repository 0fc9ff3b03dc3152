"""``dinokit davis-score``: the DAVIS 2017 semi-supervised J&F of a results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, print_table, setup_logging
from ._options import Overwrite, Quiet
from ._progress import RichProgress


def print_davis_table(scores) -> None:
    """J&F, J and F per sequence and over all objects (a :class:`dinokit.eval.davis_metrics.DavisScores`)."""
    overall = scores.overall()
    keys = ("J&F-Mean", "J-Mean", "F-Mean")
    # fractions (0-1), the scale of metrics.json and of the official scorer's CSVs
    rows = [[seq, *(f"{v[k]:.4f}" for k in keys)] for seq, v in scores.per_sequence().items()]
    rows.append(["all objects", *(f"{overall[k]:.4f}" for k in keys)])
    print_table("DAVIS 2017 (semi-supervised), fractions (0-1)", ["sequence", "J&F", "J", "F"], rows)


def davis_score(
    gt: Annotated[
        Path,
        typer.Option(
            "--gt", help="Ground truth: a folder of <seq>/ folders of indexed PNGs, or a DAVIS root."
        ),
    ],
    pred: Annotated[
        Path, typer.Option("--pred", help="Results: a folder of <seq>/ folders of indexed PNGs.")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The folder for metrics.json and the CSVs, or the --pred folder itself to write beside the "
            "predictions.",
        ),
    ],
    split: Annotated[
        str, typer.Option("--split", help="The split list of a DAVIS root, also used in the CSV names.")
    ] = "val",
    sequences: Annotated[
        Optional[str], typer.Option("--sequences", help="Only these sequences, comma-separated.")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score predicted masks with the official DAVIS 2017 semi-supervised J (region) and F (boundary).

    Objects are the labels of the first ground-truth frame; the first and the last frame are not
    scored. Writes metrics.json (fractions, with per_object), global_results-<split>.csv and
    per-sequence_results-<split>.csv into --output; --output set to the --pred folder writes them beside
    the predictions, as the official DAVIS evaluator does. Like every command it never replaces existing
    results without --overwrite: scoring a folder twice, or scoring a `dinokit davis` run (whose
    metrics.json records its weights and videos) into its own folder, is refused with a sentence that
    says to pass another --output or --overwrite.
    """
    from dinokit.io import lock_run_folder, make_output_folder, write_metrics

    setup_logging(quiet)
    names = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    # into the prediction folder, as the official evaluator does: the --pred path itself, however
    # --output spells it, so the checks below look at the files that would be replaced
    beside = Path(output).resolve() == Path(pred).resolve()
    out = Path(pred) if beside else Path(output)
    if not beside:
        _check_destination(out, split, overwrite, beside=False)
    make_output_folder(out)
    lock_run_folder(
        out
    )  # one writer at a time (a davis run into the prediction folder too); freed at the end
    if not beside:
        _check_destination(out, split, overwrite, beside=False)  # again, now that no one else writes there
    from dinokit.eval.davis_metrics import UNITS, evaluate_davis  # numpy, scipy: once the checks passed

    with RichProgress(quiet=quiet) as progress:
        scores = evaluate_davis(gt, pred, split=split, sequences=names, progress=progress)
    if beside:  # the prediction folder: checked once it is known to hold predictions
        _check_destination(out, split, overwrite, beside=True)
    out.mkdir(parents=True, exist_ok=True)
    config = {"gt": gt, "pred": pred, "split": split, "sequences": scores.sequences}
    path = write_metrics(out, scores.metrics(), config=config, units=UNITS)
    g, s = scores.write_csvs(out, split)
    print_davis_table(scores)
    overall = scores.overall()
    console.print(
        "J&F-Mean {:.4f}  J-Mean {:.4f}  J-Recall {:.4f}  J-Decay {:.4f}  F-Mean {:.4f}  F-Recall {:.4f}  "
        "F-Decay {:.4f}".format(
            *(
                overall[k]
                for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
            )
        ),
        highlight=False,
    )
    console.print(f"Wrote {path}, {g.name} and {s.name}.", highlight=False)


def _check_destination(out: Path, split: str, overwrite: bool, beside: bool) -> None:
    """Refuse to replace the results already in ``out`` without --overwrite (before anything is written);
    ``beside``: ``out`` is the prediction folder, whose metrics.json may be a `dinokit davis` run's record."""
    import json

    from dinokit.errors import OutputExistsError

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output {out} is a file, not a folder; choose a folder path.")
    results = [
        out / "metrics.json",
        out / f"global_results-{split}.csv",
        out / f"per-sequence_results-{split}.csv",
    ]
    existing = [p for p in results if p.exists()]
    if not existing or overwrite:
        return
    try:
        record = json.loads(results[0].read_text(encoding="utf-8")) if results[0].is_file() else {}
    except (OSError, ValueError):
        record = {}
    if beside and isinstance(record, dict) and "videos" in record:
        raise OutputExistsError(
            f"{out} is a `dinokit davis` run whose metrics.json records its weights and videos; pass --output "
            "with another folder for these scores (or --overwrite to replace that record)."
        )
    hint = (
        "pass --output with another folder, or --overwrite to replace it"
        if beside
        else "pass --overwrite to replace it"
    )
    raise OutputExistsError(f"{existing[0]} already exists; {hint}.")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("davis-score")(davis_score)
