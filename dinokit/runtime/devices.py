"""Devices and precision: which device a run uses, the compute dtype of ``--precision``, autocast,
and what ``dinokit info`` says about the machine."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import DinokitError
from .cpu import cpu_flags, cpu_model
from .distributed import dist_env

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


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


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device computes bf16 matrix products in hardware (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        flags = cpu_flags()
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


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def describe_runtime() -> dict:
    """What ``dinokit info`` prints: versions, devices, threads, bf16 support."""
    import platform

    import torchvision

    from .. import __version__

    info = {
        "dinokit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
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
