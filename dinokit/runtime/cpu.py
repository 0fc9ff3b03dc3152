"""CPU planning: the cores free of other programs, the compute threads and loader workers of a run,
and pinned numerics (the demo's results independent of the machine)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch

from .distributed import dist_env


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """(idle, total) jiffies of each of ``cpus`` from /proc/stat; None where there is no such file."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times or None


def free_cores(probe_seconds: float = 0.2) -> float:
    """How many of this process's cores (its affinity mask) other programs leave idle: each core's
    idle share over a short window of /proc/stat, summed (this process sleeps meanwhile). Where
    there is no /proc/stat, the cores less the one-minute load average."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(probe_seconds)
        after = _cpu_times(cpus)
        if after is not None:
            free = 0.0
            for cpu, (idle0, total0) in before.items():
                idle1, total1 = after.get(cpu, (idle0, total0))
                free += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
            return min(float(len(cpus)), free)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return float(len(cpus))
    return max(0.0, len(cpus) - load)


@dataclass(frozen=True)
class CpuPlan:
    """The compute threads and data-loader workers a CPU run uses, and why."""

    threads: int
    workers: int
    cores: int  #: this process's share of its affinity mask
    free: float | None  #: of those, the cores measured idle (None: not measured)
    chosen_by: str  #: "--threads", "free cores", "default", "pinned" or "the run's plan" (a resumed run's)

    def describe(self) -> str:
        seen = (
            f"{self.free:.1f} of {self.cores} cores free" if self.free is not None else f"{self.cores} cores"
        )
        how = {"--threads": "set by --threads", "the run's plan": "the run's plan, kept by --resume"}.get(
            self.chosen_by, f"{seen}; --threads overrides"
        )
        return f"{self.threads} compute thread(s), {self.workers} data worker(s) ({how})"


def plan_cpu(
    threads: int | None,
    workers: int,
    device: torch.device,
    world_size: int | None = None,
    probe_seconds: float = 0.2,
) -> CpuPlan:
    """Compute threads and loader workers for a run on ``device``.

    ``threads`` (``--threads``) is used as given. Left unset on a CPU device, the threads are the
    cores other programs leave free (measured by :func:`free_cores`; at least 1, at most torch's
    current setting), and the workers take only the free cores the threads leave: threads that
    share a core with another program or with a worker wait for it at every parallel region
    (measured on 2 cores beside one busy process: a DINO step took 10 s with 2 threads and 3.3 s with
    1). On a GPU the threads stay as they are and the workers take this process's share of the
    cores. Under torchrun each process plans for its share (the cores over the local process count).
    """
    if world_size is None:
        world_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist_env().world_size))
    world_size = max(1, int(world_size))
    cores = max(1, available_cores() // world_size)
    workers = max(0, int(workers))
    if device.type != "cpu":
        n = int(threads) if threads else torch.get_num_threads()
        return CpuPlan(n, min(workers, cores), cores, None, "--threads" if threads else "default")
    if threads:
        n = int(threads)
        return CpuPlan(n, max(0, min(workers, cores - n)), cores, None, "--threads")
    if _pinned_threads is not None:  # pin_cpu_numerics: the same threads whatever else runs
        n = _pinned_threads
        return CpuPlan(n, max(0, min(workers, cores - n)), cores, None, "pinned")
    current = torch.get_num_threads()
    if current <= 1 and workers == 0:  # nothing to choose
        return CpuPlan(1, 0, cores, None, "default")
    free = free_cores(probe_seconds) / world_size
    usable = max(1, int(free + 0.5))  # a core at least half idle counts
    n = max(1, min(current, cores, usable))
    return CpuPlan(n, max(0, min(workers, usable - n)), cores, free, "free cores")


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def loader_workers(requested: int, device: torch.device, world_size: int = 1) -> int:
    """How many data-loader workers to start for ``requested``: never more than this process's share
    of the cores, and on a CPU device only the cores its compute threads leave free. Workers that
    share cores with the compute threads preempt them in the middle of parallel regions, where the
    other threads then wait: measured on 2 cores with 2 threads, DINO pretraining ran at 11-13
    images/s with 2 workers and at 16-18 with the data loaded in the main process."""
    cores = available_cores() // max(1, world_size)
    if device.type == "cpu":
        cores -= torch.get_num_threads()
    return max(0, min(int(requested), cores))


#: the environment that fixes which CPU kernels compute: ATen's vectorised kernels, oneDNN's
#: convolutions and matrix products, and MKL's, all at their AVX2 level, which every x86-64 CPU of the
#: last decade has. Kernels of different widths sum in different orders, so without this an AVX-512
#: machine and an AVX2 machine of the same name give results that differ in the last bits, and a
#: short training run amplifies those bits into different metrics.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


#: the thread count pin_cpu_numerics fixed for this process (None: chosen per run from the free cores)
_pinned_threads: int | None = None


def pin_cpu_numerics(threads: int = 1) -> dict:
    """Make CPU results independent of the machine: ``threads`` compute threads (reductions split
    over threads sum in another order) and the kernels of :data:`PINNED_CPU_KERNELS`.

    The kernel choice is read when torch computes for the first time in a process, so this takes
    full effect only before the first tensor operation (as in a fresh ``dinokit`` process); variables
    the user has set are left as they are. Every later run of the process then computes on
    ``threads`` threads, instead of the cores other programs leave free (:func:`plan_cpu`). Returns
    what holds now, for the run's record."""
    global _pinned_threads
    for key, value in PINNED_CPU_KERNELS.items():
        os.environ.setdefault(key, value)
    _pinned_threads = int(threads)
    torch.set_num_threads(_pinned_threads)
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{key: os.environ[key] for key in PINNED_CPU_KERNELS},
    }


@functools.cache
def _cpuinfo(field: str) -> str:
    """The value of the first ``field`` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; '' where there is none)."""
    return _cpuinfo("model name")
