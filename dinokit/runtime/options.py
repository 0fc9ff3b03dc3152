"""The runtime fields every config shares (one definition)."""

from __future__ import annotations

from dataclasses import dataclass


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
