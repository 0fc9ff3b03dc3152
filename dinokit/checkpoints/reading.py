"""Reading and writing checkpoint files safely.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors), never unpickling
arbitrary objects; weights holding NaN or inf are refused where they are loaded; fingerprints key the
caches on a file's bytes or a state dict's values; dinokit's own files are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import torch_save_atomic


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without unpickling arbitrary objects.

    ``.safetensors`` files go through safetensors; everything else through
    ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allowed beyond plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The weights file {path} does not exist.")
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin", "backbone.pth", "checkpoint.pth"):
            if (path / candidate).is_file():
                return read_checkpoint(path / candidate)
        raise CheckpointError(
            f"The folder {path} holds no weights file (model.safetensors, pytorch_model.bin, ...)."
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a safetensors file; install the optional extra with: pip install 'dinokit[safetensors]'."
            ) from e
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if not any("Weights only load failed" in ln for ln in lines):
            # a plain unpickling failure: the bytes are not a pickle at all
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error_line(e)}).") from e
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        detail = f" ({detail.rstrip('.')})" if detail else ""
        raise CheckpointError(
            f"{path} holds Python objects beyond plain weights{detail}; dinokit refuses to unpickle it "
            "because that could run code."
        ) from e
    except Exception as e:  # zip, EOF, key and value errors of a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error_line(e)}).") from e


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), at most 160
    characters: the detail a one-sentence error carries."""
    text = str(e).strip()
    line = text.splitlines()[0].rstrip(".") if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def state_dict_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes and values (for caches keyed on weights)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().to("cpu").contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def require_finite_weights(sd: dict[str, Any], source: str = "the checkpoint") -> None:
    """Refuse weights holding NaN or inf: every feature and score computed from them would be NaN (or
    a meaningless number), so they are stopped where they are loaded."""
    for key, value in sd.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            raise CheckpointError(
                f"{source} holds non-finite values (NaN or inf) in {key}; the file is damaged or the training "
                "diverged."
            )


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Save any dinokit checkpoint atomically (it must hold only what ``weights_only`` can read)."""
    torch_save_atomic(obj, path)
