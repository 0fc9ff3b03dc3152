"""The released DINO, DINOv2 and DINOv3 checkpoints by name: the preset tables, and fetching a
preset's file once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, where torch.hub's own
loaders of these files put them too). ``DINOKIT_OFFLINE=1`` never downloads: a preset that is not in
the cache then fails at once with the sentence that says where to put the file. DINOv3's weights are
gated by their licence and never downloaded: a DINOv3 preset is its file in the cache, and the
sentence for a missing one says where to request it.

Hugging Face repository ids (``facebook/dino-vits16``) are fetched through the hub's own client and
cache when ``huggingface_hub`` is installed (the ``hf`` extra); :func:`preset_catalogue` and
:func:`hf_catalogue` describe what there is and what is cached, for ``dinokit models``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
    # the satellite model (SAT-493M): its own normalisation (mean 0.430, 0.411, 0.296; std 0.213, 0.156, 0.143)
    "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth": "facebook/dinov3-vitl16-pretrain-sat493m",
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
    **{f.split("_pretrain")[0] + ("_sat493m" if "sat493m" in f else ""): (f, f.split("_pretrain")[0], 16)
       for f in DINOV3_FILES},
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
    import torch  # torch.hub knows where its cache is (TORCH_HOME); loaded here to keep start-up light

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


def weights_needed(purpose: str = "") -> str:
    """The sentence for a command run without ``--weights``: which weights to give, and where every
    preset is listed. Random weights are a baseline asked for by name, never what a forgotten option
    silently means."""
    return (
        f"Give --weights{' ' + purpose if purpose else ''}: a checkpoint file, a preset (one of the "
        f"{len(PRESETS)} that `dinokit models` lists, such as {', '.join(_first_of_each_family())}) "
        "or 'random' for a randomly initialised baseline."
    )


def _first_of_each_family() -> list[str]:
    firsts: dict[str, str] = {}
    for name in PRESETS:
        firsts.setdefault(name.split("_", 1)[0], name)
    return list(firsts.values())


def unknown_weights(weights: str) -> str | None:
    """The sentence refusing ``--weights`` that names nothing dinokit can load (not 'random', not a
    preset, not an existing file, not a Hugging Face repository id), or None when it names something.
    Light (no download, no torch): commands ask it before their work starts."""
    weights = str(weights)
    if weights == "random" or resolve_preset(weights) is not None:
        return None
    path = Path(weights).expanduser()
    if path.exists() or is_hf_repo_id(weights):
        return None
    if os.sep in weights or "." in weights:
        return f"The weights file {path} does not exist."
    known = ", ".join(["random", *PRESETS])
    return f"Unknown weights {weights!r}: not a file and not a preset ({known})."


# ---------------------------------------------------------------------------------------------
# What there is: the tables as records, with what the caches hold
# ---------------------------------------------------------------------------------------------
@dataclass
class PresetInfo:
    """One preset of :data:`PRESETS` as ``dinokit models`` lists it."""

    name: str
    arch: str
    patch_size: int | None
    file: str  #: the file name in torch.hub's cache
    url: str | None  #: where it is downloaded from; None for a file without a public address
    cache_path: str
    cached: bool
    aliases: list[str]
    linear_head: str | None  #: the file of its released linear head, if any
    linear_head_cached: bool


def preset_url(url_path: str) -> str | None:
    """Where a preset's file is downloaded from: a table entry is a full URL, a path under BASE_URL,
    or a bare file name (a file without a public address, requested elsewhere: None)."""
    if "://" in url_path:
        return url_path
    return BASE_URL + url_path if "/" in url_path else None


def preset_catalogue() -> list[PresetInfo]:
    """Every preset of the tables, in table order, with whether its file is in the cache."""
    out = []
    for name, entry in PRESETS.items():
        url_path, arch, patch = entry[0], entry[1], entry[2]
        path = preset_cache_path(url_path)
        head = LINEAR_PRESETS.get(name)
        out.append(
            PresetInfo(
                name=name,
                arch=arch,
                patch_size=patch,
                file=path.name,
                url=preset_url(url_path),
                cache_path=str(path),
                cached=path.is_file(),
                aliases=[a for a, target in PRESET_ALIASES.items() if target == name],
                linear_head=os.path.basename(head) if head else None,
                linear_head_cached=bool(head and preset_cache_path(head).is_file()),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face repository ids
# ---------------------------------------------------------------------------------------------
#: the DINO backbones published on the Hugging Face hub (any other ViT repo id works too)
HF_REPOS: dict[str, tuple[str, int]] = {
    "facebook/dino-vits16": ("vit_small", 16),
    "facebook/dino-vits8": ("vit_small", 8),
    "facebook/dino-vitb16": ("vit_base", 16),
    "facebook/dino-vitb8": ("vit_base", 8),
}

#: the weight files of a Hugging Face repository dinokit reads, in order of preference
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".npz", ".tar")


def is_hf_repo_id(weights: str) -> bool:
    """Whether ``weights`` reads as a Hugging Face repository id (``owner/name``) rather than a path:
    one slash, no file suffix, and no local folder of the owner's name (``runs/x`` with a ``runs/``
    folder here is a missing local file, not a repository)."""
    w = str(weights)
    if not _REPO_ID.match(w) or w.lower().endswith(_FILE_SUFFIXES):
        return False
    return not Path(w.split("/")[0]).exists()


def hf_cache_dir() -> Path:
    """The Hugging Face hub's cache folder (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hf_where(repo_id: str) -> str:
    return (
        f"download {' or '.join(HF_WEIGHT_FILES)} from https://huggingface.co/{repo_id} into a folder and pass "
        "that folder (or the file) to --weights"
    )


