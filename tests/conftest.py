"""Shared fixtures: tiny images and tiny models, so the whole suite runs on a CPU in minutes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("DINOKIT_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_hub_cache(tmp_path_factory, monkeypatch):
    """Presets never touch the user's torch.hub cache during tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("DINOKIT_OFFLINE", "1")


def make_image(path: Path, size=(40, 40), seed: int = 0, color=None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    if color is not None:
        arr[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """ROOT/{train,val}/<class>/<img>.png with 3 classes of coloured squares on noise."""
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2)):
        for ci, (name, color) in enumerate(colors.items()):
            for i in range(n):
                make_image(root / split / name / f"{i}.png", seed=ci * 100 + i + (0 if split == "train" else 50), color=color)
    return root


def save_tiny_vit(path: Path, depth: int = 12) -> Path:
    """A random vit_tiny/16 (seed 0) with ``depth`` blocks, saved in the released-weights format."""
    import dinokit

    torch.manual_seed(0)
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=depth), path)
    return path


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """A saved random vit_tiny/16 backbone (released-weights format)."""
    return save_tiny_vit(tmp_path / "tiny.pth")


@pytest.fixture
def tiny2_weights(tmp_path) -> Path:
    """The same with 2 blocks: enough wherever trained weights are not the point."""
    return save_tiny_vit(tmp_path / "tiny2.pth", depth=2)


@pytest.fixture
def tiny4_weights(tmp_path) -> Path:
    """The same with 4 blocks (enough for the ViT-S probe's last 4 CLS tokens)."""
    return save_tiny_vit(tmp_path / "tiny4.pth", depth=4)


def run_cli(args):
    """Run the dinokit CLI in-process; ``.text`` is the output with rich's line wrapping undone."""
    from dinokit.commands import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())
    return r


@pytest.fixture(autouse=True)
def _dinokit_logger_propagates():
    """CLI runs in-process install a rich handler and stop propagation; give each test a clean logger
    so that caplog sees dinokit's records whatever ran before."""
    import logging

    logger = logging.getLogger("dinokit")
    yield
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
