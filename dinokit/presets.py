"""The released DINO, DINOv2 and DINOv3 checkpoints by name: the preset tables, and fetching a
preset's file once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, where torch.hub's own
loaders of these files put them too). ``DINOKIT_OFFLINE=1`` never downloads: a preset that is not in
the cache then fails at once with the sentence that says where to put the file. DINOv3's weights are
gated by their licence and never downloaded: a DINOv3 preset is its file in the cache, and the
sentence for a missing one says where to request it."""

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
DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2/"
#: where DINOv3's weights are requested (they are released under the DINOv3 licence)
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _dinov2(model: str, reg: bool) -> str:
    name = f"dinov2_{model}{'_reg4' if reg else ''}_pretrain.pth"
    return f"{DINOV2_BASE_URL}dinov2_{model}/{name}"


#: DINOv3 release file -> its Hugging Face model id (the other place it can be requested)
DINOV3_FILES: dict[str, str] = {
    "dinov3_vits16_pretrain_lvd1689m-08c60483.pth": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
}

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
    # DINOv2 (Oquab et al. 2023) and its register models (Darcet et al. 2024): full URLs
    **{f"dinov2_vit{s}14{'_reg' if reg else ''}": (_dinov2(f"vit{s}14", reg), f"dinov2_vit{s}14{'_reg' if reg else ''}", 14)
       for reg in (False, True) for s in "sblg"},
    # DINOv3 (Simeoni et al. 2025): gated, a file name only
    **{f.split("_pretrain")[0]: (f, f.split("_pretrain")[0], 16) for f in DINOV3_FILES},
}  # fmt: skip

#: released linear-probe heads, for ``dinokit linear --evaluate``
LINEAR_PRESETS: dict[str, str] = {
    "dino_vits16": "dino_deitsmall16_pretrain/dino_deitsmall16_linearweights.pth",
    "dino_vits8": "dino_deitsmall8_pretrain/dino_deitsmall8_linearweights.pth",
    "dino_vitb16": "dino_vitbase16_pretrain/dino_vitbase16_linearweights.pth",
    "dino_vitb8": "dino_vitbase8_pretrain/dino_vitbase8_linearweights.pth",
    "dino_resnet50": "dino_resnet50_pretrain/dino_resnet50_linearweights.pth",
    # DINOv2's 4-layer heads: the CLS tokens of the last 4 blocks followed by the average patch token
    **{f"dinov2_vit{s}14{'_reg' if reg else ''}":
       f"{DINOV2_BASE_URL}dinov2_vit{s}14/dinov2_vit{s}14{'_reg4' if reg else ''}_linear4_head.pth"
       for reg in (False, True) for s in "sblg"},
}  # fmt: skip

PRESET_ALIASES = {
    "dino_deitsmall16_pretrain": "dino_vits16",
    "dino_deitsmall8_pretrain": "dino_vits8",
    "dino_vitbase16_pretrain": "dino_vitb16",
    "dino_vitbase8_pretrain": "dino_vitb8",
    "dino_resnet50_pretrain": "dino_resnet50",
    "dino_deitsmall8_300ep_pretrain": "dino_deitsmall8_300ep",
    "dino_vitsmall16_googlelandmark_pretrain": "dino_vits16_googlelandmark",
    **{f"dinov2_vit{s}14{r}_pretrain": f"dinov2_vit{s}14{'_reg' if r else ''}" for s in "sblg" for r in ("", "_reg4")},
    **{f"dinov2_vit{s}14_reg4": f"dinov2_vit{s}14_reg" for s in "sblg"},
}  # fmt: skip


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
    if url_path in DINOV3_FILES:
        raise CheckpointError(
            f"The preset {name!r} is not in the cache and DINOv3 weights are released under their licence only: "
            f"request them at {DINOV3_DOWNLOADS} (or on Hugging Face as {DINOV3_FILES[url_path]}) and put "
            f"{url_path} at {dest}, or give the downloaded file or folder with --weights."
        )
    url = url_path if "://" in url_path else BASE_URL + url_path
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
