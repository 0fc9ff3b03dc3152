"""The linear segmentation protocol's image and label transforms (DINOv3 ``eval/segmentation/
transforms.py``): for training a random rescale of the shorter side to ``size * U(0.5, 2.0)`` (image
bilinear, labels nearest), a random ``size`` x ``size`` crop in which no class covers 75% or more of
the labelled pixels (up to 10 tries, mmsegmentation's ``cat_max_ratio``), a horizontal flip with
probability 0.5, the photometric distortion (brightness, contrast, saturation, hue, each with
probability 0.5), the weights' normalisation (ImageNet's for DINO, DINOv2 and DINOv3's web models) and padding to the crop (image 0, labels void); for
evaluation the shorter side resized to ``size``.

Every random draw comes from the generator passed in, so that a sample is a function of its seed
alone (exact resume, the same batch under any number of processes)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .normalization import IMAGENET, Normalization
from .palette import VOID_LABEL

SCALE_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short`` and the aspect kept (rounded as the official code)."""
    if height > width:
        return short, int(short * height / width + 0.5)
    return int(short * width / height + 0.5), short


def normalize_image(image: Image.Image | np.ndarray, norm: Normalization = IMAGENET) -> torch.Tensor:
    """A (3, H, W) float tensor normalised with the weights' mean and std (ImageNet's by default)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def eval_input(image: Image.Image, size: int, norm: Normalization = IMAGENET) -> torch.Tensor:
    """The evaluation input: the shorter side resized to ``size`` (bilinear), normalised."""
    w, h = short_side_size(*image.size, size)
    return normalize_image(image.resize((w, h), Image.Resampling.BILINEAR), norm)


def _crop_box(rng: np.random.Generator, h: int, w: int, size: int) -> tuple[int, int]:
    return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))


def random_crop(rng: np.random.Generator, labels: np.ndarray, size: int) -> tuple[int, int]:
    """The top-left corner of a ``size`` crop where no class covers ``CAT_MAX_RATIO`` of the labelled
    pixels and more than one class shows (10 tries, then the last drawn)."""
    h, w = labels.shape
    y, x = _crop_box(rng, h, w, size)
    for _ in range(10):
        crop = labels[y : y + size, x : x + size]
        _, counts = np.unique(crop[crop != VOID_LABEL], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        y, x = _crop_box(rng, h, w, size)
    return y, x


def photometric_distortion(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion as DINOv3 applies it, on a uint8 (H, W, 3) array."""

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = image
    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    contrast = bool(rng.integers(2))
    alpha = rng.uniform(0.5, 1.5)
    if mode == 1 and contrast:
        img = convert(img, alpha=alpha)
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)
    if rng.integers(2):
        t = TF.adjust_saturation(t, float(rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        t = TF.adjust_hue(t, float(rng.uniform(-0.5, 0.5)))
    img = t.permute(1, 2, 0).numpy()
    if mode == 0 and contrast:
        img = convert(img, alpha=alpha)
    return img


def train_sample(
    rng: np.random.Generator,
    image: Image.Image,
    labels: np.ndarray,
    size: int,
    photometric: bool = True,
    norm: Normalization = IMAGENET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training pair: ((3, size, size) normalised image, (size, size) int64 labels)."""
    short = int(size * (rng.random() * (SCALE_RANGE[1] - SCALE_RANGE[0]) + SCALE_RANGE[0]))
    w, h = short_side_size(*image.size, max(short, 1))
    img = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))
    lab = np.asarray(
        Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    ).astype(np.int64)
    y, x = random_crop(rng, lab, size)
    img, lab = img[y : y + size, x : x + size], lab[y : y + size, x : x + size]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if photometric:
        img = photometric_distortion(rng, np.ascontiguousarray(img))
    x_t = normalize_image(img, norm)
    y_t = torch.from_numpy(np.ascontiguousarray(lab))
    ph, pw = size - x_t.shape[1], size - x_t.shape[2]
    if ph or pw:
        x_t = torch.nn.functional.pad(x_t, (0, pw, 0, ph), value=0.0)
        y_t = torch.nn.functional.pad(y_t, (0, pw, 0, ph), value=VOID_LABEL)
    return x_t, y_t


__all__ = [
    "CAT_MAX_RATIO",
    "SCALE_RANGE",
    "eval_input",
    "normalize_image",
    "photometric_distortion",
    "random_crop",
    "short_side_size",
    "train_sample",
]
