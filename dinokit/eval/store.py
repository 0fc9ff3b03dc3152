"""The store of a large-scale search: every image's descriptor kept on disk in chunks, embedded once
and reused by later runs of ``duplicates`` and ``similar`` alike (one store per descriptor
fingerprint, shared by every run folder: :func:`store_for`), and read back as one normalised search
matrix. :func:`embed_for_search` is the one set-up of both commands; :func:`pair_fraction_above` and
:func:`meaning_warnings` say when their results cannot mean much."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import prepare_backbone
from ..data.images import ImageDataset
from ..errors import DinokitError
from ..io import atomic_open, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import barrier, dist_env, init_distributed
from .cache import as_json, file_stamp
from .descriptors import (
    GEM_P,
    DescriptorEmbedder,
    Whitening,
    copy_feature_fn,
    copy_transform,
    normalize_descriptors,
)
from .features import extract_features
from .metrics import require_finite

log = logging.getLogger("dinokit")

INDEX_FORMAT = 1


#: a chunk's files: emb-<sequence>-<writer>.npy/.json (the writer's token keeps two processes that add
#: to one store at once apart); emb-<sequence>.npy/.json of earlier stores are read as well
_CHUNK = re.compile(r"emb-(\d+)(?:-([0-9a-f]+))?\.json")


class EmbeddingStore:
    """Descriptors of every image a search has seen, kept on disk in ``folder``.

    ``manifest.json`` names the descriptor (weights, transform, ...) the store was made with; each
    chunk is a pair ``emb-<seq>-<writer>.npy`` (float32 rows, read memory-mapped) and ``.json`` (for
    each row: path, size and modification time; a row of -1 marks an unreadable file). Chunks are
    only ever added, each written atomically under a name no other process uses, so a stopped run
    loses at most the chunk in progress and two runs may add to one store at once; an image whose
    size or time changed is embedded again and its newer row wins.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DinokitError(
                f"The descriptor store {self.folder} cannot be created ({e.strerror or e}); "
                "choose another --cache-dir."
            ) from e
        self.fingerprint = as_json(fingerprint)
        self.entries: dict[str, tuple[int, int, str | None, int]] = {}  # path -> (size, mtime_ns, chunk, row)
        self.dim: int | None = None
        self._mmaps: dict[str, np.ndarray] = {}
        self._token = f"{os.getpid():x}{secrets.token_hex(3)}"
        manifest = self.folder / "manifest.json"
        current = None
        if manifest.is_file():
            try:
                current = json.loads(manifest.read_text())
            except (OSError, ValueError):
                current = None
        if (
            current is not None
            and current.get("fingerprint") == self.fingerprint
            and current.get("format") == INDEX_FORMAT
        ):
            self.dim = current.get("dim")
            self._load_chunks()
        else:
            if current is not None:
                log.warning(
                    "the embeddings in %s were made with other settings; embedding again", self.folder
                )
            for p in self.folder.glob("emb-*"):
                p.unlink()
            write_json(manifest, {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": None})

    def _chunk_ids(self) -> list[str]:
        """The stems of the complete chunks, oldest first."""
        found = []
        for p in self.folder.glob("emb-*.json"):
            m = _CHUNK.fullmatch(p.name)
            if m and (self.folder / f"{p.stem}.npy").is_file():
                found.append((int(m.group(1)), m.group(2) or "", p.stem))
        return [stem for *_, stem in sorted(found)]

    def _load_chunks(self) -> None:
        for cid in self._chunk_ids():
            try:
                rows = json.loads((self.folder / f"{cid}.json").read_text())
            except (OSError, ValueError):
                continue
            for path, size, mtime, row in rows:
                self.entries[path] = (int(size), int(mtime), cid if row >= 0 else None, int(row))

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return os.path.abspath(path)

    def up_to_date(self, path: str | os.PathLike) -> bool:
        e = self.entries.get(self.key(path))
        return e is not None and e[:2] == file_stamp(path)

    def missing(self, paths: Sequence[str | os.PathLike], unreadable: bool = False) -> list[Path]:
        """The ``paths`` to embed: not in the store or changed since; with ``unreadable``, also those
        stored as unreadable (a ``--strict`` run reads them again, to stop with the reader's sentence)."""
        if unreadable:
            return [Path(p) for p in paths if not self.up_to_date(p) or not self.readable([p])[0]]
        return [Path(p) for p in paths if not self.up_to_date(p)]

    def add(self, paths: Sequence[str | os.PathLike], features: np.ndarray, kept: np.ndarray) -> None:
        """Append one chunk: descriptors of the readable ``paths`` and marks for the unreadable ones."""
        ids = self._chunk_ids()
        seq = 0
        if ids:
            last = _CHUNK.fullmatch(ids[-1] + ".json")
            assert last is not None  # _chunk_ids lists the names that match
            seq = int(last.group(1)) + 1
        cid = f"emb-{seq:05d}-{self._token}"
        feats = np.ascontiguousarray(features[kept], dtype=np.float32)
        if self.dim is None and feats.size:
            self.dim = int(feats.shape[1])
            write_json(
                self.folder / "manifest.json",
                {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim},
            )
        rows: list[list[Any]] = []
        r = 0
        for p, k in zip(paths, kept.tolist()):
            size, mtime = file_stamp(p)
            rows.append([self.key(p), size, mtime, r if k else -1])
            r += int(k)
        with atomic_open(self.folder / f"{cid}.npy", "wb") as f:
            np.save(f, feats.reshape(-1, self.dim or 0))
        # the row list is written last: a chunk counts only once both files are there
        write_json(self.folder / f"{cid}.json", rows)
        for path, size, mtime, row in rows:
            self.entries[path] = (size, mtime, cid if row >= 0 else None, row)

    def _chunk(self, cid: str) -> np.ndarray:
        if cid not in self._mmaps:
            self._mmaps[cid] = np.load(self.folder / f"{cid}.npy", mmap_mode="r")
        return self._mmaps[cid]

    def readable(self, paths: Sequence[str | os.PathLike]) -> list[bool]:
        return [self.entries.get(self.key(p), (0, 0, None, -1))[2] is not None for p in paths]

    def read(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Descriptors of ``paths`` (all readable and up to date), in order, (n, dim) float32."""
        out = np.empty((len(paths), self.dim or 0), dtype=np.float32)
        locs = [self.entries[self.key(p)] for p in paths]
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for i, (_, _, cid, row) in enumerate(locs):
            assert cid is not None, "read() takes readable paths"
            by_chunk.setdefault(cid, []).append((i, row))
        for cid, items in by_chunk.items():
            dst = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            src = np.fromiter((r for _, r in items), dtype=np.int64, count=len(items))
            out[dst] = self._chunk(cid)[src]
        return out


def default_store_root() -> Path:
    """Where the descriptor stores live unless ``--cache-dir`` says: ``$DINOKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dinokit/embeddings`` (``~/.cache/dinokit/embeddings``)."""
    env = os.environ.get("DINOKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dinokit" / "embeddings"


def store_for(fingerprint: dict[str, Any], root: str | os.PathLike | None = None) -> EmbeddingStore:
    """The store of one descriptor fingerprint under ``root`` (default :func:`default_store_root`): the
    same weights, transform, descriptor, precision and decode find the same store from any run folder
    and either command, and other settings find their own, so neither evicts the other."""
    key = hashlib.sha256(json.dumps(as_json(fingerprint), sort_keys=True).encode()).hexdigest()[:16]
    return EmbeddingStore(
        Path(root if root is not None else default_store_root()).expanduser() / key, fingerprint
    )


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
    """Embed the ``paths`` the store lacks, ``chunk_size`` images per chunk file; returns how many.
    A strict embedder reads the images stored as unreadable again (and stops at the first)."""
    todo = store.missing(paths, unreadable=embedder.strict)
    if not todo:
        return 0
    task = progress.task("embedding", total=len(todo))
    shared = _SharedTaskProgress(progress, task)
    for s in range(0, len(todo), chunk_size):
        part = todo[s : s + chunk_size]
        dataset = ImageDataset(
            part, transform=embedder.transform, strict=embedder.strict, exact_decode=embedder.exact_decode
        )
        feats, kept = extract_features(
            embedder.model,
            dataset,
            embedder.batch_size,
            embedder.num_workers,
            embedder.device,
            embedder.dtype,
            embedder.feature_fn,
            shared,
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


# -- the set-up both searches share ----------------------------------------------------------------
@dataclass
class StoredDescriptors:
    """The descriptors of a search's images, in their store, and how many were embedded now."""

    embedder: DescriptorEmbedder
    store: EmbeddingStore
    embedded: int  #: images embedded by this run
    reused: int  #: images whose stored descriptor was up to date


def embed_for_search(cfg, paths: Sequence[Path], progress: Progress = NULL_PROGRESS) -> StoredDescriptors:
    """The one set-up of ``duplicates`` and ``similar``: load the backbone of ``cfg`` (a config with
    the backbone and runtime options, ``image_size``, ``chunk_size``, ``cache_dir`` and ``output``),
    open the store of its copy-detection descriptor (CLS + GeM) under ``cfg.cache_dir`` and embed
    the ``paths`` it lacks. Under torchrun every rank embeds a share and the main rank writes."""
    backbone = prepare_backbone(cfg)
    init_distributed(backbone.device)
    embedder = DescriptorEmbedder(
        backbone.model,
        cfg.weights,
        copy_transform(cfg.image_size, backbone.normalization),
        copy_feature_fn(),
        f"cls+gem(p={GEM_P:g})",
        backbone.device,
        backbone.dtype,
        cfg.batch_size,
        cfg.num_workers,
        Path(cfg.output) / "cache",
        cfg.checkpoint_key,
        cfg.seed,
        progress,
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )
    store = store_for(embedder.fingerprint, cfg.cache_dir)
    everything = list(dict.fromkeys(paths))
    n_new = embed_into_store(store, everything, embedder, cfg.chunk_size, progress)
    barrier()
    reused = len(everything) - n_new
    if reused and dist_env().is_main:
        progress.log(f"reused the stored descriptors of {reused} images ({store.folder})")
    return StoredDescriptors(embedder, store, n_new, reused)


# -- when a result cannot mean much ------------------------------------------------------------------
#: a warning is given when at least this share of all image pairs passes the threshold
NEARLY_EVERY_PAIR = 0.5
#: the pair share is measured on at most this many images of each side (a seeded sample)
PAIR_SAMPLE = 2000


def pair_fraction_above(
    a: np.ndarray,
    b: np.ndarray | None,
    threshold: float,
    same: np.ndarray | None = None,
    sample: int = PAIR_SAMPLE,
    seed: int = 0,
) -> float:
    """The share of image pairs whose similarity (rows of normalised descriptors) is >= ``threshold``:
    every unordered pair of ``a`` with ``b`` None, else every (a, b) pair except an image with its own
    file (``same[i]``: the row of b that is a's row i, -1 for none); measured on a seeded sample of at
    most ``sample`` rows of each side."""
    rng = np.random.default_rng(seed)

    def pick(n: int) -> np.ndarray:
        return np.arange(n) if n <= sample else np.sort(rng.choice(n, size=sample, replace=False))

    ia = pick(len(a))
    x = torch.from_numpy(np.asarray(a[ia], dtype=np.float32))
    if b is None:
        sim = x @ x.T
        valid = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    else:
        ib = pick(len(b))
        sim = x @ torch.from_numpy(np.asarray(b[ib], dtype=np.float32)).T
        valid = torch.ones_like(sim, dtype=torch.bool)
        if same is not None:
            valid &= torch.from_numpy(same[ia])[:, None] != torch.from_numpy(ib)[None, :]
    total = int(valid.sum())
    return float(((sim >= threshold) & valid).sum()) / total if total else 0.0


def meaning_warnings(weights: str | None, fraction: float, threshold: float, what: str) -> list[str]:
    """The sentences that say a search's result cannot mean much: random weights, and nearly every
    pair at or above ``threshold`` (``what`` names the result: "these pairs and clusters")."""
    out = []
    if str(weights) == "random":
        out.append(
            "--weights random is an untrained network: its similarities follow colours and layout, not "
            f"content, so {what} can only serve as a baseline; give trained weights (e.g. dino_vits16)."
        )
    if fraction >= NEARLY_EVERY_PAIR:
        out.append(
            f"{fraction:.0%} of all image pairs have a similarity of {threshold:g} or more: the descriptors "
            f"barely tell these images apart, so {what} cannot mean much (untrained or unsuited "
            "weights, or a folder of near-identical pictures)."
        )
    return out
