"""Ground-truth readers: VOC indexed PNGs, 8/16-bit and RGB masks, binary masks, folder pairing and
COCO annotations (polygons, uncompressed and compressed RLE) through pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dinokit.data.masks import (
    VOID,
    annotation_mask,
    coco_label_map,
    ground_truth_from_coco,
    ground_truth_from_masks,
    load_coco,
    read_image_list,
    read_label_mask,
)
from dinokit.errors import DataError
from tests.helpers import COCO_H, COCO_W, black_image, coco_file


def _labels():
    lab = np.zeros((10, 12), np.uint8)
    lab[1:4, 2:6] = 1
    lab[5:9, 6:11] = 2
    lab[0, :] = VOID
    return lab


def test_voc_indexed_png_gives_palette_indices(tmp_path):
    lab = _labels()
    im = Image.fromarray(lab, mode="P")
    pal = [0] * 768
    pal[3:6] = [128, 0, 0]
    pal[6:9] = [0, 128, 0]
    pal[765:768] = [224, 224, 192]
    im.putpalette(pal)
    im.save(tmp_path / "voc.png")
    assert Image.open(tmp_path / "voc.png").mode == "P"
    out = read_label_mask(tmp_path / "voc.png")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, lab)
    # binary: any nonzero pixel (void included) is the one object
    np.testing.assert_array_equal(
        read_label_mask(tmp_path / "voc.png", binary=True), (lab != 0).astype(np.int32)
    )


def test_grey_16bit_and_rgb_masks(tmp_path):
    lab = _labels()
    Image.fromarray(lab, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "l.png"), lab)
    big = lab.astype(np.uint16) * 300
    Image.fromarray(big).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "i16.png"), big.astype(np.int32))
    # RGB: black background, VOC's void colour, one id per other colour
    rgb = np.zeros((*lab.shape, 3), np.uint8)
    rgb[lab == 1] = (128, 0, 0)
    rgb[lab == 2] = (0, 128, 0)
    rgb[lab == VOID] = (224, 224, 192)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = read_label_mask(tmp_path / "rgb.png")
    assert (out[lab == VOID] == VOID).all() and (out[lab == 0] == 0).all()
    a, b = out[lab == 1], out[lab == 2]
    assert len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0] and {a[0], b[0]}.isdisjoint({0, VOID})
    # 0/255 binary masks saved as grey: with --binary-masks the 255 is the object, not void
    Image.fromarray(((lab == 1) * 255).astype(np.uint8)).save(tmp_path / "bin.png")
    np.testing.assert_array_equal(
        read_label_mask(tmp_path / "bin.png", binary=True), (lab == 1).astype(np.int32)
    )


def test_unreadable_mask_is_one_sentence(tmp_path):
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(DataError, match="not a readable mask"):
        read_label_mask(tmp_path / "bad.png")


def _mask(path, size=(12, 10), value=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)


def test_pairing_relative_paths_png_for_jpeg_and_synth_layout(tmp_path):
    # the layout of `dinokit synth classify`: DIR/val/<class>/<name>.png and DIR/masks/val/<class>/<name>.png
    root = tmp_path / "synth"
    for c in ("circle", "square"):
        for n in ("00000", "00001"):
            black_image(root / "val" / c / f"{n}.jpg")
            _mask(root / "masks" / "val" / c / f"{n}.png")
    items = ground_truth_from_masks(root / "val", root / "masks" / "val")
    assert [i.name for i in items] == ["circle/00000", "circle/00001", "square/00000", "square/00001"]
    assert all(i.mask == root / "masks" / "val" / i.name.split("/")[0] / f"{i.image.stem}.png" for i in items)
    assert items[0].load((12, 10)).shape == (10, 12)


def test_pairing_flat_mask_folder_voc_style(tmp_path):
    black_image(tmp_path / "JPEGImages" / "2007_000032.jpg")
    black_image(tmp_path / "JPEGImages" / "2007_000039.jpg")
    _mask(tmp_path / "SegmentationObject" / "2007_000032.png")
    _mask(tmp_path / "SegmentationObject" / "2007_000039.png")
    items = ground_truth_from_masks(tmp_path / "JPEGImages", tmp_path / "SegmentationObject")
    assert [i.mask.name for i in items] == ["2007_000032.png", "2007_000039.png"]


def test_images_without_masks_and_image_list(tmp_path):
    black_image(tmp_path / "img" / "a.jpg")
    black_image(tmp_path / "img" / "b.jpg")
    _mask(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match=r"1 of 2 images .* have no mask"):
        ground_truth_from_masks(tmp_path / "img", tmp_path / "masks")
    (tmp_path / "val.txt").write_text("a\n")
    ids = read_image_list(tmp_path / "val.txt")
    items = ground_truth_from_masks(tmp_path / "img", tmp_path / "masks", image_list=ids)
    assert [i.name for i in items] == ["a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No mask images"):
        ground_truth_from_masks(tmp_path / "img", tmp_path / "empty")


def test_mask_size_must_match_image(tmp_path):
    black_image(tmp_path / "img" / "a.png", size=(12, 10))
    _mask(tmp_path / "masks" / "a.png", size=(11, 10))
    (item,) = ground_truth_from_masks(tmp_path / "img", tmp_path / "masks")
    with pytest.raises(DataError, match="is 11x10 pixels but its image .* is 12x10"):
        item.load((12, 10))


# -- COCO ------------------------------------------------------------------------------------------
H, W = COCO_H, COCO_W


def test_coco_polygons_and_rle_equal_hand_built_masks(tmp_path):
    path, data, hand = coco_file(tmp_path)
    anns = data["annotations"]
    np.testing.assert_array_equal(annotation_mask(anns[0], H, W), hand["poly"])
    np.testing.assert_array_equal(annotation_mask(anns[1], H, W), hand["rle"])
    np.testing.assert_array_equal(annotation_mask(anns[2], H, W), hand["comp"])


def test_coco_instance_and_class_label_maps(tmp_path):
    path, data, hand = coco_file(tmp_path)
    inst = coco_label_map(data["annotations"], H, W, "instance")
    ids = {int(inst[hand[k]][0]) for k in ("poly", "rle", "comp")}
    assert len(ids) == 3 and 0 not in ids and VOID not in ids
    for k in ("poly", "rle", "comp"):
        assert len(np.unique(inst[hand[k]])) == 1
    assert (inst[hand["crowd"]] == VOID).all()  # crowd regions are void
    assert (inst[~(hand["poly"] | hand["rle"] | hand["comp"] | hand["crowd"])] == 0).all()
    cls = coco_label_map(data["annotations"], H, W, "class")
    # the two category-3 instances merge into one object
    assert len(np.unique(cls[hand["poly"] | hand["rle"]])) == 1
    assert cls[hand["poly"]][0] != cls[hand["comp"]][0]
    assert set(np.unique(cls)) == {0, int(cls[hand["poly"]][0]), int(cls[hand["comp"]][0]), VOID}


def test_coco_ground_truth_and_bad_files(tmp_path):
    path, _, hand = coco_file(tmp_path)
    (item,) = ground_truth_from_coco(tmp_path / "images", path)
    assert item.name == "a" and item.load((W, H)).shape == (H, W)
    with pytest.raises(DataError, match="a size of 18x20 pixels, but it is"):
        item.load((W + 1, H))
    black_image(tmp_path / "images" / "extra.jpg")
    with pytest.raises(DataError, match="1 images under .* have no entry"):
        ground_truth_from_coco(tmp_path / "images", path)
    not_coco = tmp_path / "list.json"
    not_coco.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="is not a COCO annotation file"):
        load_coco(not_coco)
    no_ann = tmp_path / "cats.json"
    no_ann.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match="is not a COCO annotation file"):
        load_coco(no_ann)
    text = tmp_path / "notes.json"
    text.write_text("hello")
    with pytest.raises(DataError, match="not JSON"):
        load_coco(text)
    with pytest.raises(DataError, match="does not exist"):
        load_coco(tmp_path / "missing.json")
