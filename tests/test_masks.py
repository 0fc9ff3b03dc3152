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
    np.testing.assert_array_equal(read_label_mask(tmp_path / "voc.png", binary=True), (lab != 0).astype(np.int32))


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
    np.testing.assert_array_equal(read_label_mask(tmp_path / "bin.png", binary=True), (lab == 1).astype(np.int32))


def test_unreadable_mask_is_one_sentence(tmp_path):
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(DataError, match="not a readable mask"):
        read_label_mask(tmp_path / "bad.png")


def _img(path, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def _mask(path, size=(12, 10), value=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)


def test_pairing_relative_paths_png_for_jpeg_and_synth_layout(tmp_path):
    # the layout of `dinokit synth classify`: DIR/val/<class>/<name>.png and DIR/masks/val/<class>/<name>.png
    root = tmp_path / "synth"
    for c in ("circle", "square"):
        for n in ("00000", "00001"):
            _img(root / "val" / c / f"{n}.jpg")
            _mask(root / "masks" / "val" / c / f"{n}.png")
    items = ground_truth_from_masks(root / "val", root / "masks" / "val")
    assert [i.name for i in items] == ["circle/00000", "circle/00001", "square/00000", "square/00001"]
    assert all(i.mask == root / "masks" / "val" / i.name.split("/")[0] / f"{i.image.stem}.png" for i in items)
    assert items[0].load((12, 10)).shape == (10, 12)


def test_pairing_flat_mask_folder_voc_style(tmp_path):
    _img(tmp_path / "JPEGImages" / "2007_000032.jpg")
    _img(tmp_path / "JPEGImages" / "2007_000039.jpg")
    _mask(tmp_path / "SegmentationObject" / "2007_000032.png")
    _mask(tmp_path / "SegmentationObject" / "2007_000039.png")
    items = ground_truth_from_masks(tmp_path / "JPEGImages", tmp_path / "SegmentationObject")
    assert [i.mask.name for i in items] == ["2007_000032.png", "2007_000039.png"]


def test_images_without_masks_and_image_list(tmp_path):
    _img(tmp_path / "img" / "a.jpg")
    _img(tmp_path / "img" / "b.jpg")
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
    _img(tmp_path / "img" / "a.png", size=(12, 10))
    _mask(tmp_path / "masks" / "a.png", size=(11, 10))
    (item,) = ground_truth_from_masks(tmp_path / "img", tmp_path / "masks")
    with pytest.raises(DataError, match="is 11x10 pixels but its image .* is 12x10"):
        item.load((12, 10))


# -- COCO ------------------------------------------------------------------------------------------
H, W = 20, 18


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE written out by hand: run lengths of the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def _coco_file(tmp_path):
    from pycocotools import mask as mask_utils

    poly = np.zeros((H, W), bool)
    poly[3:9, 2:7] = True  # the polygon below covers x in [2, 7), y in [3, 9)
    rle_m = np.zeros((H, W), bool)
    rle_m[0:2, 0:10] = True
    rle_m[9:12, 6:9] = True
    comp_m = np.zeros((H, W), bool)
    comp_m[10:12, 0:3] = True
    crowd_m = np.zeros((H, W), bool)
    crowd_m[5:7, 8:10] = True
    comp = mask_utils.encode(np.asfortranarray(comp_m.astype(np.uint8)))
    comp["counts"] = comp["counts"].decode("ascii")
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": [[2, 3, 7, 3, 7, 9, 2, 9]]},
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": _rle_counts(rle_m)}},
            {"id": 3, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": comp},
            {"id": 4, "image_id": 7, "category_id": 5, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": _rle_counts(crowd_m)}},
        ],
        "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    _img(tmp_path / "images" / "a.jpg", size=(W, H))
    return path, data, {"poly": poly, "rle": rle_m, "comp": comp_m, "crowd": crowd_m}


def test_coco_polygons_and_rle_equal_hand_built_masks(tmp_path):
    path, data, hand = _coco_file(tmp_path)
    anns = data["annotations"]
    np.testing.assert_array_equal(annotation_mask(anns[0], H, W), hand["poly"])
    np.testing.assert_array_equal(annotation_mask(anns[1], H, W), hand["rle"])
    np.testing.assert_array_equal(annotation_mask(anns[2], H, W), hand["comp"])


def test_coco_instance_and_class_label_maps(tmp_path):
    path, data, hand = _coco_file(tmp_path)
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
    path, _, hand = _coco_file(tmp_path)
    (item,) = ground_truth_from_coco(tmp_path / "images", path)
    assert item.name == "a" and item.load((W, H)).shape == (H, W)
    with pytest.raises(DataError, match="are 18x20 pixels but the image"):
        item.load((W + 1, H))
    _img(tmp_path / "images" / "extra.jpg")
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
