"""The CLI's progress: rich bars on a terminal, a plain heartbeat line in logs."""

from __future__ import annotations

import time
from typing import Any

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

from ._console import console_err, plural

#: without a terminal, a progress line at least this often (seconds) ...
HEARTBEAT_SECONDS = 30.0
#: ... and at each tenth of the work, but not more often than this
HEARTBEAT_MIN_SECONDS = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _RichTask:
    def __init__(self, progress: RichProgress, task_id, total, description: str = ""):
        self._p = progress
        self._id = task_id
        self._fields: dict[str, Any] = {}
        self._start = self._last_log = time.monotonic()
        self._done = 0
        self._logged_done = 0
        self._total = total
        self._description = description

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
        elif self._p.log_lines and self._heartbeat_due():
            self._heartbeat()

    def _heartbeat_due(self) -> bool:
        """Every HEARTBEAT_SECONDS, or at each further tenth of the work once MIN_SECONDS have passed."""
        since = time.monotonic() - self._last_log
        if since >= HEARTBEAT_SECONDS:
            return True
        if self._total and since >= HEARTBEAT_MIN_SECONDS:
            return int(10 * self._done / self._total) > int(10 * self._logged_done / self._total)
        return False

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._last_log, self._logged_done = now, self._done
        elapsed = now - self._start
        if self._total:
            share = min(self._done / self._total, 1.0)
            eta = f", eta {_duration(elapsed * (1 - share) / share)}" if 0 < share < 1 else ""
            where = f"{self._done}/{self._total} ({100 * share:.0f}%)"
        else:
            eta, where = "", str(self._done)
        info = self._info()
        console_err.print(
            f"{self._description}: {where}, {_duration(elapsed)}{eta}" + (f", {info}" if info else ""),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )

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

    Bars are drawn only on a terminal and not with ``--quiet``; elsewhere (a log file, a scheduler)
    a plain line says how far the work is every 30 s, and at each tenth of it (at most every 5 s).
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
            steps = plural(total, "step") if total is not None else "? steps"
            console_err.print(f"{description} ({steps})", highlight=False, markup=False, soft_wrap=True)
        return _RichTask(self, task_id, total, description)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False)
        else:
            console_err.print(message, highlight=False)
