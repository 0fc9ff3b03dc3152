"""What the training commands (pretrain, finetune, linear, ...) share on the command line: the run
options with one meaning each (docs/guarantees.md), the options a user typed, and the closing
sentence of a run that stopped before the end of its schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from ._console import console, console_err
from ._options import RUN_PANEL, RUNTIME_PANEL

Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        rich_help_panel=RUN_PANEL,
        help="Continue the run in --output from its checkpoint.pth, with its own recipe (refused "
        "where there is no run).",
    ),
]
StopAfter = Annotated[
    int | None,
    typer.Option(
        "--stop-after",
        min=1,
        rich_help_panel=RUN_PANEL,
        help="End cleanly when N epochs of the schedule are done, counted from the run's start "
        "(resumable; a resumed run already past N ends at once).",
    ),
]
#: the same for a loop counted in iterations (the dense probes)
StopAfterIterations = Annotated[
    int | None,
    typer.Option(
        "--stop-after",
        min=1,
        rich_help_panel=RUN_PANEL,
        help="End cleanly when N iterations of the schedule are done, counted from the run's "
        "start (resumable; a resumed run already past N ends at once).",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        rich_help_panel=RUNTIME_PANEL,
        help="CPU threads for the compute (default: the cores other programs leave free when the "
        "run starts; --resume keeps the run's count).",
    ),
]


def typed_options(ctx: typer.Context) -> set[str]:
    """The options the user gave (not defaults): a resumed run takes the others from its record, and the
    notes on a short run name the values the user chose. Given means on the command line or through an
    option's environment variable (a value set on purpose either way); a default, or a value from the
    context's default map, is not given. The one answer to "which options did the user type"."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            out.add(name)
    return out


#: who says how a stopped run goes on, when a training command runs as one step of a larger
#: command (``dinokit demo``): that command's own resume line, not the step's
_stop_reporters: list[Callable[[str | None], None]] = []


@contextlib.contextmanager
def stop_reported_by(reporter: Callable[[str | None], None]) -> Iterator[None]:
    """Within the block, a training run that stops early calls ``reporter(stopped_by)`` instead of
    printing its own resume command."""
    _stop_reporters.append(reporter)
    try:
        yield
    finally:
        _stop_reporters.remove(reporter)


def report_stop(
    command: str, output, unit: str, done: int, total: int, stopped_by: str | None, where: str | None = None
) -> None:
    """The one sentence for a run that ended before its schedule did: by a signal (on stderr; ``where``
    says where in a unit it stopped) or by --stop-after, with the command that continues it."""
    if stopped_by and _stop_reporters:
        _stop_reporters[-1](stopped_by)
        return
    hint = f"dinokit {command} --output {output} --resume"
    if stopped_by and stopped_by != "stop-after":
        where = where or f"after {done} full {unit}s of {total}"
        console_err.print(f"Stopped by {stopped_by} {where}; the checkpoint is saved. Resume with: {hint}",
                          highlight=False)  # fmt: skip
    elif stopped_by == "stop-after":
        console.print(
            f"Stopped after {unit} {done} of {total} (--stop-after). Resume with: {hint}", highlight=False
        )


#: the training commands' runs as run.TrainingRun knows them (their RunKind's noun; every one keeps its
#: state in checkpoint.pth), named here so that a command refuses its folder before its heavy imports
RUN_NOUNS = {
    "pretrain": "pretraining run",
    "finetune": "fine-tuning run",
    "linear": "linear probe run",
    "segment": "segmentation probe run",
}
RUN_CHECKPOINT = "checkpoint.pth"


def check_run_output(command: str, output, *, resume: bool, overwrite: bool) -> None:
    """The refusals of a training command's --output (see dinokit.io.check_training_folder), at once."""
    from dinokit.io import check_training_folder

    from ._console import is_main_process

    check_training_folder(output, RUN_CHECKPOINT, RUN_NOUNS[command], resume=resume, overwrite=overwrite,
                          main=is_main_process())  # fmt: skip
