"""The datasets' one rule for an unreadable image: skipped (None, counted by the collate) by default,
the run stopped with a sentence naming the file under ``strict``."""

from __future__ import annotations

import pytest

from dinokit.data.images import ImageDataset, collate_skip_none, open_rgb_or_skip
from dinokit.errors import DataError
from dinokit.eval.retrieval import RetrievalImages
from tests.helpers import make_image


@pytest.fixture
def two_images(tmp_path):
    good = make_image(tmp_path / "good.png", seed=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    return [good, bad]


def test_an_unreadable_image_is_skipped_or_stops_the_run(two_images):
    good, bad = two_images
    assert open_rgb_or_skip(good).size == (40, 40)
    assert open_rgb_or_skip(bad) is None
    with pytest.raises(DataError, match="bad.png is not a readable image"):
        open_rgb_or_skip(bad, strict=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda paths, strict: ImageDataset(paths, [0, 1], transform=lambda im: im.size, strict=strict),
        lambda paths, strict: RetrievalImages(paths, 32, strict=strict),
    ],
    ids=["ImageDataset", "RetrievalImages"],
)
def test_every_dataset_skips_the_same_way(two_images, make):
    lenient = make(two_images, False)
    assert lenient[0] is not None and lenient[1] is None
    batch, skipped = collate_skip_none([lenient[0], lenient[1]])
    assert skipped == 1 and batch[2].tolist() == [0]
    with pytest.raises(DataError, match="bad.png"):
        make(two_images, True)[1]
