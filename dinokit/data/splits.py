"""Train/val splits of a labelled folder and seeded datasets for training that resumes exactly.

Every random draw is a function of the seed and of where it happens (epoch, image index), not of
what ran before: the augmentation of an image does not depend on the order, the worker or an
interruption, and the order of an epoch does not depend on the epochs before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DinokitError
from ..runtime import derive_seed
from .images import ImageDataset, LabelledFolder, scan_labelled_folder


class SeededImages(torch.utils.data.Dataset):
    """An :class:`ImageDataset` whose transform draws from a generator seeded by (seed, epoch, index):
    the augmentation of an image does not depend on the order, the worker or what ran before."""

    def __init__(self, base: ImageDataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, 17, self.epoch, i))
            return self.base[i]


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int, batch_size: int) -> list[int]:
    """This rank's sample order for an epoch: a seeded permutation cut to whole global batches
    (``world * batch_size`` images; the rest of the permutation is left out this epoch)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 29, epoch))
    perm = torch.randperm(n, generator=g)
    used = (n // (world * batch_size)) * world * batch_size
    return perm[:used][rank::world].tolist()


def stratified_split(folder: LabelledFolder, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction * n_c)`` images of each class (at least one stays in train)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for p, t in folder.samples:
        by_class.setdefault(t, []).append((p, t))
    train: list = []
    val: list = []
    for t in sorted(by_class):
        items = by_class[t]
        order = rng.permutation(len(items))
        n_val = min(int(round(fraction * len(items))), len(items) - 1)
        val.extend(items[j] for j in sorted(order[:n_val]))
        train.extend(items[j] for j in sorted(order[n_val:]))
    return train, val


@dataclass
class Splits:
    classes: list[str]
    train: list  # (path, label)
    val: list


def load_splits(train: Path | None, val: Path | None, val_split: float | None, seed: int) -> Splits:
    """The training and validation images of a classifier: ``val`` as a labelled folder with the
    training set's classes, or ``val_split`` (0.1 when neither is given) of each training class held
    out by :func:`stratified_split`."""
    if train is None:
        raise DataError("Give the training images with --train.")
    train_folder = scan_labelled_folder(train)
    classes = train_folder.classes
    if len(classes) < 2:
        raise DataError(
            f"{train} has a single class ({classes[0]}); fine-tuning a classifier needs at least two "
            "class sub-folders."
        )
    if val is not None and val_split is not None:
        raise DinokitError("Give either --val or --val-split, not both.")
    if val is not None:
        val_folder = scan_labelled_folder(val, classes=classes)
        return Splits(classes, list(train_folder.samples), list(val_folder.samples))
    fraction = 0.1 if val_split is None else float(val_split)
    if not 0.0 < fraction < 1.0:
        raise DinokitError(f"--val-split must be a fraction between 0 and 1, got {fraction}.")
    train_samples, val_samples = stratified_split(train_folder, fraction, seed)
    if not val_samples:
        raise DataError(
            f"--val-split {fraction} of the {len(train_folder)} images in {train} leaves no validation "
            "image; give a --val folder or a larger fraction."
        )
    return Splits(classes, train_samples, val_samples)
