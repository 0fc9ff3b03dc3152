"""Device, precision, seeding, RNG state, the graceful stop and the torchrun / DDP set-up.

The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) is read once; the same command line runs
as one process with no launcher, or as many under ``torchrun`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from types import FrameType

import numpy as np
import torch

from .errors import DinokitError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(kw_only=True)
class RuntimeOptions:
    """Where and how a command runs: the runtime fields every config shares (one definition).

    Configs inherit these fields and override a default where their protocol needs another
    (``batch_size`` differs between commands); the fields stay flat in ``metrics.json``.
    """

    device: str = "auto"  #: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    precision: str = "auto"  #: auto, fp32, bf16 or fp16 (see :func:`resolve_precision`)
    batch_size: int = 64  #: images per batch, per process
    num_workers: int = 0  #: data-loading worker processes
    seed: int = 0
    #: unreadable images: skipped and counted (False, every command's default) or the first one stops
    #: the run with a sentence naming it (True, ``--strict``)
    strict: bool = False
    #: decode every JPEG at full size (True, ``--exact-decode``), or a large one at the reduced DCT
    #: scale that still covers the transform's need (False, every command's default)
    exact_decode: bool = False


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
        raise DinokitError(f"The torchrun variables RANK/WORLD_SIZE/LOCAL_RANK are not integers ({e}).") from e


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
        seen = f"{self.free:.1f} of {self.cores} cores free" if self.free is not None else f"{self.cores} cores"
        how = {"--threads": "set by --threads", "the run's plan": "the run's plan, kept by --resume"}.get(
            self.chosen_by, f"{seen}; --threads overrides")
        return f"{self.threads} compute thread(s), {self.workers} data worker(s) ({how})"


def plan_cpu(threads: int | None, workers: int, device: torch.device, world_size: int | None = None,
             probe_seconds: float = 0.2) -> CpuPlan:
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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; under torchrun each rank takes its LOCAL_RANK GPU."""
    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise DinokitError(f"Unknown device {name!r}; use one of {', '.join(DEVICES)}.")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DinokitError("--device cuda was asked for but no CUDA GPU is available.")
        if name == "cuda":
            env = dist_env()
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DinokitError("--device mps was asked for but no Apple GPU is available.")
    return torch.device(name)


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


def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def _cpu_model() -> str:
    return _cpuinfo("model name")


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device computes bf16 matrix products in hardware (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        flags = _cpu_flags()
        if {"avx512_bf16", "amx_bf16"} & flags:
            return True
        import platform

        # Apple silicon and recent Arm server cores have bf16 dot-product instructions.
        return platform.machine() in ("arm64", "aarch64") and "bf16" in flags
    return False


def resolve_precision(precision: str, device: torch.device, training: bool) -> torch.dtype | None:
    """The autocast dtype for ``--precision``; None means plain fp32.

    ``auto`` is bf16 for training where the hardware has native bf16, else fp32; evaluation stays
    fp32 under ``auto`` so that its numbers match the reference.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise DinokitError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return torch.bfloat16 if training and has_native_bf16(device) else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        raise DinokitError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU.")
    return torch.float16


def embedding_precision(precision: str, device: str = "auto") -> str:
    """What ``--precision`` means for the embedding commands (features, similar, duplicates, attn's
    maps): ``auto`` is bf16 (weights cast once) on a CPU with native bf16 (where fp32 costs most),
    else fp32; any other value is kept. The protocol commands keep :func:`resolve_precision`'s fp32 under ``auto``.

    Measured on photographs with ``benchmarks/auto_precision.py`` (docs/frozen-eval.md): on a CPU
    with AVX512-BF16 a ViT-S/16 ran 1.85x fp32 in bf16, its CLS features within cosine 0.9999 of
    fp32's and the same nearest neighbour for 95 of 96 photos."""
    if (precision or "auto").lower() != "auto":
        return precision
    resolved = resolve_device(device)
    return "bf16" if resolved.type == "cpu" and has_native_bf16(resolved) else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cast_floating_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        return args, kwargs

    return hook


def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Cast a model's weights to ``dtype`` once, for inference; returns the same module (in place).

    The fast way to run bf16 inference on a CPU: autocast keeps fp32 weights and converts every
    weight and many activations on every call, which on a CPU costs about as much as the bf16
    matrix products save. A model cast here runs in bf16 end to end (LayerNorm and softmax still
    accumulate in fp32 inside their kernels). ``None`` or fp32 leaves the model as it is.

    The model is put in eval mode with gradients off. ViTs accept fp32 images unchanged (the patch
    embedding casts them); other models get a forward pre-hook that casts floating inputs. Outputs
    are in ``dtype``: call ``.float()`` on them before comparing or storing. Do not train a cast
    model; cast a copy (``copy.deepcopy``) if the fp32 weights are still needed.
    """
    model.eval()
    if dtype is None or dtype == torch.float32:
        return model
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    from .models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer) and not getattr(model, "_dinokit_cast_hook", None):
        model._dinokit_cast_hook = model.register_forward_pre_hook(_cast_floating_inputs(dtype), with_kwargs=True)
    return model


def inference_model(model: torch.nn.Module, dtype: torch.dtype | None) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The model to run inference with at ``dtype``, and the autocast dtype still needed around it.

    bf16 gets a copy cast once with :func:`cast_for_inference` (the caller's fp32 model is left as it
    is) and no autocast; a model already in ``dtype`` runs as it is; fp16 keeps autocast.
    """
    if dtype is None:
        return model, None
    if next(model.parameters()).dtype == dtype:
        return model, None
    if dtype == torch.bfloat16:
        import copy

        return cast_for_inference(copy.deepcopy(model), dtype), None
    return model, dtype


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, numpy and torch (each rank gets seed + rank)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence), for per-epoch / per-image / per-step draws
    that do not depend on what ran before."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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


def describe_runtime() -> dict:
    """What ``dinokit info`` prints: versions, devices, threads, bf16 support."""
    import platform

    import torchvision

    from . import __version__

    info = {
        "dinokit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cpu_native_bf16": has_native_bf16("cpu"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "default_device": str(resolve_device("auto")),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "native_bf16": has_native_bf16(torch.device("cuda", i)),
                }
            )
    env = dist_env()
    info["torchrun"] = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank}
    return info


# -- RNG state in checkpoints, and stopping cleanly on SIGINT/SIGTERM ------------------------------
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


def check_numbers(config: object, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                  fractions: tuple[str, ...] = ()) -> None:
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
