"""The backbone every command uses: one definition of its options (:class:`BackboneOptions`), one
function that seeds, loads and places it (:func:`prepare_backbone`), the loader behind it
(:func:`load_backbone`: a file, a preset, a Hugging Face repository or random weights) and the
released-weights format out (:func:`save_backbone`)."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.normalization import IMAGENET, SAT493M, Normalization, check_normalization
from ..errors import CheckpointError
from ..io import torch_save_atomic
from ..models.inference import inference_model
from ..models.registry import build_backbone, canonical_arch, is_vit_arch
from ..presets import (
    PRESETS,
    fetch_hf_weights,
    fetch_preset_file,
    is_hf_repo_id,
    resolve_preset,
    unknown_weights,
    weights_needed,
)
from ..runtime import RuntimeOptions, resolve_device, resolve_precision, seed_everything
from .conversion import extract_backbone_state_dict, infer_arch, map_weight_norm_keys
from .reading import error_line, read_checkpoint

log = logging.getLogger("dinokit")


def describe(arch: str, patch: int | None) -> str:
    return arch if patch is None else f"{arch} with patch size {patch}"


@dataclass(kw_only=True)
class BackboneOptions:
    """Which backbone a command runs: the weight fields every config shares (one definition).

    ``weights`` is a file, a preset name or ``"random"``; arch and patch size are inferred from the
    weights when None and checked against them when given.
    """

    weights: str | None = None
    arch: str | None = None
    patch_size: int | None = None
    checkpoint_key: str = "teacher"  #: which weights of a training checkpoint: teacher or student
    model_kwargs: dict = field(default_factory=dict)  #: extra constructor arguments (tiny test models)
    #: the input normalisation, overriding the one that belongs to the weights (None: the weights')
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass
class PreparedBackbone:
    """A loaded backbone in fp32 on its device, in eval mode, with the compute precision to use."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None  #: the precision resolved for the command (None = fp32)

    def for_inference(self) -> tuple[nn.Module, torch.dtype | None]:
        """The model to run frozen: a copy cast once to bf16/fp16 where asked (see
        :func:`dinokit.models.inference.inference_model`), else the fp32 model."""
        return inference_model(self.model, self.dtype)

    @property
    def normalization(self) -> Normalization:
        """The mean and std of the inputs the weights expect (``--mean``/``--std`` on top)."""
        return backbone_normalization(self.model)


def prepare_backbone(
    cfg: BackboneOptions,
    runtime: RuntimeOptions | None = None,
    *,
    training: bool = False,
    missing: str | None = None,
) -> PreparedBackbone:
    """Seed, load and place the backbone of ``cfg`` (a config with both option sets, or two objects).

    The seed is set before loading so that ``--weights random`` gives the same network for the
    same ``--seed`` in every command. ``missing`` is the sentence raised when ``cfg.weights`` is None.
    """
    if runtime is None:
        if not isinstance(cfg, RuntimeOptions):
            raise TypeError(
                "prepare_backbone takes a config with both option sets, or the runtime options apart."
            )
        runtime = cfg
    if cfg.weights is None:
        raise CheckpointError(missing or weights_needed())
    device = resolve_device(runtime.device)
    dtype = resolve_precision(runtime.precision, device, training=training)
    check_normalization(getattr(cfg, "mean", None), getattr(cfg, "std", None))
    seed_everything(runtime.seed)
    model = load_backbone(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, **cfg.model_kwargs)
    own = getattr(model, "normalization", IMAGENET)  # load_backbone records the weights' own
    record_weights(
        model, normalization=given_normalization(own, getattr(cfg, "mean", None), getattr(cfg, "std", None))
    )
    return PreparedBackbone(model.to(device).eval(), device, dtype)


def backbone_normalization(model: nn.Module) -> Normalization:
    """The normalisation :func:`load_backbone` (and :func:`prepare_backbone`) record on a backbone."""
    norm = getattr(model, "normalization", None)
    if not isinstance(norm, Normalization):
        raise CheckpointError(
            f"This {type(model).__name__} was not loaded by dinokit: it records no input normalisation."
        )
    return norm


