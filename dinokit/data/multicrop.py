"""DINO's multi-crop augmentation (paper Sec. 3.1 and Appendix) and the unlabelled training set.

Each image gives two global crops and N local crops. The augmentations are drawn from a random
state seeded by (seed, epoch, image index), so a sample's crops do not depend on the number of
data workers, on the process that loads it, or on whether the run was stopped and resumed: an
interrupted run sees exactly the crops the uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ..errors import DataError
from .images import DecodeNeed, open_rgb
from .transforms import decode_need, normalize

log = logging.getLogger("dinokit")


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from [radius_min, radius_max], applied with prob p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.prob}, radius=({self.radius_min}, {self.radius_max}))"


class Solarization:
    """PIL solarization (invert pixels above 128), applied with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"Solarization(p={self.p})"


class MultiCropAugmentation:
    """The DINO augmentation: returns [global1, global2, local1, ..., localN] as tensors.

    Shared pieces: horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
    p=0.2, ImageNet normalisation. Global 1 blurs always; global 2 blurs with p=0.1 and solarizes
    with p=0.2; locals blur with p=0.5. Crops are bicubic RandomResizedCrops; scales are fractions
    of the image area.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
    ):
        self.local_crops_number = int(local_crops_number)
        flip_and_color_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        to_tensor = T.Compose([T.ToTensor(), normalize()])
        bicubic = T.InterpolationMode.BICUBIC
        gscale, lscale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.global_transfo1 = T.Compose(
            [
                T.RandomResizedCrop(global_size, scale=gscale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(1.0),
                to_tensor,
            ]
        )
        self.global_transfo2 = T.Compose(
            [
                T.RandomResizedCrop(global_size, scale=gscale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(0.1),
                Solarization(0.2),
                to_tensor,
            ]
        )
        self.local_transfo = T.Compose(
            [
                T.RandomResizedCrop(local_size, scale=lscale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(0.5),
                to_tensor,
            ]
        )

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def decode_need(self) -> DecodeNeed | None:
        """What the smallest crop of each kind needs (see :func:`dinokit.data.transforms.decode_need`)."""
        needs = [decode_need(t) for t in (self.global_transfo1, self.global_transfo2)]
        if self.local_crops_number:
            needs.append(decode_need(self.local_transfo))
        merged: DecodeNeed | None = DecodeNeed()
        for need in needs:
            merged = merged.merge(need) if merged is not None else None
        return merged

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (a fixed mix of the three numbers)."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_000_019 + int(index) * 2_654_435_761) % (2**63 - 1)


class MultiCropDataset(torch.utils.data.Dataset):
    """Unlabelled images through :class:`MultiCropAugmentation`.

    An image that cannot be decoded is skipped: the next readable image in the list takes its place
    (so batches keep their size on every rank) and the item reports the indices of the files it
    skipped. Items are ``(crops, skipped_indices)``; :func:`collate_multicrop` stacks them. A bad
    file is tried by every item whose search reaches it, so a count of unreadable files takes the
    distinct indices (see :func:`count_new_unreadable`), not the number of tries.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: MultiCropAugmentation,
        seed: int = 0,
        exact_decode: bool = False,
    ):
        if not paths:
            raise DataError("The data set holds no images.")
        self.paths = list(paths)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        #: a large JPEG is decoded at the reduced scale that still covers the smallest crop
        self.need = None if exact_decode else decode_need(transform)

    def set_epoch(self, epoch: int) -> None:
        """Set before each epoch's loader is created (workers get a copy of the data set)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.finish(i, self.read(i))

    def read(self, i: int) -> tuple[Image.Image | None, tuple[int, ...]]:
        """The decoded picture item ``i`` uses (the first readable one from ``i`` on, None when none of
        the next 64 is) and the indices it skipped. Draws no random number: safe in a thread."""
        n = len(self.paths)
        skipped: list[int] = []
        for k in range(min(n, 64)):
            j = (i + k) % n
            try:
                return open_rgb(self.paths[j], self.need), tuple(skipped)
            except DataError:
                skipped.append(j)
                log.debug("skipping unreadable image %s", self.paths[j])
        return None, tuple(skipped)

    def finish(self, i: int, read: tuple[Image.Image | None, tuple[int, ...]]):
        """Item ``i`` from what :meth:`read` gave: the crops drawn from its seeded random state (the
        global generators, forked: call it from one thread only)."""
        img, skipped = read
        if img is None:
            return None, skipped
        s = sample_seed(self.seed, self.epoch, i)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed (and queue calls for) CUDA
            torch.random.default_generator.manual_seed(s)
            random.seed(s)
            try:
                crops = self.transform(img)
            finally:
                random.setstate(py_state)
        return crops, skipped


def collate_multicrop(batch):
    """Stack ``(crops, skipped_indices)`` items: returns (list of (B, 3, H, W) tensors or None, the
    skipped indices of all items, a file tried by several items once per try)."""
    skipped = tuple(j for _, s in batch for j in s)
    kept = [c for c, _ in batch if c is not None]
    if not kept:
        return None, skipped
    ncrops = len(kept[0])
    return [torch.stack([c[k] for c in kept]) for k in range(ncrops)], skipped


def count_new_unreadable(skipped: Iterable[int], seen: set[int]) -> int:
    """How many of the ``skipped`` indices are not in ``seen`` (which then holds them): counts each
    unreadable file once per epoch however many items tried it."""
    new = set(skipped) - seen
    seen |= new
    return len(new)