def _hf_offline() -> bool:
    return is_offline() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def fetch_hf_weights(repo_id: str) -> Path:
    """The local file of a Hugging Face repository's weights, through ``huggingface_hub``'s client and
    cache (downloaded once; only the cache when offline). Without the package, or when the file can
    be neither found in the cache nor fetched, one sentence says where to put the files."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"--weights {repo_id} looks like a Hugging Face repository, and fetching it needs huggingface_hub "
            f"(pip install 'dinokit[hf]'); or {_hf_where(repo_id)}."
        ) from None
    offline = _hf_offline()
    names = list(HF_WEIGHT_FILES)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        names.remove("model.safetensors")
    reasons = []
    unreachable = "" if offline else _hf_unreachable()
    if unreachable:  # the cache, or say so at once: not after the client's retries (about a minute)
        cached = _hf_cached(huggingface_hub, repo_id, names)
        if cached is not None:
            log.info("%s: the cached weights of %s", unreachable, repo_id)
            return cached
        raise CheckpointError(
            f"The Hugging Face repository {repo_id} is not in the Hugging Face cache and {unreachable}: "
            f"{_hf_where(repo_id)}."
        )
    for name in names:
        try:
            path = huggingface_hub.hf_hub_download(repo_id, name, local_files_only=offline)
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError in recent versions)
            reasons.append(f"{name} not cached" if offline else f"{name} not cached and not reachable")
            continue
        except EntryNotFoundError:
            reasons.append(f"no {name} in the repository")
            continue
        except Exception as e:  # an unknown repository, no network, ...
            reasons.append(_short_reason(e))
            continue
        log.info("weights of %s: %s", repo_id, path)
        return Path(path)
    state = "is not in the Hugging Face cache and offline mode is set" if offline else "could not be fetched"
    raise CheckpointError(
        f"The Hugging Face repository {repo_id} {state} ({'; '.join(dict.fromkeys(reasons))}): {_hf_where(repo_id)}."
    )


def _hf_cached(huggingface_hub, repo_id: str, names: list[str]) -> Path | None:
    """A weight file of ``repo_id`` already in the Hugging Face cache, found without the network."""
    for name in names:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (the client's exception types vary by version)
            continue
    return None


def _hf_unreachable(timeout: float = 5.0) -> str:
    """Why the Hugging Face hub cannot be reached from here ('' when a connection opens, or when a proxy
    stands between, which only the client can try). One quick connection instead of the client's
    retries: offline, ``hf_hub_download`` answers after about a minute."""
    import socket
    import urllib.parse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__
        return f"{host} cannot be reached ({reason})"
    return ""


def _short_reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class HfRepoInfo:
    """One repository of :data:`HF_REPOS` as ``dinokit models`` lists it."""

    repo_id: str
    arch: str
    patch_size: int
    cached: bool  #: a weight file of it is in the Hugging Face cache


def hf_catalogue() -> list[HfRepoInfo]:
    """The known Hugging Face DINO repositories, with whether a weight file of each is in the cache
    (read from the cache folder, without the network or huggingface_hub)."""
    cache = hf_cache_dir()
    out = []
    for repo_id, (arch, patch) in HF_REPOS.items():
        snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        cached = snapshots.is_dir() and any(
            (snap / name).is_file() for snap in snapshots.iterdir() for name in HF_WEIGHT_FILES
        )
        out.append(HfRepoInfo(repo_id, arch, patch, cached))
    return out
