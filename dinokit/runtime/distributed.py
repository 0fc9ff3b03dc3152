"""The torchrun / DDP set-up: the environment read once, the process group, the collectives.

The same command line runs as one process with no launcher, or as many under ``torchrun`` (gloo on
CPU, nccl on CUDA).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..errors import DinokitError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (world size 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@functools.lru_cache(maxsize=1)
def dist_env() -> DistEnv:
    """The torchrun environment, read once."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as e:
        raise DinokitError(
            f"The torchrun variables RANK/WORLD_SIZE/LOCAL_RANK are not integers ({e})."
        ) from e


def init_distributed(device: torch.device) -> DistEnv:
    """Initialise the process group when launched by torchrun; a no-op for one process."""
    env = dist_env()
    if env.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return env


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_dist():
        torch.distributed.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks, in place (a no-op for one process)."""
    if is_dist():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def cleanup_distributed() -> None:
    if is_dist():
        torch.distributed.destroy_process_group()


def max_over_ranks(values: list[float], device: torch.device | None = None) -> list[float]:
    """The element-wise maximum of a few numbers over all ranks, in one all-reduce (the numbers
    themselves outside torchrun). ``device`` is where the collective runs: the CUDA device under
    NCCL; by default the current CUDA device under NCCL, else the CPU."""
    if not is_dist():
        return [float(v) for v in values]
    if device is None:
        device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([float(v) for v in values], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()
