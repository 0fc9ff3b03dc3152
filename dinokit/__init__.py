"""dinokit: DINO self-supervised Vision Transformers (Caron et al. 2021) as installable software."""

__version__ = "0.1.0"

from .errors import CheckpointError, DataError, DinokitError  # noqa: E402

#: the names that import torch, loaded on first use so that ``import dinokit`` (and with it the
#: command line's ``--help`` and its refusals) stays light
_LAZY = {"load_backbone": "checkpoints", "save_backbone": "checkpoints", "build_backbone": "models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DataError",
    "DinokitError",
    "__version__",
    "build_backbone",
    "load_backbone",
    "save_backbone",
]
