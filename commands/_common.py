"""What every subcommand shares: option definitions, error handling, console and progress bars."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dinokit.errors import DinokitError

console = Console()
console_err = Console(stderr=True)


def _hide_flag_types() -> None:
    """Recent typer labels every on/off flag ``<bool>`` in rich help; a flag takes no value, show none."""
    option_cls = getattr(typer.core, "TyperOption", None)
    original = getattr(option_cls, "display_type_rich", None)
    if original is None or getattr(original, "_dinokit", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._dinokit = True
    option_cls.display_type_rich = display_type_rich


_hide_flag_types()


def version_callback(value: bool) -> None:
    if value:
        from dinokit import __version__

        console.print(f"dinokit {__version__}")
        raise typer.Exit()


def _plain_error(message: str) -> str:
    message = " ".join(str(message).split())
    return message if message.endswith((".", "!", "?")) else message + "."


class DinokitGroup(typer.core.TyperGroup):
    """Turns dinokit's own errors (and unreadable files) into one sentence and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DinokitError as e:
            # soft_wrap: the sentence stays on one line in logs (rich would wrap it at 80 columns)
            console_err.print(f"[bold red]Error:[/] {escape(_plain_error(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=e.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            name = e.filename or ""
            console_err.print(
                f"[bold red]Error:[/] cannot use {escape(str(name))}: {e.strerror}.", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None


# -- shared options (same names and meaning in every command) ------------------------------------
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Backbone: vit_tiny, vit_small, vit_base, resnet50, or a DINOv2/DINOv3 hub name such as dinov2_vits14, "
        "dinov2_vits14_reg, dinov3_vits16 (inferred from --weights).",
    ),
]
PatchSize = Annotated[
    int | None, typer.Option("--patch-size", help="ViT patch size in pixels (inferred from --weights).")
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="A checkpoint path, a preset (dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, dino_resnet50; "
        "DINOv2 dinov2_vits14 ... dinov2_vitg14_reg; DINOv3 dinov3_vits16 ... dinov3_vith16plus once in the cache) "
        "or 'random'.",
    ),
]
CheckpointKey = Annotated[
    str, typer.Option("--checkpoint-key", help="Which weights of a training checkpoint: teacher or student.")
]
Output = Annotated[Path, typer.Option("--output", "-o", help="The run folder for results.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch (per process).")]
NumWorkers = Annotated[int, typer.Option("--num-workers", min=0, help="Data-loading worker processes.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto, fp32, bf16 or fp16. auto = bf16 for training where the hardware has native bf16, "
        "fp32 for evaluation.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
OptionalWeights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="A checkpoint path, a preset (dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, dino_resnet50; "
        "DINOv2 dinov2_vits14 ... dinov2_vitg14_reg; DINOv3 dinov3_vits16 ... dinov3_vith16plus once in the cache) or "
        "'random' (a randomly initialised baseline); needed wherever images are embedded.",
    ),
]
Train = Annotated[Path | None, typer.Option("--train", help="Labelled training images (ROOT/<class>/<image>).")]
Val = Annotated[Path | None, typer.Option("--val", help="Labelled validation images (ROOT/<class>/<image>).")]
TrainFeatures = Annotated[
    Path | None, typer.Option("--train-features", help="A features file from dinokit features (instead of --train).")
]
ValFeatures = Annotated[
    Path | None, typer.Option("--val-features", help="A features file from dinokit features (instead of --val).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its checkpoint.")]
StopAfter = Annotated[
    int | None, typer.Option("--stop-after", min=1, help="End cleanly after N epochs of the schedule (resumable).")
]
CheckpointMinutes = Annotated[
    float,
    typer.Option(
        "--checkpoint-minutes", min=0.0,
        help="Also write checkpoint.pth every this many minutes within an epoch, so that a killed run "
        "loses at most that much (0: only at the end of each epoch).",
    ),
]
Whitening = Annotated[
    Path | None, typer.Option("--whitening", help="A folder of other images to learn the whitening on.")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Write into an output that already holds results.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def setup_logging(quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("dinokit")
    logger.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=console_err, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class _RichTask:
    def __init__(self, progress: RichProgress, task_id, total):
        self._p = progress
        self._id = task_id
        self._fields: dict[str, Any] = {}
        self._last_log = time.monotonic()
        self._done = 0
        self._total = total

    def _info(self) -> str:
        parts = []
        for k, v in self._fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._fields.update(fields)
        self._done += n
        if self._p.bar is not None:
            self._p.bar.update(self._id, advance=n, info=self._info())
        elif self._p.log_lines and time.monotonic() - self._last_log > 30:
            self._last_log = time.monotonic()
            total = f"/{self._total}" if self._total else ""
            console_err.print(f"  {self._done}{total} {self._info()}", highlight=False)

    def update(self, **fields: Any) -> None:
        self._fields.update(fields)
        if self._p.bar is not None:
            self._p.bar.update(self._id, info=self._info())

    def close(self) -> None:
        if self._p.bar is not None:
            self._p.bar.update(self._id, visible=True, refresh=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RichProgress:
    """The CLI's implementation of :class:`dinokit.progress.Progress`: rich bars with rate and ETA.

    Bars are drawn only on a terminal and not with ``--quiet``; elsewhere a line every 30 s keeps
    logs readable.
    """

    def __init__(self, quiet: bool = False, enabled: bool = True):
        self.quiet = quiet
        show = enabled and not quiet and console_err.is_terminal
        self.log_lines = enabled and not quiet and not show
        self.bar = (
            Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console_err,
                transient=False,
            )
            if show
            else None
        )

    def __enter__(self) -> RichProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int | None = None) -> _RichTask:
        task_id = self.bar.add_task(description, total=total, info="") if self.bar is not None else None
        if self.bar is None and self.log_lines:
            console_err.print(f"{description} ({total if total is not None else '?'} steps)", highlight=False)
        return _RichTask(self, task_id, total)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False)
        else:
            console_err.print(message, highlight=False)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)


def is_main_process() -> bool:
    from dinokit.runtime import dist_env

    return dist_env().is_main
