"""Where and how a command runs: device, precision, CPU threads, seeding, RNG state, the graceful stop
and the torchrun / DDP set-up.

One module per concept: :mod:`.options` (RuntimeOptions), :mod:`.cpu` (free cores, the thread plan,
pinned numerics), :mod:`.devices` (device, precision, autocast, ``dinokit info``), :mod:`.distributed`
(the torchrun environment, the process group, the collectives), :mod:`.rng` (seeding and RNG state)
and :mod:`.stop` (the graceful stop, exit codes, the finite-loss and option-value checks). Every name
is importable from here. Casting a model for inference lives with the models
(:mod:`dinokit.models.inference`) and is re-exported here.
"""

from ..models.inference import cast_for_inference, inference_model
from .cpu import (
    PINNED_CPU_KERNELS,
    CpuPlan,
    available_cores,
    cpu_flags,
    cpu_model,
    cpu_threads,
    free_cores,
    loader_workers,
    pin_cpu_numerics,
    plan_cpu,
)
from .devices import (
    DEVICES,
    PRECISIONS,
    autocast,
    describe_runtime,
    embedding_precision,
    has_native_bf16,
    precision_name,
    resolve_device,
    resolve_precision,
)
from .distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    dist_env,
    init_distributed,
    is_dist,
    max_over_ranks,
)
from .options import RuntimeOptions
from .rng import derive_seed, get_rng_state, seed_everything, set_rng_state
from .stop import GracefulStop, agreed_stop_signal, check_numbers, ensure_finite_loss, signal_exit_code

__all__ = [
    "DEVICES",
    "PINNED_CPU_KERNELS",
    "PRECISIONS",
    "CpuPlan",
    "DistEnv",
    "GracefulStop",
    "RuntimeOptions",
    "agreed_stop_signal",
    "all_reduce_mean",
    "autocast",
    "available_cores",
    "barrier",
    "cast_for_inference",
    "check_numbers",
    "cleanup_distributed",
    "cpu_flags",
    "cpu_model",
    "cpu_threads",
    "derive_seed",
    "describe_runtime",
    "dist_env",
    "embedding_precision",
    "ensure_finite_loss",
    "free_cores",
    "get_rng_state",
    "has_native_bf16",
    "inference_model",
    "init_distributed",
    "is_dist",
    "loader_workers",
    "max_over_ranks",
    "pin_cpu_numerics",
    "plan_cpu",
    "precision_name",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "set_rng_state",
    "signal_exit_code",
]
