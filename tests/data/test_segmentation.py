"""The segmentation layouts read as their owners publish them: VOC palette PNGs as indices, ADE20K's
label 0 ignored and the rest shifted, Cityscapes label ids by cityscapesScripts' table, the folder
layout; and every bad input refused in one sentence."""

import numpy as np
import pytest
from PIL import Image

from dinokit.data.palette import DAVIS_PALETTE
from dinokit.data.segmentation import CITYSCAPES_CLASSES, check_split, load_splits, segmentation_split
from dinokit.data.synth_segment import make_segment_dataset, void_borders
from dinokit.errors import DataError


def _image(path, w, h, exif_rotate=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: upright it is h x w
        img.save(path, exif=exif)
    else:
        img.save(path)


def _palette_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(DAVIS_PALETTE)
    img.save(path)


def _voc(root, labels, stems=("a",), val=("a",)):
    for s in stems:
        _image(root / "JPEGImages" / f"{s}.jpg", labels.shape[1], labels.shape[0])
        _palette_png(root / "SegmentationClass" / f"{s}.png", labels)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(stems) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")


def test_voc_palette_masks_are_read_as_indices(tmp_path):
    labels = np.array([[0, 15, 15, 255], [20, 1, 0, 255]])
    _voc(tmp_path, labels)
    train, val = load_splits(tmp_path, "voc2012")
    assert len(train.classes) == 21 and train.classes[15] == "person"
    got = val.read_labels(val.samples[0])
    assert got.tolist() == labels.tolist()  # indices, not the palette's colours


def test_voc_uses_the_augmented_set_for_training_when_present(tmp_path):
    labels = np.zeros((4, 4))
    _voc(tmp_path, labels, stems=("a", "b"), val=("a",))
    _palette_png(tmp_path / "SegmentationClassAug" / "b.png", labels + 2)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("b\n")
    train = segmentation_split(tmp_path, "voc2012", "train")
    assert [s.stem for s in train.samples] == ["b"] and train.samples[
        0
    ].mask.parent.name == "SegmentationClassAug"
    assert segmentation_split(tmp_path, "voc2012", "val").samples[0].mask.parent.name == "SegmentationClass"


def test_ade20k_ignores_label_zero_and_shifts_the_rest(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 2], [150, 0, 75]])
    for split in ("training", "validation"):
        _image(root / "images" / split / "x.jpg", 3, 2)
        Image.fromarray(raw.astype(np.uint8), mode="L").save(_mk(root / "annotations" / split / "x.png"))
    train, _ = load_splits(tmp_path, "ade20k")
    assert len(train.classes) == 150 and train.classes[0] == "wall"
    assert train.read_labels(train.samples[0]).tolist() == [[255, 0, 1], [149, 255, 74]]


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    # cityscapesScripts helpers/labels.py: road 7->0, sidewalk 8->1, building 11->2, sky 23->10,
    # person 24->11, car 26->13, bicycle 33->18; unlabeled 0, ego vehicle 1, parking 9, rail track 10,
    # guard rail 14, caravan 29, trailer 30 -> ignored
    ids = np.array([[7, 8, 11, 23, 24, 26, 33], [0, 1, 9, 10, 14, 29, 30]])
    want = [[0, 1, 2, 10, 11, 13, 18], [255] * 7]
    for split in ("train", "val"):
        _image(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", 7, 2)
        Image.fromarray(ids.astype(np.uint8), mode="L").save(
            _mk(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png")
        )
    train, _ = load_splits(tmp_path, "cityscapes")
    assert train.classes == list(CITYSCAPES_CLASSES) and len(train.classes) == 19
    assert train.samples[0].stem == "aachen_000000_000019"
    assert train.read_labels(train.samples[0]).tolist() == want


def _folder(root, labels, classes=None, rgb=False, size=None):
    for split in ("train", "val"):
        h, w = size or labels.shape
        _image(root / split / "images" / "s.jpg", w, h)
        if rgb:
            Image.fromarray(np.stack([labels.astype(np.uint8)] * 3, -1)).save(
                _mk(root / split / "masks" / "s.png")
            )
        else:
            _palette_png(root / split / "masks" / "s.png", labels)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_folder_layout_with_and_without_classes_txt(tmp_path):
    labels = np.array([[0, 1], [2, 255]])
    _folder(tmp_path / "a", labels, classes=["bg", "cat", "dog", "cow"])
    train, val = load_splits(tmp_path / "a", "folder")
    assert train.classes == ["bg", "cat", "dog", "cow"]
    _folder(tmp_path / "b", labels)
    train, _ = load_splits(tmp_path / "b", "folder")
    assert train.classes == ["class 0", "class 1", "class 2"]


def test_folder_ignore_index(tmp_path):
    _folder(tmp_path, np.array([[0, 1], [9, 9]]), classes=["a", "b"])
    train, _ = load_splits(tmp_path, "folder", ignore_index=9)
    assert train.read_labels(train.samples[0]).tolist() == [[0, 1], [255, 255]]


@pytest.mark.parametrize("case, words", [
    ("rgb", "not a single-channel or palette PNG"),
    ("size", "must be the size of its image"),
    ("value", "outside the 2 classes"),
])  # fmt: skip
def test_bad_masks_are_refused_in_one_sentence(tmp_path, case, words):
    labels = np.array([[0, 1], [1, 0]])
    if case == "value":
        labels = np.array([[0, 1], [7, 0]])
    _folder(tmp_path, labels, classes=["a", "b"], rgb=case == "rgb", size=(3, 2) if case == "size" else None)
    with pytest.raises(DataError, match=words):
        load_splits(tmp_path, "folder")


def test_a_split_file_naming_a_missing_image_and_an_empty_split(tmp_path):
    _voc(tmp_path, np.zeros((2, 2)), stems=("a",), val=("a", "missing"))
    with pytest.raises(DataError, match="names missing"):
        segmentation_split(tmp_path, "voc2012", "val")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no image"):
        segmentation_split(tmp_path, "voc2012", "val")


def test_the_mask_is_compared_with_the_upright_image(tmp_path):
    labels = np.zeros((4, 6))  # 6 wide, 4 high
    _folder(tmp_path, labels, classes=["a"])
    # stored 4 wide x 6 high, EXIF says rotate: upright 6 x 4, the mask's size
    _image(tmp_path / "train" / "images" / "s.jpg", 4, 6, exif_rotate=True)
    split = segmentation_split(tmp_path, "folder", "train")
    check_split(split)


def test_unreadable_images_are_skipped_and_counted_or_stop_under_strict(tmp_path):
    _voc(tmp_path, np.zeros((2, 2)), stems=("a", "b"))
    (tmp_path / "JPEGImages" / "b.jpg").write_bytes(b"not an image")
    split = segmentation_split(tmp_path, "voc2012", "train")
    check_split(split)
    assert split.skipped == 1 and [s.stem for s in split.samples] == ["a"]
    with pytest.raises(DataError, match="not a readable image"):
        check_split(segmentation_split(tmp_path, "voc2012", "train"), strict=True)


@pytest.mark.parametrize(
    "layout, style", [("voc2012", "cluttered"), ("folder", "cluttered"), ("folder", "simple")]
)
def test_synth_segment_in_each_layout(tmp_path, layout, style):
    s = make_segment_dataset(
        tmp_path / layout, layout=layout, classes=3, train=3, val=2, size=64, style=style
    )
    train, val = load_splits(s.root, layout)
    assert (len(train.samples), len(val.samples)) == (3, 2)
    labels = [train.read_labels(x) for x in train.samples]
    values = set(np.unique(np.concatenate([v.ravel() for v in labels])).tolist())
    assert values <= {0, 1, 2, 3, 255} and 255 in values and 0 in values and values & {1, 2, 3}
    # the same seed gives the same files
    again = make_segment_dataset(
        tmp_path / "again", layout=layout, classes=3, train=3, val=2, size=64, style=style
    )
    a = sorted(p.relative_to(s.root) for p in s.root.rglob("*.png"))
    assert a == sorted(p.relative_to(again.root) for p in again.root.rglob("*.png"))
    assert all((s.root / p).read_bytes() == (again.root / p).read_bytes() for p in a)


def test_void_borders_mark_both_sides_of_each_boundary():
    labels = np.array([[0, 0, 1, 1]] * 2, np.uint8)
    assert void_borders(labels).tolist() == [[0, 255, 255, 1]] * 2
