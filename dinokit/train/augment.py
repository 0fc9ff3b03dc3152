"""Fine-tuning augmentation: the DeiT-style train transform (random resized crop, flip, optional
RandAugment) and batch-level mixup / cutmix with label smoothing as soft targets. The evaluation
transform is :func:`dinokit.data.transforms.eval_transform` at ``resize_for(image_size)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from ..data.normalization import IMAGENET, Normalization
from ..data.transforms import normalize


def finetune_train_transform(
    image_size: int = 224, randaugment: int = 0, min_scale: float = 0.08, norm: Normalization = IMAGENET
) -> T.Compose:
    """RandomResizedCrop(image_size, scale=(min_scale, 1), bicubic) -> horizontal flip ->
    RandAugment(2 ops, magnitude ``randaugment``; 0 = off, DeiT uses 9) -> tensor -> normalisation
    with ``norm`` (the weights' own). All randomness comes from torch's generator."""
    ops: list = [
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if randaugment > 0:
        ops.append(
            T.RandAugment(num_ops=2, magnitude=int(randaugment), interpolation=T.InterpolationMode.BILINEAR)
        )
    ops += [T.ToTensor(), normalize(norm)]
    return T.Compose(ops)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) class indices or (B, K) probabilities -> (B, K) targets ``(1 - s) * y + s / K``."""
    y = F.one_hot(labels, num_classes).float() if labels.ndim == 1 else labels.float()
    return y * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_k -t_k log softmax(logits)_k`` (fp32)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class BatchMixer:
    """Mixup (Zhang et al. 2018) and/or CutMix (Yun et al. 2019) on a batch, then label smoothing.

    With both enabled one of the two is drawn per batch with probability 1/2 (as timm's default).
    Images are paired with the batch rolled by one (torchvision's convention). Returns the mixed
    images and (B, K) soft targets. Randomness comes from torch's global generator.
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, smoothing: float = 0.0
    ):
        from torchvision.transforms import v2

        self.num_classes = num_classes
        self.smoothing = smoothing
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    @property
    def enabled(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        op = self.mixup or self.cutmix
        if self.mixup is not None and self.cutmix is not None:
            op = self.mixup if torch.rand(1).item() < 0.5 else self.cutmix
        if op is not None and images.shape[0] > 1:
            images, labels = op(images, labels)
        return images, smooth_one_hot(labels, self.num_classes, self.smoothing)