def record_weights(model: nn.Module, **facts: object) -> None:
    """Keep facts about a backbone's weights on it as plain attributes: ``weights_source`` (where they
    came from) and ``normalization`` (the inputs they expect), read by the commands that report them."""
    for name, value in facts.items():
        setattr(model, name, value)


def _three(values: Any) -> tuple[float, float, float]:
    """Three channel values (a mean or std, checked to be three) as floats."""
    r, g, b = (float(v) for v in values)
    return r, g, b


def given_normalization(own: Normalization, mean, std) -> Normalization:
    """The weights' normalisation ``own`` with ``--mean`` / ``--std`` on top where given."""
    if mean is None and std is None:
        return own
    return Normalization(
        _three(mean if mean is not None else own.mean),
        _three(std if std is not None else own.std),
        "--mean/--std"
        if mean is not None and std is not None
        else f"{'--mean' if mean is not None else '--std'} with {own.source} "
        f"{'std' if mean is not None else 'mean'}",
    )


#: files already said to have an unknown normalisation (said once per file and process)
_ASSUMED: set[str] = set()
#: the released weights' file names (a preset's file used directly as --weights): ImageNet's
_RELEASED_FILES = frozenset(Path(url_path).name for url_path, _, _ in PRESETS.values())


def weights_normalization(weights: str, ckpt: Any = None, path: Path | None = None) -> Normalization:
    """The normalisation that belongs to ``weights``: the file's own ``mean``/``std`` where it keeps
    them (dinokit's fine-tuned models, a ``normalization`` entry); DINOv3's SAT-493M values for its
    satellite weights (a preset, file or repository whose name says sat493m); ImageNet's for the
    released DINO/DINOv2/DINOv3 web-image weights, random weights and training checkpoints (DINO's
    recipe normalises with ImageNet's). Any other file: ImageNet's is assumed, and said once."""
    names = f"{weights} {path.name if path is not None else ''}".lower()
    if isinstance(ckpt, dict):
        kept = ckpt.get("normalization")
        own = kept if isinstance(kept, dict) else ckpt
        mean, std = own.get("mean"), own.get("std")
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            return Normalization(_three(mean), _three(std), "the file's own")
    if "sat493m" in names:
        return SAT493M
    if weights == "random" or ckpt is None:
        return IMAGENET
    if isinstance(ckpt, dict) and any(k in ckpt for k in ("teacher", "student", "model", "format")):
        return Normalization(IMAGENET.mean, IMAGENET.std, "ImageNet's (a DINO training checkpoint)")
    if path is not None and path.name in _RELEASED_FILES:
        return Normalization(IMAGENET.mean, IMAGENET.std, "ImageNet's (a released file)")
    key = str(path or weights)
    if key not in _ASSUMED:  # a note, not a warning: it is what nearly every such file wants
        _ASSUMED.add(key)
        log.info(
            "%s does not say how its images were normalised; ImageNet's mean and std are assumed "
            "(--mean and --std set others).",
            key,
        )
    return Normalization(IMAGENET.mean, IMAGENET.std, "ImageNet's (assumed)")


