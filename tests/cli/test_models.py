"""``dinokit models``: every architecture and preset of the tables, each preset's file and whether it is
in torch.hub's cache, and where that cache is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dinokit
from dinokit.models.registry import ARCHS
from dinokit.presets import PRESETS
from tests.helpers import run_cli, tiny_vit


def _listing() -> dict:
    r = run_cli(["models", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_models_lists_the_tables_and_the_cache(tmp_path):
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"  # the tests' own torch.hub folder
    data = _listing()
    assert [a["arch"] for a in data["architectures"]] == list(ARCHS)
    small = next(a for a in data["architectures"] if a["arch"] == "vit_small")
    assert (small["embed_dim"], small["depth"], small["num_heads"]) == (384, 12, 6)  # ViT-S of the paper
    assert [p["name"] for p in data["presets"]] == list(PRESETS)
    assert data["torch_hub_cache"] == str(cache)
    vits16 = next(p for p in data["presets"] if p["name"] == "dino_vits16")
    assert vits16["file"] == "dino_deitsmall16_pretrain.pth" and vits16["cached"] is False
    assert (
        vits16["url"]
        == "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    # a file put into the cache by hand shows as cached
    cache.mkdir(parents=True, exist_ok=True)
    dinokit.save_backbone(tiny_vit(), cache / "dino_deitsmall16_pretrain.pth")
    data = _listing()
    cached = {p["name"] for p in data["presets"] if p["cached"]}
    assert cached == {"dino_vits16"}
    r = run_cli(["models"])
    assert r.exit_code == 0, r.output
    assert f"1 of {len(PRESETS)} presets are in torch.hub's cache: {cache}" in r.text
    for name in PRESETS:
        assert name[:12] in r.output
