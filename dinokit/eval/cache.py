"""Fingerprinted embedding caches in a run folder: reused when their fingerprint matches, recomputed
when it does not (DESIGN "caches ... live in the output folder").

One mechanism serves every cache of frozen embeddings: the feature files of ``features``/``knn``/
``linear`` (:class:`dinokit.eval.features.Embedder`), the copy-detection and retrieval descriptors
(:class:`dinokit.eval.descriptors.DescriptorEmbedder`) and the near-duplicate store
(:class:`dinokit.eval.store.EmbeddingStore`). A cache file is a dict of tensors holding
the ``fingerprint`` it was made with; files are identified by :func:`file_stamp`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import torch_save_atomic
from ..runtime import dist_env


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, modification time in ns) of ``path``, (-1, -1) when it cannot be read: a file whose
    stamp changed is embedded again."""
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return -1, -1


def as_json(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from a JSON file (non-JSON values as text), for comparison."""
    return json.loads(json.dumps(fingerprint, default=str))


def files_key(fingerprint: dict[str, Any], paths: Sequence[str | os.PathLike], extra: str = "") -> str:
    """A hash of a fingerprint, ``extra`` and the stamps of ``paths``: the key of one embedded file list."""
    h = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    h.update(extra.encode())
    for p in paths:
        size, mtime = file_stamp(p)
        h.update(f"{os.path.abspath(p)}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


class CachedTensors:
    """One cache file: a dict of tensors with the ``fingerprint`` it was made with.

    ``matches(stored, expected)`` decides whether a stored fingerprint still describes what is asked
    for (equality unless given). A missing, damaged or foreign file counts as no cache.
    """

    def __init__(self, path: str | os.PathLike, matches: Callable[[dict, dict], bool] = operator.eq):
        self.path = Path(path)
        self.matches = matches

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The stored dict when its fingerprint matches ``fingerprint``, else None."""
        if not self.exists():
            return None
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is recomputed
            return None
        stored = obj.get("fingerprint") if isinstance(obj, dict) else None
        if not isinstance(stored, dict) or not self.matches(stored, fingerprint):
            return None
        return obj

    def save(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` (which holds its ``fingerprint``) atomically; under torchrun the main rank
        owns the file."""
        if dist_env().is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch_save_atomic(payload, self.path)
