"""Batches of decoded images for a model, with the decoding overlapped with the model's compute.

Decoding and resizing a photograph costs as much as a small ViT's forward pass on a CPU. With data
workers (``--num-workers``) a torch ``DataLoader`` runs the dataset in worker processes; without
them, :class:`PrefetchLoader` runs the dataset's ``__getitem__`` in a small pool of threads, a
batch or two ahead of the model (Pillow's decoders and resampling release the GIL, and so do torch's
kernels). Items come back in dataset order, at most ``2 * batch_size`` of them held at a time, so
memory does not grow with the folder. An unreadable image is whatever the dataset makes of it (the
``None`` that :func:`dinokit.data.images.collate_skip_none` drops and counts, or its error, which
stops the iteration with the first unreadable image in order).

Only datasets whose items are a pure function of the index belong there: a training set whose
augmentation seeds the global random generators per item would race in threads. Such a set (the
pretraining's multi-crop set) goes through :class:`DecodeAheadLoader` instead: only its decoding runs
in threads, its augmentation stays in the calling thread, in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, Protocol

import torch

from ..runtime import available_cores
from .images import collate_skip_none

#: decode threads at most: past this the model's own threads lose more than decoding gains
MAX_DECODE_THREADS = 4


def decode_threads(compute_threads: int, cores: int) -> int:
    """Decode threads beside ``compute_threads`` on ``cores``: the cores the compute leaves, else one
    (it then shares a core with the compute, which it gives back as soon as the batch ahead is
    ready), at most :data:`MAX_DECODE_THREADS`."""
    return max(1, min(MAX_DECODE_THREADS, int(cores) - int(compute_threads)))


def dataset_length(dataset: torch.utils.data.Dataset) -> int:
    """``len(dataset)``: a ``torch.utils.data.Dataset`` does not promise one."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"object of type '{type(dataset).__name__}' has no len()")
    return len(dataset)


class SizedSampler(Protocol):
    """Indices that know how many they are (a ``torch.utils.data.Sampler`` with ``__len__``)."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class PrefetchLoader:
    """Batches of ``dataset`` (in the order of ``indices``, all by default) collated by
    ``collate_fn``, each item made in a pool of ``threads`` threads while the model works on the
    batch before it. Iterating again starts over."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        threads: int,
        collate_fn: Callable[[list], Any] = collate_skip_none,
        indices: Sequence[int] | None = None,
    ):
        self.dataset = dataset
        self.batch_size = max(1, int(batch_size))
        self.threads = max(1, int(threads))
        self.collate_fn = collate_fn
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        n = len(self.indices) if self.indices is not None else dataset_length(self.dataset)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        order = iter(self.indices if self.indices is not None else range(dataset_length(self.dataset)))
        ahead = 2 * self.batch_size  # the batch the model waits for next, and the one after it
        pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="dinokit-decode")
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for i in order:
                pending.append(pool.submit(self.dataset.__getitem__, i))
                if len(pending) >= ahead:
                    break
            while pending:
                batch: list[Any] = []
                while pending and len(batch) < self.batch_size:
                    batch.append(pending.popleft().result())
                    nxt = next(order, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.dataset.__getitem__, nxt))
                yield self.collate_fn(batch)
        finally:  # a stop (an error, --strict, Ctrl-C) leaves no work queued behind it
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


class DecodeAheadLoader:
    """Batches of a training set whose items are a thread-safe ``read(i)`` (the decoding) and a
    ``finish(i, read)`` that draws from the global random generators (the augmentation): the reads
    of the next batch run in ``threads`` threads while the model trains on this one, the finishing
    stays in this thread, in order, so every item is exactly what ``dataset[i]`` gives. The indices
    come from ``sampler``, ``batch_size`` at a time (a last partial batch dropped with ``drop_last``);
    at most one batch is read ahead."""

    num_workers = 0  # for the training loops' signal handling: no worker process to start

    def __init__(
        self,
        dataset,
        sampler: SizedSampler,
        batch_size: int,
        threads: int,
        collate_fn: Callable[[list], Any],
        drop_last: bool = True,
    ):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, max(1, int(batch_size))
        self.threads, self.collate_fn, self.drop_last = max(1, int(threads)), collate_fn, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        indices = list(self.sampler)
        if self.drop_last:
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        reads = prefetch_map(self.dataset.read, indices, self.threads, ahead=self.batch_size)
        batch = []
        for i, read in zip(indices, reads):
            batch.append(self.dataset.finish(i, read))
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch)
                batch = []
        if batch:
            yield self.collate_fn(batch)


def prefetch_map(
    fn: Callable[[Any], Any], items: Iterable[Any], threads: int, ahead: int = 8
) -> Iterator[Any]:
    """``fn(item)`` for each of ``items`` in order, computed in ``threads`` threads up to ``ahead``
    items before the one asked for; an item's exception is raised where its result would be."""
    items = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="dinokit-decode")
    pending: collections.deque[concurrent.futures.Future] = collections.deque(
        pool.submit(fn, item) for item in itertools.islice(items, max(1, ahead))
    )
    try:
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def prefetch_threads(device: torch.device) -> int:
    """Decode threads for a pass on ``device`` (:func:`decode_threads` of this process's cores and,
    on a CPU, torch's compute threads as the thread plan set them; a GPU leaves every core free)."""
    compute = torch.get_num_threads() if torch.device(device).type == "cpu" else 0
    return decode_threads(compute, available_cores())


def image_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int = 0,
    threads: int | None = None,
    collate_fn: Callable[[list], Any] = collate_skip_none,
    device: torch.device | str = "cpu",
):
    """The batches of an evaluation pass over ``dataset`` in order: a ``DataLoader`` with
    ``num_workers`` worker processes; else a :class:`PrefetchLoader` with ``threads`` threads
    (None: :func:`prefetch_threads` for ``device``); ``threads`` 0: a ``DataLoader`` in this process."""
    device = torch.device(device)
    if threads is None:
        threads = prefetch_threads(device)
    pin_memory = device.type == "cuda"
    if num_workers > 0 or threads <= 0:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
        )
    return PrefetchLoader(dataset, batch_size, threads, collate_fn)
