"""How a backbone's input is normalised: the mean and std that belong to its weights (ImageNet's for
DINO, DINOv2 and DINOv3's web-image models; DINOv3's SAT-493M values for its satellite models), kept
free of torchvision so that the checkpoint loader can name them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DINOv3's satellite weights (SAT-493M) expect these, per the DINOv3 README
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


@dataclass(frozen=True)
class Normalization:
    """How a backbone's input images are normalised: per-channel ``mean`` and ``std`` (of pixel values
    in [0, 1]) and where they come from (``source``: a preset, the file, the options, or assumed)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "ImageNet's"

    def record(self) -> dict[str, Any]:
        """What metrics.json records."""
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


IMAGENET = Normalization()
SAT493M = Normalization(SAT493M_MEAN, SAT493M_STD, "DINOv3's SAT-493M (satellite) values")


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Refuse a mean or std that is not three values, a std that is not positive, or a mean outside
    [0, 1] (the mean of pixel values in [0, 1]), in one sentence."""
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != 3:
            raise DataError(f"{name} takes three values, one per channel (R,G,B), not {len(values)}.")
    if std is not None and min(std) <= 0:
        raise DataError(f"--std takes three positive values, not {','.join(f'{v:g}' for v in std)}.")
    if mean is not None and not all(0.0 <= v <= 1.0 for v in mean):
        raise DataError(
            f"--mean takes three values in [0, 1] (pixel values scaled to [0, 1]), not {','.join(f'{v:g}' for v in mean)}."
        )
