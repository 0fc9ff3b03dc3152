"""What the typed helpers read off a backbone or a data set: its feature width, whether it is a ViT,
a data set's length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinokit.data.loader import dataset_length
from dinokit.errors import ModelConfigError
from dinokit.models.init import feature_dim
from dinokit.models.registry import is_vit, variant_options
from tests.helpers import tiny_vit


def test_feature_dim_is_the_width_of_the_cls_token():
    model = tiny_vit(depth=1)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert feature_dim(model) == out.shape[-1] == 192
    assert is_vit(model) and not is_vit(nn.Linear(2, 2))


def test_feature_dim_refuses_a_module_that_is_not_a_backbone():
    with pytest.raises(ModelConfigError, match="num_features"):
        feature_dim(nn.Linear(4, 2))


def test_variant_options_read_the_feed_forward_of_both_kinds():
    mlp = tiny_vit(depth=1)
    swiglu = tiny_vit(depth=1, ffn="swiglu", ffn_hidden_dim=64, layerscale=1e-5)
    assert variant_options(mlp)["ffn"] == "mlp" and variant_options(mlp)["ffn_hidden_dim"] == 4 * 192
    assert variant_options(mlp)["layerscale"] is None
    assert variant_options(swiglu)["ffn"] == "swiglu" and variant_options(swiglu)["ffn_hidden_dim"] == 64
    assert "layerscale" not in variant_options(swiglu)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_dataset_length_of_a_sized_data_set_and_refusal_of_an_unsized_one():
    assert dataset_length(torch.utils.data.TensorDataset(torch.zeros(7, 2))) == 7
    with pytest.raises(TypeError, match="has no len"):
        dataset_length(_Stream())
