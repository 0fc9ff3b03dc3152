"""dinokit: DINO self-supervised Vision Transformers (Caron et al. 2021) as installable software."""

__version__ = "0.1.0"

from .checkpoints import load_backbone, save_backbone  # noqa: E402
from .errors import CheckpointError, DataError, DinokitError  # noqa: E402
from .models import build_backbone  # noqa: E402

__all__ = [
    "CheckpointError",
    "DataError",
    "DinokitError",
    "__version__",
    "build_backbone",
    "load_backbone",
    "save_backbone",
]
