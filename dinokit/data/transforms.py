"""Image transforms shared by the commands (the normalisation of the weights, the evaluation transform)."""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

from .images import DecodeNeed
from .normalization import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalization  # noqa: F401 (the transforms' users)

#: the evaluation crop is this fraction of the resize (224 of 256, as in DeiT and DINO)
CROP_FRACTION = 0.875


def normalize(norm: Normalization = IMAGENET) -> T.Normalize:
    return T.Normalize(norm.mean, norm.std)


def resize_for(crop: int) -> int:
    """The evaluation resize that a centre crop of ``crop`` pixels is taken from (256 for 224)."""
    return int(round(crop / CROP_FRACTION))


def eval_transform(resize: int = 256, crop: int = 224, norm: Normalization = IMAGENET) -> T.Compose:
    """The evaluation transform: Resize(256, bicubic) -> CenterCrop(224) -> normalise; at another
    crop size ``eval_transform(resize_for(crop), crop)`` keeps the 0.875 ratio."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            normalize(norm),
        ]
    )


def describe_transform(transform) -> str:
    """A stable text form of a transform, for cache fingerprints."""
    return repr(transform).replace("\n", " ")


def decode_need(transform: Any) -> DecodeNeed | None:
    """What ``transform`` needs of the decoded picture (see :class:`DecodeNeed`); None when it needs
    the full picture or cannot be read (then every image is decoded in full).

    A transform may state its own need (a ``decode_need()`` method, as the multi-crop augmentation
    does). In a ``Compose`` the first transform that looks at pixel positions decides: a Resize to a
    short side or to a fixed size, or a RandomResizedCrop; anything else there (a crop of the full
    picture, a Lambda) needs the full picture. Transforms that only change values (colour jitter)
    before it are passed over. A Resize with ``max_size`` needs the full picture too.
    """
    own = getattr(transform, "decode_need", None)
    if callable(own):
        return own()
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    for step in steps:
        if isinstance(step, T.Resize):
            if step.max_size is not None:
                return None
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            if len(size) == 1:
                return DecodeNeed(short_side=int(size[0]))
            return DecodeNeed(width=int(size[1]), height=int(size[0]))
        if isinstance(step, T.RandomResizedCrop):
            aspect = min(step.ratio[0], 1.0 / step.ratio[1], 1.0)
            return DecodeNeed(crops=((max(step.size), float(step.scale[0]), float(aspect)),))
        if isinstance(step, T.Compose) or callable(getattr(step, "decode_need", None)):
            return decode_need(step)
        if not isinstance(step, _VALUE_ONLY):
            return None
    return None


#: transforms that change pixel values but not where they are: they may come before the resize
_VALUE_ONLY = (T.ColorJitter, T.Grayscale, T.RandomGrayscale, T.RandomHorizontalFlip, T.RandomVerticalFlip)
