"""Pieces every training loop shares: the schedules' shape, RNG state in checkpoints, and stopping
cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import math
import random
import signal
from types import FrameType

import numpy as np
import torch


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: ``linspace(start, base, W*I)`` (endpoints included), then for
    i = 0 .. E*I - W*I - 1: ``final + 0.5 (base - final)(1 + cos(pi i / (E*I - W*I)))``
    (DINO spec, "Schedules"; value k is used at global iteration k)."""
    total = int(epochs * niter_per_ep)
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    rest = total - warmup_iters
    iters = np.arange(rest)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(rest, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def get_rng_state() -> dict:
    """Python, numpy and torch RNG states in a form ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GracefulStop:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps.

    Use as a context manager; ``stop.requested`` becomes true and ``stop.signum`` holds the signal.
    A second signal of the same kind falls back to the default behaviour (immediate exit).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

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
