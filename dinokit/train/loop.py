"""The epoch-loop machinery that training runs share: the data order of an epoch, data-loader
workers that leave signals to the main process, the per-epoch tally a mid-epoch checkpoint keeps,
numbered checkpoint copies every few epochs and the sentence for a loss that is no longer finite.

The run itself (folder, lock, resume policy, thread plan, agreed stop, the time cadence of
checkpoints, the finish) is the skeleton every training command shares, :mod:`dinokit.run`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..run import CheckpointCadence


class EpochSampler(torch.utils.data.Sampler):
    """A DistributedSampler (shuffle, drop_last) cut to whole batches, able to start mid-epoch.

    Over one epoch the ranks together see each of ``world_size * iters * batch_size`` distinct
    indices once; ``set_epoch(epoch, start_iteration)`` skips the batches a resumed run has done.
    """

    def __init__(self, dataset, world_size: int, rank: int, seed: int, batch_size: int):
        self.inner: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.iters = len(self.inner) // batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start_iteration

    def __iter__(self):
        idx = list(self.inner)[: self.iters * self.batch_size]
        return iter(idx[self.start * self.batch_size :])

    def __len__(self) -> int:
        return (self.iters - self.start) * self.batch_size


@dataclass
class EpochTally:
    """What one epoch has counted so far on this process. A checkpoint written mid-epoch keeps it
    (as its ``partial`` record) so that the resumed epoch reports the whole epoch's numbers."""

    seconds: float = 0.0
    images: int = 0
    skipped: int = 0
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "images": self.images,
            "skipped": self.skipped,
            "losses": self.losses,
        }

    @classmethod
    def from_dict(cls, record: dict | None) -> EpochTally:
        if not record:
            return cls()
        return cls(
            seconds=float(record.get("seconds", 0.0)),
            images=int(record.get("images", 0)),
            skipped=int(record.get("skipped", 0)),
            losses=list(record.get("losses") or []),
        )


def numbered_checkpoint(output: Path, epochs_done: int, save_every: int) -> Path | None:
    """``checkpoint{epoch:04d}.pth`` when the cadence ``save_every`` keeps this epoch's, else None."""
    if save_every and epochs_done % save_every == 0:
        return Path(output) / f"checkpoint{epochs_done:04d}.pth"
    return None


def loss_failure_message(where: str, checkpoint: Path, advice: str) -> str:
    """The sentence for a loss that became non-finite ``where`` (``{loss}`` is left for the value):
    what of the run is kept is said truly, whether a checkpoint was saved before or not."""
    where, advice = (t.replace("{", "{{").replace("}", "}}") for t in (where, advice))
    kept = str(checkpoint).replace("{", "{{").replace("}", "}}")
    if Path(checkpoint).is_file():
        return f"The loss became {{loss}} {where}; the run stopped and {kept} keeps the last good state ({advice})."
    return f"The loss became {{loss}} {where}, before any checkpoint was saved, so nothing of the run is kept ({advice})."


def start_loader(loader):
    """Start the loader's workers with SIGINT/SIGTERM blocked, so that a signal sent to the whole
    process group between a worker's fork and its ``worker_init_fn`` cannot kill it; the workers then
    ignore both and unblock, and the main process gets any pending signal as soon as it unblocks."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def leave_signals_to_main(worker_id: int) -> None:
    """A ``worker_init_fn``: data workers ignore Ctrl-C and SIGTERM (also when sent to the whole
    process group): the main process finishes the step, saves, and shuts them down; they also exit
    when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started blocked by start_loader; pending ones are dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


__all__ = [
    "CheckpointCadence",
    "EpochSampler",
    "EpochTally",
    "leave_signals_to_main",
    "loss_failure_message",
    "numbered_checkpoint",
    "start_loader",
]
