"""The consoles (pipe-safe: a line written to a log is never wrapped), logging, tables and the small
sentences every command prints."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console

#: the width of a table written to a pipe or a file: wide enough that rows stay whole
PIPE_WIDTH = 400


class LogConsole(Console):
    """A rich console that draws for a terminal, but writes to a pipe or a file (logs, SLURM) without
    wrapping: a path or a record stays on one line, whatever COLUMNS says."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)

    @property
    def size(self):
        size = super().size
        if not self.is_terminal and self._width is None:
            return size.__class__(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


console = LogConsole()
console_err = LogConsole(stderr=True)


class PlainLogHandler(logging.Handler):
    """Log records for a pipe or a file: ``LEVEL message`` on one line, no padding, no wrapping."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record never stops the program
            self.handleError(record)
            return
        console_err.file.write(f"{record.levelname} {message}\n")
        console_err.file.flush()


def setup_logging(quiet: bool = False) -> None:
    """The ``dinokit`` logger on stderr: rich lines on a terminal, plain unpadded lines elsewhere."""
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("dinokit")
    logger.setLevel(level)
    kind = RichHandler if console_err.is_terminal else PlainLogHandler
    for h in [
        h for h in logger.handlers if isinstance(h, (RichHandler, PlainLogHandler)) and type(h) is not kind
    ]:
        logger.removeHandler(h)
    if not any(type(h) is kind for h in logger.handlers):
        if kind is RichHandler:
            handler = RichHandler(console=console_err, show_path=False, show_time=False, markup=False)
        else:
            handler = PlainLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


#: a training run with fewer optimisation steps than this is short: the paper's learning rates, made
#: for ImageNet-size runs (hundreds of thousands of steps), barely move the weights in it
SHORT_RUN_STEPS = 1000


def short_run_note(command: str, steps: int, lr_option_given: bool, lr_text: str) -> str | None:
    """The one line that says which option to raise when a run with the paper's learning rate is short
    (``None`` for a run of real size, or when --lr was chosen)."""
    if lr_option_given or steps >= SHORT_RUN_STEPS:
        return None
    return (
        f"Note: this {command} run made {plural(steps, 'optimisation step')} with the paper's learning rate "
        f"({lr_text}), made for runs of hundreds of thousands of steps; on small data raise --lr "
        "(or --epochs) to learn more than chance."
    )


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 class``, ``2 classes``, ``1 query``, ``2 queries``: a count with its noun in the right number."""
    if n == 1:
        return f"{n} {word}"
    if many is None and word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        many = word[:-1] + "ies"
    return f"{n} {many or word + ('es' if word.endswith(('s', 'x', 'sh', 'ch')) else 's')}"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process without a launcher (read from RANK, without torch)."""
    from dinokit.io import is_main_rank

    return is_main_rank()
