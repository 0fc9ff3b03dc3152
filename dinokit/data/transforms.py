"""Image transforms shared by the commands (ImageNet normalisation, the evaluation transform)."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the evaluation crop is this fraction of the resize (224 of 256, as in DeiT and DINO)
CROP_FRACTION = 0.875


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def resize_for(crop: int) -> int:
    """The evaluation resize that a centre crop of ``crop`` pixels is taken from (256 for 224)."""
    return int(round(crop / CROP_FRACTION))


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """The evaluation transform: Resize(256, bicubic) -> CenterCrop(224) -> normalise; at another
    crop size ``eval_transform(resize_for(crop), crop)`` keeps the 0.875 ratio."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            normalize(),
        ]
    )


def describe_transform(transform) -> str:
    """A stable text form of a transform, for cache fingerprints."""
    return repr(transform).replace("\n", " ")
