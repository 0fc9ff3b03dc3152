"""DINO's multi-crop augmentation (paper Sec. 3.1 and Appendix), its data set and its collate function,
held against numbers worked out here: crop counts and sizes, the crop-area ranges, the seed of each
image, the substitution of unreadable images and the stacking of a batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dinokit.data.images import open_rgb
from dinokit.data.multicrop import (
    GaussianBlur,
    MultiCropAugmentation,
    MultiCropDataset,
    Solarization,
    collate_multicrop,
    sample_seed,
)
from dinokit.errors import DataError

GLOBAL, LOCAL = (0.4, 1.0), (0.05, 0.4)
W, H = 200, 160  # the test picture; area 32,000 pixels


def small_aug(local_crops: int = 3) -> MultiCropAugmentation:
    return MultiCropAugmentation(GLOBAL, LOCAL, local_crops_number=local_crops, global_size=32, local_size=16)


@pytest.fixture()
def picture(tmp_path):
    def make(name: str = "a.png", seed: int = 0):
        rng = np.random.default_rng(seed)
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        return path

    return make


@pytest.fixture()
def unreadable(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a JPEG")
    return path


def same_crops(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- the augmentation ----------------------------------------------------------------------------------
def test_two_global_and_n_local_crops_of_the_configured_sizes(picture):
    aug = small_aug(local_crops=3)
    assert aug.ncrops == 5
    crops = aug(open_rgb(picture()))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    assert len(small_aug(local_crops=0)(open_rgb(picture()))) == 2


def test_each_branch_has_the_papers_crop_blur_and_solarization_settings():
    aug = small_aug()
    steps = {
        name: getattr(aug, name).transforms
        for name in ("global_transfo1", "global_transfo2", "local_transfo")
    }
    for name, size, scale in (("global_transfo1", 32, GLOBAL), ("global_transfo2", 32, GLOBAL),
                              ("local_transfo", 16, LOCAL)):  # fmt: skip
        crop = steps[name][0]
        assert isinstance(crop, T.RandomResizedCrop)
        assert crop.size == (size, size) and crop.scale == scale
        assert crop.interpolation == T.InterpolationMode.BICUBIC
    blur = {name: [t.prob for t in s if isinstance(t, GaussianBlur)] for name, s in steps.items()}
    assert blur == {"global_transfo1": [1.0], "global_transfo2": [0.1], "local_transfo": [0.5]}
    solarize = {name: [t.p for t in s if isinstance(t, Solarization)] for name, s in steps.items()}
    assert solarize == {"global_transfo1": [], "global_transfo2": [0.2], "local_transfo": []}
    norm = steps["local_transfo"][-1].transforms[-1]
    assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)


def test_crop_areas_stay_within_the_configured_scales(picture, monkeypatch):
    """Each crop's area over the image's is in the global or local scale range (up to the rounding of
    the crop's sides to pixels), globals first: 2 + 3 crops an image, in that order."""
    drawn = []
    get_params = T.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        i, j, h, w = get_params(img, scale, ratio)
        drawn.append((tuple(scale), h, w))
        return i, j, h, w

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    aug = small_aug(local_crops=3)
    img = open_rgb(picture())
    torch.manual_seed(0)
    for _ in range(20):
        aug(img)
    assert len(drawn) == 20 * 5
    assert [s for s, _, _ in drawn[:5]] == [GLOBAL, GLOBAL, LOCAL, LOCAL, LOCAL]
    fractions = {GLOBAL: [], LOCAL: []}
    for scale, h, w in drawn:
        slack = h + w  # a side rounded by half a pixel moves the area by up to (h + w) / 2
        assert scale[0] * W * H - slack <= h * w <= scale[1] * W * H + slack, (scale, h, w)
        fractions[scale].append(h * w / (W * H))
    # locals are small (at most 0.4 of the image), globals large (at least 0.4): the two ranges meet
    assert max(fractions[LOCAL]) < 0.42 and min(fractions[GLOBAL]) > 0.38
    assert min(fractions[LOCAL]) < 0.2 < 0.7 < max(fractions[GLOBAL])  # the draws spread over the ranges


# -- seeds and determinism -----------------------------------------------------------------------------
def test_sample_seed_mixes_seed_epoch_and_index():
    # 1 * 1,000,003 + 2 * 10,000,019 + 3 * 2,654,435,761 = 7,984,307,324
    assert sample_seed(1, 2, 3) == 7_984_307_324
    assert sample_seed(0, 0, 0) == 0
    assert sample_seed(0, 0, 2**40) == (2**40 * 2_654_435_761) % (2**63 - 1)


def test_an_item_is_the_augmentation_under_its_sample_seed(picture):
    """Item i of epoch e is the augmentation run with torch's CPU generator and Python's random both
    seeded by sample_seed(seed, e, i)."""
    path = picture()
    aug = small_aug()
    ds = MultiCropDataset([path, path], aug, seed=5)
    ds.set_epoch(2)
    s = sample_seed(5, 2, 1)
    torch.manual_seed(s)
    random.seed(s)
    expected = aug(open_rgb(path))
    crops, skipped = ds[1]
    assert skipped == () and same_crops(crops, expected)


def test_crops_are_deterministic_and_leave_the_global_random_state_alone(picture):
    path = picture()
    ds = MultiCropDataset([path], small_aug(), seed=5)
    torch.manual_seed(123)
    random.seed(9)
    torch_before, py_before = torch.get_rng_state(), random.getstate()
    first, _ = ds[0]
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == py_before
    torch.manual_seed(7)  # another global state gives the same crops
    random.seed(7)
    assert same_crops(ds[0][0], first)
    assert same_crops(MultiCropDataset([path], small_aug(), seed=5)[0][0], first)
    assert not same_crops(MultiCropDataset([path], small_aug(), seed=6)[0][0], first)
    ds.set_epoch(1)
    assert not same_crops(ds[0][0], first)
    ds.set_epoch(0)
    assert same_crops(ds[0][0], first)


# -- unreadable images -----------------------------------------------------------------------------------
def test_the_next_readable_image_takes_an_unreadable_ones_place(picture, unreadable):
    a, c = picture("a.png", seed=1), picture("c.png", seed=2)
    ds = MultiCropDataset([a, unreadable, c], small_aug(), seed=3)
    crops, skipped = ds[1]
    assert skipped == (1,)  # the indices of the files skipped
    # image c under item 1's seed: what a list holding c at position 1 gives
    assert same_crops(crops, MultiCropDataset([a, c, c], small_aug(), seed=3)[1][0])
    assert ds[0][1] == () and ds[2][1] == ()
    # the search wraps around the end of the list: item 2 skips itself and takes image a (index 0)
    crops, skipped = MultiCropDataset([a, unreadable, unreadable], small_aug(), seed=3)[2]
    assert skipped == (2,) and same_crops(crops, MultiCropDataset([a, a, a], small_aug(), seed=3)[2][0])
    # item 1 skips indices 1 and 2 before it reaches a
    crops, skipped = MultiCropDataset([a, unreadable, unreadable], small_aug(), seed=3)[1]
    assert skipped == (1, 2) and same_crops(crops, MultiCropDataset([a, a, a], small_aug(), seed=3)[1][0])


def test_an_item_without_any_readable_image_reports_the_skips(unreadable):
    assert MultiCropDataset([unreadable] * 3, small_aug())[1] == (None, (1, 2, 0))
    assert MultiCropDataset([unreadable] * 70, small_aug())[0] == (
        None,
        tuple(range(64)),
    )  # the search stops at 64
    with pytest.raises(DataError, match="no images"):
        MultiCropDataset([], small_aug())


# -- collate ---------------------------------------------------------------------------------------------
def test_collate_stacks_each_crop_position_and_sums_the_skips():
    def item(value: float):
        return [
            torch.full((3, 4, 4), value),
            torch.full((3, 4, 4), value + 0.5),
            torch.full((3, 2, 2), value + 0.25),
        ]

    batch, skipped = collate_multicrop([(item(1.0), ()), (None, (4, 5)), (item(2.0), (6,))])
    assert skipped == (4, 5, 6)
    assert [tuple(b.shape) for b in batch] == [(2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 2, 2)]
    assert [b[:, 0, 0, 0].tolist() for b in batch] == [[1.0, 2.0], [1.5, 2.5], [1.25, 2.25]]
    assert collate_multicrop([(None, (1,)), (None, (2, 3, 4, 5))]) == (None, (1, 2, 3, 4, 5))


def test_a_loader_batch_holds_crops_in_the_augmentations_order(picture, unreadable):
    a, c = picture("a.png", seed=1), picture("c.png", seed=2)
    ds = MultiCropDataset([a, unreadable, c], small_aug(local_crops=2), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_multicrop)
    ((batch, skipped),) = list(loader)
    assert skipped == (1,)
    assert [tuple(b.shape) for b in batch] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    for i in range(3):
        assert same_crops([b[i] for b in batch], ds[i][0])
