"""Image transforms shared by the commands (ImageNet normalisation, the evaluation transform)."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """The frozen-evaluation transform: Resize(256, bicubic) -> CenterCrop(224) -> normalise."""
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
