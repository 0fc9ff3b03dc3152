"""The store of a large-scale search: every image's descriptor kept on disk in chunks, embedded once
and reused by later runs (``duplicates``, ``similar``), and read back as one normalised search matrix."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import ImageDataset
from ..io import atomic_open, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import dist_env
from .cache import as_json, file_stamp
from .descriptors import DescriptorEmbedder, Whitening, normalize_descriptors
from .features import extract_features
from .metrics import require_finite

log = logging.getLogger("dinokit")

INDEX_FORMAT = 1


class EmbeddingStore:
    """Descriptors of every image a duplicates run has seen, kept on disk in ``folder``.

    ``manifest.json`` names the descriptor (weights, transform, ...) the store was made with; each
    chunk is a pair ``emb-NNNNN.npy`` (float32 rows, read memory-mapped) and ``emb-NNNNN.json`` (for
    each row: path, size and modification time; a row of -1 marks an unreadable file). Chunks are
    only ever added, each written atomically, so a stopped run loses at most the chunk in progress;
    an image whose size or time changed is embedded again and its newer row wins.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = as_json(fingerprint)
        self.entries: dict[str, tuple[int, int, int, int]] = {}  # path -> (size, mtime_ns, chunk, row)
        self.dim: int | None = None
        self._mmaps: dict[int, np.ndarray] = {}
        manifest = self.folder / "manifest.json"
        current = None
        if manifest.is_file():
            try:
                current = json.loads(manifest.read_text())
            except (OSError, ValueError):
                current = None
        if current is not None and current.get("fingerprint") == self.fingerprint and current.get("format") == INDEX_FORMAT:
            self.dim = current.get("dim")
            self._load_chunks()
        else:
            if current is not None:
                log.warning("the embeddings in %s were made with other settings; embedding again", self.folder)
            for p in self.folder.glob("emb-*"):
                p.unlink()
            write_json(manifest, {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": None})

    def _chunk_ids(self) -> list[int]:
        ids = []
        for p in self.folder.glob("emb-*.json"):
            m = re.fullmatch(r"emb-(\d+)\.json", p.name)
            if m and (self.folder / f"emb-{m.group(1)}.npy").is_file():
                ids.append(int(m.group(1)))
        return sorted(ids)

    def _load_chunks(self) -> None:
        for cid in self._chunk_ids():
            try:
                rows = json.loads((self.folder / f"emb-{cid:05d}.json").read_text())
            except (OSError, ValueError):
                continue
            for path, size, mtime, row in rows:
                self.entries[path] = (int(size), int(mtime), cid if row >= 0 else -1, int(row))

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return os.path.abspath(path)

    def up_to_date(self, path: str | os.PathLike) -> bool:
        e = self.entries.get(self.key(path))
        return e is not None and e[:2] == file_stamp(path)

    def missing(self, paths: Sequence[str | os.PathLike]) -> list[Path]:
        return [Path(p) for p in paths if not self.up_to_date(p)]

    def add(self, paths: Sequence[str | os.PathLike], features: np.ndarray, kept: np.ndarray) -> None:
        """Append one chunk: descriptors of the readable ``paths`` and marks for the unreadable ones."""
        ids = self._chunk_ids()
        cid = (ids[-1] + 1) if ids else 0
        feats = np.ascontiguousarray(features[kept], dtype=np.float32)
        if self.dim is None and feats.size:
            self.dim = int(feats.shape[1])
            write_json(self.folder / "manifest.json",
                       {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim})
        rows, r = [], 0
        for p, k in zip(paths, kept.tolist()):
            size, mtime = file_stamp(p)
            rows.append([self.key(p), size, mtime, r if k else -1])
            r += int(k)
        with atomic_open(self.folder / f"emb-{cid:05d}.npy", "wb") as f:
            np.save(f, feats.reshape(-1, self.dim or 0))
        # the row list is written last: a chunk counts only once both files are there
        write_json(self.folder / f"emb-{cid:05d}.json", rows)
        for path, size, mtime, row in rows:
            self.entries[path] = (size, mtime, cid if row >= 0 else -1, row)

    def _chunk(self, cid: int) -> np.ndarray:
        if cid not in self._mmaps:
            self._mmaps[cid] = np.load(self.folder / f"emb-{cid:05d}.npy", mmap_mode="r")
        return self._mmaps[cid]

    def readable(self, paths: Sequence[str | os.PathLike]) -> list[bool]:
        return [self.entries.get(self.key(p), (0, 0, -1, -1))[2] >= 0 for p in paths]

    def read(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Descriptors of ``paths`` (all readable and up to date), in order, (n, dim) float32."""
        out = np.empty((len(paths), self.dim or 0), dtype=np.float32)
        locs = [self.entries[self.key(p)] for p in paths]
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for i, (_, _, cid, row) in enumerate(locs):
            by_chunk.setdefault(cid, []).append((i, row))
        for cid, items in by_chunk.items():
            dst = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            src = np.fromiter((r for _, r in items), dtype=np.int64, count=len(items))
            out[dst] = self._chunk(cid)[src]
        return out


class _SharedTaskProgress:
    """Hands one task to every extract_features call, so chunked embedding shows one bar."""

    def __init__(self, progress: Progress, task):
        self._progress = progress
        self._task = task

    def task(self, description: str, total: int | None = None):
        task = self._task

        class _Borrowed:
            def advance(self, n: int = 1, **fields: Any) -> None:
                task.advance(n, **fields)

            def update(self, **fields: Any) -> None:
                task.update(**fields)

            def close(self) -> None:
                pass

        return _Borrowed()

    def log(self, message: str) -> None:
        self._progress.log(message)


def embed_into_store(
    store: EmbeddingStore,
    paths: Sequence[Path],
    embedder: DescriptorEmbedder,
    chunk_size: int,
    progress: Progress = NULL_PROGRESS,
) -> int:
    """Embed the ``paths`` the store lacks, ``chunk_size`` images per chunk file; returns how many."""
    todo = store.missing(paths)
    if not todo:
        return 0
    task = progress.task("embedding", total=len(todo))
    shared = _SharedTaskProgress(progress, task)
    for s in range(0, len(todo), chunk_size):
        part = todo[s : s + chunk_size]
        dataset = ImageDataset(part, transform=embedder.transform, strict=embedder.strict,
                               exact_decode=embedder.exact_decode)
        feats, kept = extract_features(
            embedder.model, dataset, embedder.batch_size, embedder.num_workers, embedder.device,
            embedder.dtype, embedder.feature_fn, shared,
        )
        if dist_env().is_main:  # the main rank owns the files
            require_finite(feats, "The image descriptors")
            store.add(part, feats.numpy(), kept.numpy())
    task.close()
    return len(todo)


def write_search_matrix(
    store: EmbeddingStore, paths: Sequence[Path], target: Path, whitening: Whitening | None, block: int
) -> np.ndarray:
    """Normalised (whitened) descriptors of ``paths`` in a memory-mapped .npy, written block by block."""
    dim = whitening.projection.shape[0] if whitening is not None else store.dim
    mm = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(len(paths), int(dim or 0)))
    for s in range(0, len(paths), block):
        x = torch.from_numpy(store.read(paths[s : s + block]))
        mm[s : s + block] = normalize_descriptors(x, whitening).numpy()
    mm.flush()
    return np.load(target, mmap_mode="r")
