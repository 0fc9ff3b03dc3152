"""The DINO projection head, the linear classifier of the frozen-feature probe and the fine-tuning
wrapper (backbone + new linear head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import check_int, feature_dim, trunc_normal_init


class WeightNormLinear(nn.Module):
    """A bias-free Linear with weight normalisation, w = g * v / ||v|| (per output row).

    The parameters keep the names of the old ``torch.nn.utils.weight_norm`` (``weight_g``,
    ``weight_v``) that the released checkpoints use.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        init = nn.Linear(in_features, out_features, bias=False).weight.detach()  # torch's default init
        self.weight_v = nn.Parameter(init.clone())
        self.weight_g = nn.Parameter(init.norm(dim=1, keepdim=True).clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    #: names the newer ``torch.nn.utils.parametrizations.weight_norm`` gives the same two tensors
    PARAMETRIZATION_NAMES = (
        ("parametrizations.weight.original0", "weight_g"),
        ("parametrizations.weight.original1", "weight_v"),
    )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for new, old in self.PARAMETRIZATION_NAMES:
            if prefix + new in state_dict and prefix + old not in state_dict:
                state_dict[prefix + old] = state_dict.pop(prefix + new)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DINOHead(nn.Module):
    """MLP in_dim -> hidden -> hidden -> bottleneck, L2-normalise, weight-normalised Linear to out_dim.

    With ``norm_last_layer`` the weight-norm gain stays 1 and is not trained (paper, Sec. 3.1 and
    Appendix; keys ``mlp.{0,2,4}``, ``last_layer.weight_g``, ``last_layer.weight_v``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        in_dim = check_int("in_dim", in_dim, 1)
        out_dim = check_int("out_dim", out_dim, 1)
        nlayers = check_int("nlayers", nlayers, 1)
        hidden_dim = check_int("hidden_dim", hidden_dim, 1)
        bottleneck_dim = check_int("bottleneck_dim", bottleneck_dim, 1)
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(trunc_normal_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class LinearClassifier(nn.Module):
    """Linear layer on frozen features: weight N(0, 0.01), bias 0 (the reference's probe)."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        dim = check_int("dim", dim, 1)
        num_labels = check_int("num_labels", num_labels, 1)
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


class FinetuneModel(nn.Module):
    """Backbone -> Linear head (weights trunc-normal, std 2e-5; bias 0: the first logits are ~0), the
    network fine-tuning transfer trains whole (paper, Sec. 4.2.3)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_init_std: float = 2e-5):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of one resolution share one backbone call.

    Returns the head's output for all crops concatenated in input order, (sum of batches, out_dim).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, (list, tuple)):
            x = [x]
        sizes = torch.tensor([inp.shape[-1] for inp in x])
        idx_crops = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start = 0
        feats = []
        for end in idx_crops.tolist():
            feats.append(self.backbone(torch.cat(x[start:end])))
            start = end
        return self.head(torch.cat(feats))
