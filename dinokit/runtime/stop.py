"""Stopping cleanly: SIGINT/SIGTERM as a flag the loops check (:class:`GracefulStop`), the stop agreed
across ranks, the shell's exit codes, the finite-loss check and the check of option values."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Union

import torch

from ..errors import DinokitError
from .distributed import max_over_ranks

#: what signal.signal takes and returns
_Handler = Union[Callable[[int, FrameType | None], Any], int, signal.Handlers, None]


class GracefulStop:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps.

    Use as a context manager; ``stop.requested`` becomes true and ``stop.signum`` holds the signal.
    A second signal of the same kind falls back to the default behaviour (immediate exit).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.signum: int | None = None
        self._old: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.signum)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulStop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def signal_exit_code(signum: int | None) -> int:
    """The shell's exit status for a run stopped by ``signum``: 128 + the signal number (130 for
    Ctrl-C, 143 for SIGTERM), 0 when no signal stopped it."""
    return 128 + int(signum) if signum else 0


def agreed_stop_signal(stop: GracefulStop, device: torch.device | None = None) -> int:
    """The signal any rank got (0 for none), the same on every rank: all ranks stop at the same
    step, so that the collectives of the next step and the checkpoint's all-gather still match."""
    return int(max_over_ranks([stop.signum or 0], device)[0])


def ensure_finite_loss(loss: float, message: str, *, elsewhere: bool = False) -> None:
    """Stop a run whose loss is NaN or infinite: a number is right or refused. ``message`` (with
    ``{loss}`` for the value) says where it happened and what to try; ``elsewhere`` says another
    rank's loss was not finite (every rank stops at the same step)."""
    if elsewhere or not math.isfinite(loss):
        raise DinokitError(message.format(loss=loss))


def check_numbers(
    config: object,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    fractions: tuple[str, ...] = (),
) -> None:
    """Refuse option values that would train silently wrong (a negative lr climbs the loss; NaN
    spreads to every weight): each named field of ``config`` must be a finite number, ``positive``
    ones above 0, ``non_negative`` ones 0 or more, ``fractions`` within [0, 1]. None (unset) passes."""
    rules = [(n, "a positive", lambda v: v > 0) for n in positive]
    rules += [(n, "a non-negative", lambda v: v >= 0) for n in non_negative]
    rules += [(n, "a fraction in [0, 1], a", lambda v: 0 <= v <= 1) for n in fractions]
    for name, kind, holds in rules:
        value = getattr(config, name)
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and holds(value)):
            raise DinokitError(f"--{name.replace('_', '-')} must be {kind} finite number, got {value}.")
