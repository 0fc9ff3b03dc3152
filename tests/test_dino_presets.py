"""The DINOv2 and DINOv3 presets: official addresses through torch.hub's cache and the offline rule,
and the sentence of a gated DINOv3 preset that is not in the cache."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
import torch

import dinokit
from dinokit.checkpoints import load_backbone
from dinokit.errors import CheckpointError


def _cache() -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"


def _no_network(monkeypatch):
    tried = []

    def urlopen(url, *args, **kwargs):
        tried.append(url)
        raise OSError("network")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


@pytest.mark.parametrize(
    "name,url",
    [
        ("dinov2_vits14", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"),
        (
            "dinov2_vitg14_reg",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
        ),
        (
            "dinov2_vitb14_reg4_pretrain",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
        ),
    ],
)
def test_dinov2_presets_name_the_official_address_offline(monkeypatch, name, url):
    tried = _no_network(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        load_backbone(name)
    msg = str(e.value)
    assert tried == [] and url in msg and str(_cache() / url.rsplit("/", 1)[1]) in msg and "\n" not in msg


def test_a_cached_dinov2_hub_file_is_the_preset(monkeypatch):
    _no_network(monkeypatch)
    torch.manual_seed(3)
    small = dinokit.build_backbone("dinov2_vits14_reg", depth=1)  # the hub file's shape, one block
    sd = {**small.state_dict(), "mask_token": torch.zeros(1, 384)}
    _cache().mkdir(parents=True)
    torch.save(sd, _cache() / "dinov2_vits14_reg4_pretrain.pth")
    m = load_backbone("dinov2_vits14_reg")
    assert m.arch == "dinov2_vits14_reg" and m.weights_source == "dinov2_vits14_reg" and len(m.blocks) == 1
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), small.eval().forward_features(x))
    with pytest.raises(
        CheckpointError, match="is dinov2_vits14_reg with patch size 14, but --arch vit_small"
    ):
        load_backbone("dinov2_vits14_reg", arch="vit_small")


def test_a_dinov3_preset_not_in_the_cache_says_where_to_request_it_even_online(monkeypatch):
    monkeypatch.setenv("DINOKIT_OFFLINE", "0")
    tried = _no_network(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        load_backbone("dinov3_vits16")
    msg = str(e.value)
    assert tried == []  # gated files are never downloaded
    assert "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in msg
    assert "facebook/dinov3-vits16-pretrain-lvd1689m" in msg
    assert str(_cache() / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth") in msg
    assert "\n" not in msg and msg.count(". ") == 0


def test_a_dinov3_release_file_in_the_cache_is_the_preset(monkeypatch):
    torch.manual_seed(4)
    small = dinokit.build_backbone("dinov3_vits16plus", depth=1)
    sd = {k.replace("register_tokens", "storage_tokens"): v for k, v in small.state_dict().items()}
    _cache().mkdir(parents=True)
    torch.save(sd, _cache() / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    m = load_backbone("dinov3_vits16plus")
    assert m.arch == "dinov3_vits16plus" and type(m.blocks[0].mlp).__name__ == "SwiGLU"


def test_dinov2_released_linear_heads_are_presets_of_the_four_layer_input(monkeypatch):
    from dinokit.checkpoints import load_linear_head
    from dinokit.eval.linear import default_feature_options

    tried = _no_network(monkeypatch)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_linear4_head.pth"
    with pytest.raises(CheckpointError, match="DINOKIT_OFFLINE") as e:
        load_linear_head("dinov2_vitb14_reg")
    assert url in str(e.value) and tried == []
    # the hub's head is a plain Linear((1 + 4) * dim, 1000) state dict, fed 4 CLS tokens + the average
    _cache().mkdir(parents=True)
    torch.save(
        {"weight": torch.zeros(1000, 5 * 768), "bias": torch.zeros(1000)}, _cache() / url.rsplit("/", 1)[1]
    )
    head = load_linear_head("dinov2_vitb14_reg")
    assert head["linear.weight"].shape == (1000, 5 * 768) and default_feature_options(
        "dinov2_vitb14_reg"
    ) == (4, True)
