"""The copy-detection descriptor and its whitening (Caron et al. 2021, Sec. 4.2.1, "Copy detection").

The descriptor is the last block's output after the final LayerNorm: the CLS token concatenated with
GeM pooling (p = 4) of the patch tokens (1536 dims for ViT-B). Descriptors can be whitened with a
transform learned on a separate image set, then are L2-normalised and compared by cosine
similarity. :class:`DescriptorEmbedder` embeds image lists with one model and keeps the descriptors
in a fingerprinted cache (:mod:`dinokit.eval.cache`); copy detection, near-duplicate search and
retrieval share it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision import transforms as T

from ..data.images import ImageDataset, decode_name, find_images
from ..data.normalization import IMAGENET, Normalization
from ..data.transforms import describe_transform, normalize
from ..errors import DataError
from ..models.inference import inference_model
from ..models.registry import is_vit
from ..progress import NULL_PROGRESS, Progress
from .cache import CachedTensors, files_key
from .features import extract_features, feature_fingerprint
from .metrics import require_finite

if TYPE_CHECKING:
    from torchvision.models import ResNet

log = logging.getLogger("dinokit")

GEM_P = 4.0
GEM_EPS = 1e-6
WHITENING_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Descriptor
# ---------------------------------------------------------------------------------------------
def gem(tokens: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling over the token axis: (mean_n clamp(x_n, eps)^p)^(1/p).

    ``tokens`` is (B, N, D); returns (B, D). Computed in float32 (x^4 of bf16 activations loses
    too much).
    """
    x = tokens.float().clamp(min=eps)
    return x.pow(p).mean(dim=1).pow(1.0 / p)


