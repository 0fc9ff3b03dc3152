"""Shared fixtures: tiny images and tiny models, so the whole suite runs on a CPU in minutes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dinokit.eval.features import save_features
from tests.helpers import feature_clusters, make_copydays, make_image, save_tiny_vit

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("DINOKIT_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_hub_cache(tmp_path_factory, monkeypatch):
    """Presets never touch the user's torch.hub cache during tests, nor searches the user's descriptor
    stores: each test has its own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("DINOKIT_CACHE_DIR", str(tmp_path_factory.mktemp("dinokit_cache")))
    monkeypatch.setenv("DINOKIT_OFFLINE", "1")


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """ROOT/{train,val}/<class>/<img>.png with 3 classes of coloured squares on noise."""
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2)):
        for ci, (name, color) in enumerate(colors.items()):
            for i in range(n):
                make_image(
                    root / split / name / f"{i}.png",
                    seed=ci * 100 + i + (0 if split == "train" else 50),
                    color=color,
                )
    return root


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


@pytest.fixture
def copydays(tmp_path) -> Path:
    """A tiny Copydays: four groups of originals with their strong, JPEG and crop copies."""
    return make_copydays(tmp_path / "copydays")


@pytest.fixture
def feature_files(tmp_path):
    """Saved train (4 x 20) and val (4 x 5) features of four separable classes."""
    save_features(feature_clusters(20, 4, 16, 0), tmp_path / "train.pt")
    save_features(feature_clusters(5, 4, 16, 1), tmp_path / "val.pt")
    return tmp_path / "train.pt", tmp_path / "val.pt"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and a shared CI machine punishes oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrain_images(tmp_path_factory) -> Path:
    """32 readable images in class folders (an ImageFolder; classes are ignored) and one broken file."""
    root = tmp_path_factory.mktemp("pretrain_data")
    for i in range(32):
        make_image(root / f"class{i % 2}" / "sub" / f"{i}.png", size=(40, 36), seed=i)
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


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
