"""The one image reader: EXIF orientation, and JPEGs decoded at the reduced DCT scale that still
covers what the transform needs, never less. The independent references are Pillow's own
``ImageOps.exif_transpose`` and full-size decode, and torchvision's random resized crop drawn on the
reduced picture."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from dinokit.data.images import (
    EXIF_ORIENTATION,
    DecodeNeed,
    ImageDataset,
    jpeg_reduction,
    read_image,
    upright_size,
)
from dinokit.data.masks import read_label_mask
from dinokit.data.multicrop import MultiCropAugmentation
from dinokit.data.transforms import decode_need, eval_transform
from dinokit.eval.descriptors import copy_transform


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with detail at every scale (a JPEG of noise would say little about scaling)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([128 + 100 * np.sin(x / (9 + 7 * c) + y / (13 + 5 * c) + c) for c in range(3)], axis=-1)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_jpeg(img: Image.Image, path, orientation: int = 1, **kw):
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    img.save(path, "JPEG", quality=92, exif=exif.tobytes(), **kw)
    return path


# -- EXIF orientation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_as_pillow_does(tmp_path, orientation):
    path = save_jpeg(photo(64, 40), tmp_path / "o.jpg", orientation)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im.convert("RGB")))
    got = read_image(path)
    assert got.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got.image), expected)
    assert got.full_size == (got.image.width, got.image.height)
    assert got.full_size == ((40, 64) if orientation >= 5 else (64, 40))


def test_exif_orientation_of_a_png_is_applied_too(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8
    img = photo(30, 20)
    img.save(tmp_path / "o.png", exif=exif.tobytes())
    got = read_image(tmp_path / "o.png").image
    np.testing.assert_array_equal(np.asarray(got), np.asarray(img.transpose(Image.Transpose.ROTATE_90)))


def test_masks_are_read_as_stored_without_exif_orientation(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:20] = 1
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(labels, "L").save(tmp_path / "m.png", exif=exif.tobytes())
    np.testing.assert_array_equal(read_label_mask(tmp_path / "m.png"), labels)


def test_a_broken_orientation_value_reads_as_stored(tmp_path):
    path = save_jpeg(photo(32, 24), tmp_path / "b.jpg", 9)  # not an EXIF orientation
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(read_image(path).image), np.asarray(im.convert("RGB")))


# -- the decode need of the transforms ----------------------------------------------------------------
def test_decode_need_of_the_transforms():
    assert decode_need(eval_transform(256, 224)) == DecodeNeed(short_side=256)
    assert decode_need(copy_transform(320)) == DecodeNeed(width=320, height=320)
    assert decode_need(T.Compose([T.Resize((100, 200)), T.ToTensor()])) == DecodeNeed(width=200, height=100)
    # a crop of the full picture, a size cap or an unknown first step: the full picture
    assert decode_need(T.Compose([T.CenterCrop(224), T.ToTensor()])) is None
    assert decode_need(T.Compose([T.Resize(256, max_size=300), T.ToTensor()])) is None
    assert decode_need(T.Compose([T.Lambda(lambda x: x), T.Resize(256)])) is None
    assert decode_need(T.Compose([T.ToTensor()])) is None
    # value-only steps before the resize are passed over
    assert decode_need(T.Compose([T.ColorJitter(0.4), T.Resize(64)])) == DecodeNeed(short_side=64)
    need = MultiCropAugmentation(global_size=224, local_size=96).decode_need()
    assert need.crops == ((96, 0.05, 0.75), (224, 0.4, 0.75))


# -- reduced decoding: never below the need -------------------------------------------------------------
@pytest.mark.parametrize(
    ("short", "reduction"),
    [(375, 1), (510, 1), (511, 2), (512, 2), (1020, 2), (1021, 4), (1024, 4), (2048, 8), (3024, 8)],
)
def test_reduction_at_the_boundaries_of_a_256_resize(short, reduction):
    """ceil(short / r) >= 256: exactly 2x reduces by 2, just under it (510 -> 255) does not."""
    need = DecodeNeed(short_side=256)
    assert jpeg_reduction((short * 4 // 3, short), 1, need) == reduction
    assert jpeg_reduction((short, short * 4 // 3), 1, need) == reduction


@pytest.mark.parametrize(("short", "reduction"), [(510, 1), (512, 2)])
def test_reduced_decode_at_the_boundary_gives_what_was_computed(tmp_path, short, reduction):
    width = short * 4 // 3
    path = save_jpeg(photo(width, short), tmp_path / "b.jpg")
    got = read_image(path, DecodeNeed(short_side=256))
    assert got.reduction == reduction
    assert got.image.size == (-(-width // reduction), -(-short // reduction))
    assert min(got.image.size) >= 256
    assert got.full_size == (width, short)


def test_the_need_is_computed_on_the_upright_picture(tmp_path):
    """A phone portrait: stored 1024x600, EXIF 6, upright 600x1024. A need of a wide box (500x300)
    must not be met by halving (upright 300x512), though the stored pixels halved (512x300) would."""
    path = save_jpeg(photo(1024, 600), tmp_path / "p.jpg", 6)
    wide = DecodeNeed(width=500, height=300)
    got = read_image(path, wide)
    assert got.reduction == 1 and got.image.size == (600, 1024)
    tall = DecodeNeed(width=300, height=500)  # met by the upright picture halved: 300x512
    got = read_image(path, tall)
    assert got.reduction == 2 and got.image.size == (300, 512)
    assert upright_size((512, 300), 6) == (300, 512)


def test_random_sizes_and_needs_never_decode_below_the_need_and_reduce_as_far_as_they_may():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        w, h = (int(v) for v in rng.integers(16, 5000, 2))
        orientation = int(rng.integers(1, 9))
        kind = int(rng.integers(0, 4))
        n = int(rng.integers(8, 600))
        need = [
            DecodeNeed(short_side=n),
            DecodeNeed(width=n, height=int(rng.integers(8, 600))),
            DecodeNeed(long_side=n),
            DecodeNeed(crops=((n // 4 + 1, 0.05, 0.75),)),
        ][kind]
        r = jpeg_reduction((w, h), orientation, need)
        reduced = upright_size((-(-w // r), -(-h // r)), orientation)
        if r > 1:
            assert need.met_by(*reduced)
        if r < 8:  # the next reduction would have been too small
            nxt = 2 * r
            assert not need.met_by(*upright_size((-(-w // nxt), -(-h // nxt)), orientation))


def test_the_smallest_random_resized_crop_of_a_reduced_picture_still_covers_its_size():
    aug = MultiCropAugmentation(global_size=224, local_size=96)
    need = aug.decode_need()
    size = (4032, 3024)
    r = jpeg_reduction(size, 1, need)
    assert r == 4
    reduced = Image.new("RGB", (-(-size[0] // r), -(-size[1] // r)))
    torch.manual_seed(0)
    for t, out in ((aug.global_transfo1.transforms[0], 224), (aug.local_transfo.transforms[0], 96)):
        smallest = min(
            min(T.RandomResizedCrop.get_params(reduced, t.scale, t.ratio)[2:]) for _ in range(3000)
        )
        assert smallest >= out


@pytest.mark.parametrize("kind", ["baseline", "progressive", "cmyk"])
def test_reduced_decode_of_progressive_and_cmyk_jpegs_is_the_full_picture_scaled(tmp_path, kind):
    img = photo(1600, 1200)
    path = tmp_path / f"{kind}.jpg"
    if kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=95)
    else:
        img.save(path, "JPEG", quality=95, progressive=kind == "progressive")
    full = read_image(path).image
    got = read_image(path, DecodeNeed(short_side=256))
    assert got.reduction == 4 and got.image.size == (400, 300) and got.image.mode == "RGB"
    # the same picture: the full decode shrunk by area averaging agrees within a few grey levels
    ref = np.asarray(full.reduce(4), np.float64)
    diff = np.abs(np.asarray(got.image, np.float64) - ref)
    assert diff.mean() < 3.0, diff.mean()


def test_pngs_and_small_jpegs_are_decoded_in_full_whatever_the_need(tmp_path):
    img = photo(1600, 1200)
    img.save(tmp_path / "big.png")
    got = read_image(tmp_path / "big.png", DecodeNeed(short_side=64))
    assert got.reduction == 1
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(img))
    save_jpeg(photo(500, 375), tmp_path / "small.jpg")
    with Image.open(tmp_path / "small.jpg") as im:
        np.testing.assert_array_equal(
            np.asarray(read_image(tmp_path / "small.jpg", DecodeNeed(short_side=256)).image),
            np.asarray(im.convert("RGB")),
        )


def test_imagenet_size_images_give_identical_tensors_with_and_without_reduced_decode(tmp_path):
    """The paper's protocols on ImageNet-size files: the evaluation transform sees the same pixels."""
    paths = [
        save_jpeg(photo(w, h, seed=i), tmp_path / f"{i}.jpg", o)
        for i, (w, h, o) in enumerate([(500, 375, 1), (375, 500, 1), (500, 333, 6), (510, 400, 1)])
    ]
    t = eval_transform()
    reduced = ImageDataset(paths, transform=t)
    exact = ImageDataset(paths, transform=t, exact_decode=True)
    for i in range(len(paths)):
        torch.testing.assert_close(reduced[i][0], exact[i][0], rtol=0, atol=0)


def test_phone_size_jpegs_through_the_eval_transform_stay_close_to_the_full_decode(tmp_path):
    path = save_jpeg(photo(4032, 3024), tmp_path / "phone.jpg", 6)
    t = eval_transform()
    x_red = ImageDataset([path], transform=t)[0][0]
    x_full = ImageDataset([path], transform=t, exact_decode=True)[0][0]
    assert x_red.shape == x_full.shape == (3, 224, 224)
    grey = (x_red - x_full).abs() * 0.226 * 255  # back to grey levels
    assert float(grey.mean()) < 2.5, float(grey.mean())  # 1.6 on this noisy picture at 1/8


def test_every_orientation_and_size_pair_covers_the_box_it_was_asked_for(tmp_path):
    for (w, h), o in itertools.product([(900, 500), (500, 900)], [1, 6]):
        path = save_jpeg(photo(w, h), tmp_path / f"{w}x{h}-{o}.jpg", o)
        got = read_image(path, DecodeNeed(width=200, height=300))
        assert got.image.width >= 200 and got.image.height >= 300