def load_backbone(
    weights: str | os.PathLike = "random",
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    vit_options: dict | None = None,
    **model_kwargs,
) -> nn.Module:
    """A backbone with weights: a file path, a preset name (e.g. ``dino_vits16``) or ``"random"``.

    Arch and patch size are inferred from the state dict when not given; when given they must
    match it. ``vit_options`` are constructor arguments for a ViT only (a training recipe's
    stochastic depth, whatever backbone the weights turn out to be); ``model_kwargs`` go to any
    backbone and win over them. The model is returned in eval mode on the CPU.
    """
    weights = str(weights)
    if weights == "random":
        arch = arch or "vit_small"
        model = build_backbone(arch, patch_size, **_with_vit_options(arch, vit_options, model_kwargs))
        record_weights(model, weights_source="random", normalization=IMAGENET)
        return model.eval()
    preset = resolve_preset(weights)
    if preset is not None and not Path(weights).exists():
        url_path, p_arch, p_patch = preset
        if arch is not None and canonical_arch(arch) != p_arch:
            raise CheckpointError(
                f"The preset {weights!r} is {describe(p_arch, p_patch)}, but --arch {arch} was asked for."
            )
        if patch_size is not None and p_patch is not None and int(patch_size) != p_patch:
            raise CheckpointError(
                f"The preset {weights!r} is {describe(p_arch, p_patch)}, but --patch-size {patch_size} "
                "was asked for."
            )
        path = fetch_preset_file(url_path, weights)
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            # Only an unreadable file counts as a broken cache entry; a file that reads but does
            # not fit the request is the request's problem and the cached file stays.
            log.warning("the cached file %s does not load (%s); fetching it again", path, e)
            path.unlink(missing_ok=True)
            try:
                path = fetch_preset_file(url_path, weights)
                ckpt = read_checkpoint(path)
            except CheckpointError as e2:
                raise CheckpointError(
                    f"The cached file of preset {weights!r} did not load and was removed, and fetching it "
                    f"again failed: {str(e2).rstrip('.')}."
                ) from e2
        model = _model_from_checkpoint(
            ckpt, path, arch, patch_size, checkpoint_key, vit_options, model_kwargs
        )
        record_weights(
            model,
            weights_source=weights,
            normalization=(
                SAT493M
                if "sat493m" in f"{weights} {url_path}".lower()
                else Normalization(IMAGENET.mean, IMAGENET.std, "ImageNet's (the preset's)")
            ),
        )
        return model
    path = Path(weights).expanduser()
    if not path.exists() and is_hf_repo_id(weights):  # a local path of that name wins
        path = fetch_hf_weights(weights)
    if not path.exists():
        raise CheckpointError(unknown_weights(weights) or f"The weights file {path} does not exist.")
    ckpt = read_checkpoint(path)
    model = _model_from_checkpoint(ckpt, path, arch, patch_size, checkpoint_key, vit_options, model_kwargs)
    record_weights(model, weights_source=str(path), normalization=weights_normalization(weights, ckpt, path))
    return model


def _with_vit_options(arch: str, vit_options: dict | None, model_kwargs: dict) -> dict:
    """The constructor arguments of ``arch``: ``vit_options`` apply to a ViT only."""
    if vit_options and is_vit_arch(arch):
        return {**vit_options, **model_kwargs}
    return dict(model_kwargs)


def _model_from_checkpoint(ckpt: Any, path: Path, arch, patch_size, checkpoint_key, vit_options,
                           model_kwargs) -> nn.Module:  # fmt: skip
    sd = extract_backbone_state_dict(ckpt, checkpoint_key, source=str(path))
    sd = map_weight_norm_keys(sd)
    found_arch, found_patch, extra = infer_arch(sd)
    if arch is not None:
        want = canonical_arch(arch)
        if want != found_arch:
            raise CheckpointError(
                f"{path} holds {describe(found_arch, found_patch)} weights, but --arch {want} was asked for."
            )
    if patch_size is not None and found_patch is not None and int(patch_size) != found_patch:
        raise CheckpointError(
            f"{path} holds {describe(found_arch, found_patch)} weights, but --patch-size {patch_size} was asked for."
        )
    kwargs = {**extra, **_with_vit_options(found_arch, vit_options, model_kwargs)}
    try:
        model = build_backbone(found_arch, found_patch, **kwargs)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (ValueError, RuntimeError) as e:  # shapes no model of that kind has, or that differ from it
        mismatch = re.search(
            r"size mismatch for ([^:]+): copying a param with shape (.+?) from checkpoint", str(e)
        )
        detail = f"{mismatch.group(1)} has shape {mismatch.group(2)}" if mismatch else error_line(e)
        raise CheckpointError(
            f"{path} has tensor shapes that fit no {describe(found_arch, found_patch)} ({detail}); the file is "
            "damaged or was not written for this model."
        ) from e
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys such as {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys such as {unexpected[0]}")
        raise CheckpointError(f"{path} does not fit {describe(found_arch, found_patch)}: {'; '.join(parts)}.")
    return model.eval()


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The flat state dict of a backbone (released-weights format), unwrapped from DDP/compile."""
    m = model
    while hasattr(m, "module") or hasattr(m, "_orig_mod"):
        inner = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        assert isinstance(inner, nn.Module)  # what DistributedDataParallel and torch.compile wrap
        m = inner
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in m.state_dict().items())


def save_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a backbone as a flat state dict, the released-weights format, atomically."""
    torch_save_atomic(backbone_state_dict(model), path)