def _resnet_feature_map(model: ResNet, images: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return x.flatten(2).transpose(1, 2)  # (B, h*w, 2048)


def copy_descriptor(model: nn.Module, images: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """The copy-detection descriptor of a batch: CLS ++ GeM_p(patch tokens) of the last block after
    the final norm, (B, 2 * D). A ResNet gives its average pool ++ GeM_p of the last feature map."""
    if is_vit(model):
        tokens = model.forward_features(images)
        cls = tokens[:, 0].float()
        return torch.cat((cls, gem(tokens[:, 1:], p)), dim=1)
    fmap = _resnet_feature_map(model, images)
    return torch.cat((fmap.float().mean(dim=1), gem(fmap, p)), dim=1)


def copy_feature_fn(p: float = GEM_P) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A ``feature_fn`` for :func:`dinokit.eval.features.extract_features`."""

    def fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return copy_descriptor(model, images, p)

    return fn


def copy_transform(image_size: int = 320, norm: Normalization = IMAGENET):
    """Resize to a square (aspect ignored; torchvision Resize on the PIL image, bicubic), then
    normalise with ``norm`` (the weights' own; ImageNet's in the reference): its Copydays transform."""
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            normalize(norm),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------
@dataclass
class Whitening:
    """A learned whitening: ``x -> normalise(P (x - mean))`` with ``P = diag(eig^-1/2) V^T``.

    ``eigenvalues`` are sorted in decreasing order (after clamping) and ``projection`` rows follow
    that order.
    """

    mean: torch.Tensor
    projection: torch.Tensor
    eigenvalues: torch.Tensor
    n_clamped: int = 0

    def apply(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        y = (x.double() - self.mean.double()) @ self.projection.double().T
        y = y.float()
        return nn.functional.normalize(y, dim=1, p=2) if normalize else y

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "projection": self.projection,
            "eigenvalues": self.eigenvalues,
            "n_clamped": self.n_clamped,
        }


def learn_whitening(features: torch.Tensor, eps: float = WHITENING_EPS, power: float = 0.5) -> Whitening:
    """Learn the reference's whitening from ``features`` (n, D) (paper Sec. 4.2.1, following Multigrain).

    The mean of the whitening set is what gets subtracted later, but — as in the reference — the
    eigen-decomposition is of the UNcentred second-moment matrix F^T F / n (here in float64; the
    reference works in float32). Eigenvalues below
    ``max * eps`` are raised to that floor; the projection is ``diag(eig^-power) V^T`` with the
    eigenvectors in decreasing order of eigenvalue.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise DataError("The whitening set gave no descriptors to learn from.")
    f = features.double()
    n, d = f.shape
    if n < d:
        log.warning(
            "the whitening set has %d images, fewer than the %d descriptor dimensions; "
            "small eigenvalues are clamped",
            n,
            d,
        )
    mean = f.mean(dim=0)
    second_moment = f.T @ f / n
    eig, vecs = torch.linalg.eigh(second_moment)
    floor = eig.max() * eps
    n_clamped = int((eig < floor).sum())
    eig = torch.where(eig < floor, floor, eig)
    order = torch.argsort(eig, descending=True)
    eig, vecs = eig[order], vecs[:, order]
    projection = torch.diag(eig.pow(-power)) @ vecs.T
    return Whitening(mean.float(), projection.float(), eig.float(), n_clamped)


def normalize_descriptors(x: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Whiten (when given) and L2-normalise rows."""
    if whitening is not None:
        return whitening.apply(x)
    return nn.functional.normalize(x.float(), dim=1, p=2)


def find_folder_images(folder: str | os.PathLike, what: str, allow_file: bool = False) -> list[Path]:
    """The images of a folder given as an option (``what`` names it in errors: "whitening folder");
    with ``allow_file`` a single image file stands for a folder of one."""
    folder = Path(folder).expanduser()
    if not (folder.exists() if allow_file else folder.is_dir()):
        raise DataError(f"The {what} {folder} does not exist.")
    paths = find_images(folder)
    if not paths:
        raise DataError(f"The {what} {folder} holds no images.")
    return paths


# ---------------------------------------------------------------------------------------------
# Embedding with a cache in the run folder
# ---------------------------------------------------------------------------------------------
@dataclass
class Embedded:
    features: torch.Tensor  # (N, D); zero rows where unreadable
    kept: torch.Tensor  # (N,) bool
    reused: bool = False

    def __post_init__(self) -> None:  # every descriptor set (copy detection, retrieval) passes here
        require_finite(self.features, "The image descriptors")

    @property
    def n_unreadable(self) -> int:
        return int((~self.kept).sum())


class DescriptorEmbedder:
    """Embeds image lists with one model and transform; caches each list in ``cache_dir`` keyed by a
    fingerprint of the weights, architecture, transform, descriptor, precision and file list."""

    def __init__(
        self,
        model: nn.Module,
        weights: str | None,
        transform: Any,
        feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        descriptor: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: Path | None = None,
        checkpoint_key: str = "teacher",
        seed: int | None = None,
        progress: Progress = NULL_PROGRESS,
        strict: bool = False,
        exact_decode: bool = False,
    ):
        self.strict = strict  #: stop at the first unreadable image instead of skipping it
        self.exact_decode = exact_decode  #: every JPEG in full, not at the reduced scale the transform allows
        self.transform = transform
        self.feature_fn = feature_fn
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.progress = progress
        fp = feature_fingerprint(
            model, weights, transform, checkpoint_key=checkpoint_key, seed=seed, dtype=dtype
        )
        fp.pop("n_last_blocks", None)
        fp.pop("avgpool_patch_tokens", None)
        fp["descriptor"] = descriptor
        fp["transform"] = describe_transform(transform)
        fp["decode"] = decode_name(exact_decode)
        self.fingerprint = fp
        # bf16: cast one copy here (after the fingerprint, which hashes the fp32 weights), not per call
        self.model, _ = inference_model(model.to(device).eval(), dtype)

    def embed(
        self,
        paths: Sequence[Path],
        name: str,
        description: str | None = None,
        dataset: torch.utils.data.Dataset | None = None,
        extra_key: str = "",
    ) -> Embedded:
        """Descriptors of ``paths`` (from the cache when its key matches). ``dataset`` replaces the
        default one (the images through the transform); ``extra_key`` names what else it depends on."""
        # the file list's key joins the descriptor's fingerprint: a changed image is embedded again
        fingerprint = {**self.fingerprint, "files": files_key(self.fingerprint, paths, extra_key)}
        cache = None
        if self.cache_dir is not None:
            cache = CachedTensors(self.cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.pt")
            cached = cache.load(fingerprint)
            if cached is not None:
                self.progress.log(
                    f"reusing cached descriptors of {name} ({len(paths)} image{'s' if len(paths) != 1 else ''})"
                )
                return Embedded(cached["features"].float(), cached["kept"].bool(), reused=True)
        if dataset is None:
            dataset = ImageDataset(
                list(paths), transform=self.transform, strict=self.strict, exact_decode=self.exact_decode
            )
        feats, kept = extract_features(
            self.model,
            dataset,
            self.batch_size,
            self.num_workers,
            self.device,
            self.dtype,
            self.feature_fn,
            self.progress,
            description=description or f"embedding {name}",
        )
        if cache is not None:
            cache.save({"fingerprint": fingerprint, "features": feats.contiguous(), "kept": kept})
        return Embedded(feats, kept)


def whitening_from(embedded: Embedded, folder: str | os.PathLike) -> Whitening:
    """The whitening learned on the readable descriptors of the whitening folder."""
    if not bool(embedded.kept.any()):
        raise DataError(f"None of the images in the whitening folder {folder} could be read.")
    return learn_whitening(embedded.features[embedded.kept])
