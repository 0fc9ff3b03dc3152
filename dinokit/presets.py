"""The released DINO checkpoints by name: the preset tables, and fetching a preset's file once into
torch.hub's cache (``$TORCH_HOME/hub/checkpoints``). ``DINOKIT_OFFLINE=1`` never downloads: a preset
that is not in the cache then fails at once with the sentence that says where to put the file."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger("dinokit")

BASE_URL = "https://dl.fbaipublicfiles.com/dino/"

#: preset name -> (path under BASE_URL, arch, patch size)
PRESETS: dict[str, tuple[str, str, int | None]] = {
    "dino_vits16": ("dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", "vit_small", 16),
    "dino_vits8": ("dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", "vit_small", 8),
    "dino_vitb16": ("dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "vit_base", 16),
    "dino_vitb8": ("dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", "vit_base", 8),
    "dino_resnet50": ("dino_resnet50_pretrain/dino_resnet50_pretrain.pth", "resnet50", None),
    "dino_deitsmall8_300ep": (
        "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
        "vit_small",
        8,
    ),
    "dino_vits16_googlelandmark": (
        "dino_vitsmall16_googlelandmark_pretrain/dino_vitsmall16_googlelandmark_pretrain.pth",
        "vit_small",
        16,
    ),
}

#: released linear-probe heads, for ``dinokit linear --evaluate``
LINEAR_PRESETS: dict[str, str] = {
    "dino_vits16": "dino_deitsmall16_pretrain/dino_deitsmall16_linearweights.pth",
    "dino_vits8": "dino_deitsmall8_pretrain/dino_deitsmall8_linearweights.pth",
    "dino_vitb16": "dino_vitbase16_pretrain/dino_vitbase16_linearweights.pth",
    "dino_vitb8": "dino_vitbase8_pretrain/dino_vitbase8_linearweights.pth",
    "dino_resnet50": "dino_resnet50_pretrain/dino_resnet50_linearweights.pth",
}

PRESET_ALIASES = {
    "dino_deitsmall16_pretrain": "dino_vits16",
    "dino_deitsmall8_pretrain": "dino_vits8",
    "dino_vitbase16_pretrain": "dino_vitb16",
    "dino_vitbase8_pretrain": "dino_vitb8",
    "dino_resnet50_pretrain": "dino_resnet50",
    "dino_deitsmall8_300ep_pretrain": "dino_deitsmall8_300ep",
    "dino_vitsmall16_googlelandmark_pretrain": "dino_vits16_googlelandmark",
}


# ---------------------------------------------------------------------------------------------
# Presets through torch.hub's cache
# ---------------------------------------------------------------------------------------------
def hub_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def preset_cache_path(url_path: str) -> Path:
    return hub_cache_dir() / os.path.basename(url_path)


def is_offline() -> bool:
    return os.environ.get("DINOKIT_OFFLINE", "").lower() in ("1", "true", "yes")


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download to a temporary file beside ``dest``; rename only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            shutil.copyfileobj(r, f, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fetch_preset_file(url_path: str, name: str) -> Path:
    """The cached file of a preset, downloading it once when online."""
    dest = preset_cache_path(url_path)
    if dest.is_file():
        return dest
    url = BASE_URL + url_path
    where = f"download {url} and put it at {dest} (torch.hub's cache; set TORCH_HOME to move it)"
    if is_offline():
        raise CheckpointError(f"The preset {name!r} is not in the cache and DINOKIT_OFFLINE is set: {where}.")
    log.info("downloading %s to %s", url, dest)
    try:
        _download(url, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(f"The preset {name!r} could not be downloaded ({reason}); {where}.") from e
    return dest


def resolve_preset(name: str) -> tuple[str, str, int | None] | None:
    key = PRESET_ALIASES.get(name, name)
    return PRESETS.get(key)
