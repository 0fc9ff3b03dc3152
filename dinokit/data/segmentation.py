"""Semantic segmentation data sets in their published layouts, read as the official evaluations read
them, and their label maps mapped to training ids with one void value (255).

- ``voc2012``: ``JPEGImages/STEM.jpg``, ``SegmentationClass/STEM.png`` (palette PNGs whose indices
  are the classes, 255 the void border), ``ImageSets/Segmentation/{train,val}.txt``; with
  ``SegmentationClassAug/`` and ``ImageSets/Segmentation/train_aug.txt`` present, training uses the
  augmented set (10,582 images). 21 classes with the background.
- ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``annotations/...png``; label 0 ("other") becomes void and 1..150 shift down by one
  (mmsegmentation's and DINOv3's ``reduce_zero_label``): 150 classes.
- ``cityscapes``: ``leftImg8bit/{train,val}/CITY/*_leftImg8bit.png`` with
  ``gtFine/.../*_gtFine_labelIds.png``, label ids mapped to the 19 training ids of
  cityscapesScripts' ``helpers/labels.py`` (every other id void).
- ``folder``: ``ROOT/{train,val}/images/`` and ``ROOT/{train,val}/masks/STEM.png`` (single-channel
  or palette PNGs of class indices, ``ignore_index`` void), optional ``ROOT/classes.txt``.

Images are read with :func:`dinokit.data.images.read_image` (EXIF orientation applied); masks as
stored (no orientation, no palette-to-RGB conversion).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, DinokitError
from ..progress import NULL_PROGRESS, Progress
from .images import IMAGE_EXTENSIONS, exif_orientation, upright_size
from .palette import DAVIS_PALETTE, VOID_LABEL

log = logging.getLogger("dinokit")

DATASETS = ("voc2012", "ade20k", "cityscapes", "folder")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

ADE20K_CLASSES = tuple(
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,table,"
    "mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,armchair,seat,fence,"
    "desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,chest of drawers,counter,sand,"
    "sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,case,pool table,pillow,screen door,"
    "stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,"
    "kitchen island,computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,"
    "awning,streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,"
    "ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,"
    "stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,"
    "animal,bicycle,lake,dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,"
    "pier,crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag".split(",")
)
assert len(ADE20K_CLASSES) == 150

#: cityscapesScripts helpers/labels.py: label id -> train id for the 19 evaluated classes (the rest void)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
#: the label ids cityscapesScripts defines (0..33); every one not in the table above is void
CITYSCAPES_LABEL_IDS = range(34)

#: a value in a lookup table that no valid label maps to: the mask holds a value the layout does not define
INVALID = -1


def label_lookup(dataset: str, num_classes: int, ignore_index: int = VOID_LABEL) -> np.ndarray:
    """The (65536,) table from a stored mask value to its training id (0..C-1, or 255 for void);
    :data:`INVALID` for a value the layout does not define."""
    lut = np.full(65536, INVALID, dtype=np.int64)
    if dataset == "ade20k":  # reduce_zero_label: 0 -> void, k -> k - 1
        lut[0] = VOID_LABEL
        lut[1 : num_classes + 1] = np.arange(num_classes)
        lut[VOID_LABEL] = VOID_LABEL
    elif dataset == "cityscapes":
        lut[list(CITYSCAPES_LABEL_IDS)] = VOID_LABEL
        for k, v in CITYSCAPES_TRAIN_IDS.items():
            lut[k] = v
        lut[VOID_LABEL] = VOID_LABEL
    else:  # voc2012, folder: the stored value is the class
        lut[:num_classes] = np.arange(num_classes)
        lut[ignore_index] = VOID_LABEL
    return lut


def read_mask_values(path: str | os.PathLike, *, allow_rgb: bool = False) -> np.ndarray:
    """A label PNG as stored: palette indices (not colours), grey values or 16-bit values, as an
    (H, W) int64 array; no EXIF orientation. An RGB mask is refused in one sentence."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.int64)
            if mode in ("LA", "PA"):
                return np.asarray(im.getchannel(0)).astype(np.int64)
    except FileNotFoundError as e:
        raise DataError(f"The mask {path} does not exist.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"The mask {path} is not a readable image ({e.__class__.__name__}).") from e
    raise DataError(
        f"The mask {path} is an {mode} picture, not a single-channel or palette PNG of class indices; save the "
        "class index of each pixel (not a colour), e.g. Image.fromarray(labels.astype('uint8')).save(path)."
    )


@dataclass(frozen=True)
class SegSample:
    image: Path
    mask: Path
    stem: str


@dataclass
class SegSplit:
    """One split of a segmentation set: its samples, its classes, how its stored labels map to ids."""

    dataset: str
    split: str
    root: Path
    samples: list[SegSample]
    classes: list[str]
    ignore_index: int = VOID_LABEL  #: the stored void value (the training ids use 255)
    skipped: int = 0  #: unreadable images left out
    lookup: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]  # None: made by __post_init__

    def __post_init__(self) -> None:
        if self.lookup is None:
            self.lookup = label_lookup(self.dataset, len(self.classes), self.ignore_index)

    @property
    def palette(self) -> list[int]:
        return DAVIS_PALETTE

    def read_labels(self, sample: SegSample) -> np.ndarray:
        """The training ids of ``sample``'s mask: (H, W) int64, 0..C-1 and 255 for void."""
        return map_labels(
            read_mask_values(sample.mask), self.lookup, sample.mask, len(self.classes), self.ignore_index
        )


def map_labels(
    values: np.ndarray, lookup: np.ndarray, path, num_classes: int, ignore_index: int
) -> np.ndarray:
    out = lookup[np.clip(values, 0, 65535)]
    bad = (out == INVALID) | (values < 0)
    if bad.any():
        v = int(values[bad].flat[0])
        raise DataError(f"The mask {path} holds the label {v}, outside the {num_classes} classes and not the ignore "
                        f"index {ignore_index}; fix the mask or the class list.")  # fmt: skip
    return out


# -- the layouts -----------------------------------------------------------------------------------
def _split_file_samples(
    root: Path, listing: Path, image_dir: Path, mask_dir: Path, ext: str
) -> list[SegSample]:
    if not listing.is_file():
        raise DataError(f"The split file {listing} does not exist; is {root} the VOC2012 folder?")
    stems = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = []
    for stem in stems:
        image, mask = image_dir / f"{stem}{ext}", mask_dir / f"{stem}.png"
        if not image.is_file():
            raise DataError(f"The split file {listing} names {stem}, but {image} does not exist.")
        if not mask.is_file():
            raise DataError(f"The split file {listing} names {stem}, but its mask {mask} does not exist.")
        samples.append(SegSample(image, mask, stem))
    return samples


def _voc(root: Path, split: str) -> tuple[list[SegSample], list[str]]:
    if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        root = root / "VOC2012"
    if (root / "VOCdevkit" / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        root = root / "VOCdevkit" / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    masks = root / "SegmentationClass"
    listing = sets / f"{split}.txt"
    if split == "train" and (root / "SegmentationClassAug").is_dir() and (sets / "train_aug.txt").is_file():
        masks, listing = root / "SegmentationClassAug", sets / "train_aug.txt"
    return _split_file_samples(root, listing, root / "JPEGImages", masks, ".jpg"), list(VOC_CLASSES)


def _paired(root: Path, images: Path, masks: Path, mask_name) -> list[SegSample]:
    if not images.is_dir():
        raise DataError(f"The image folder {images} does not exist; is {root} the data set's folder?")
    samples = []
    for image in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        rel = image.relative_to(images)
        mask = masks / rel.parent / mask_name(image.name)
        if not mask.is_file():
            raise DataError(f"The image {image} has no mask {mask}.")
        stem = Path(mask_name(image.name)).stem
        if rel.parent != Path("."):
            stem = "_".join((*rel.parent.parts, stem))
        samples.append(SegSample(image, mask, stem))
    return samples


def _ade20k(root: Path, split: str) -> tuple[list[SegSample], list[str]]:
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    name = {"train": "training", "val": "validation"}[split]
    samples = _paired(
        root, root / "images" / name, root / "annotations" / name, lambda n: Path(n).stem + ".png"
    )
    return samples, list(ADE20K_CLASSES)


def _cityscapes(root: Path, split: str) -> tuple[list[SegSample], list[str]]:
    def mask_name(n: str) -> str:
        return n.replace("_leftImg8bit.png", "_gtFine_labelIds.png")

    images = root / "leftImg8bit" / split
    samples = _paired(root, images, root / "gtFine" / split, mask_name)
    samples = [
        SegSample(s.image, s.mask, Path(s.image.name).stem.replace("_leftImg8bit", "")) for s in samples
    ]
    return samples, list(CITYSCAPES_CLASSES)


def _folder(root: Path, split: str) -> tuple[list[SegSample], list[str] | None]:
    images, masks = root / split / "images", root / split / "masks"
    if not masks.is_dir() and images.is_dir():
        raise DataError(f"{root / split} has images/ but no masks/ folder beside it.")
    samples = _paired(root, images, masks, lambda n: Path(n).stem + ".png")
    names = root / "classes.txt"
    classes = None
    if names.is_file():
        classes = [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not classes:
            raise DataError(f"{names} names no class; write one class name a line.")
    return samples, classes


def segmentation_split(
    root: str | os.PathLike,
    dataset: str,
    split: str,
    ignore_index: int = VOID_LABEL,
    classes: Sequence[str] | None = None,
) -> SegSplit:
    """The samples and classes of ``split`` ("train" or "val") of ``root`` in ``dataset``'s layout.
    ``classes`` (folder layout without classes.txt) gives the class list found on another split."""
    root = Path(root)
    if dataset not in DATASETS:
        raise DinokitError(f"--dataset must be one of {', '.join(DATASETS)}, not {dataset!r}.")
    if not root.is_dir():
        raise DataError(f"The data folder {root} does not exist.")
    reader = {"voc2012": _voc, "ade20k": _ade20k, "cityscapes": _cityscapes, "folder": _folder}[dataset]
    samples, found = reader(root, split)
    if not samples:
        raise DataError(f"The {split} split of {root} ({dataset} layout) holds no image.")
    if dataset != "folder":
        ignore_index = VOID_LABEL
    names = list(found) if found is not None else (list(classes) if classes is not None else [])
    return SegSplit(dataset, split, root, samples, names, ignore_index)


# -- checking a split before anything is written ----------------------------------------------------
def _check_one(split: SegSplit, sample: SegSample, values_too: bool) -> tuple[int | None, str | None]:
    """(the largest non-void stored label, or None when the image is unreadable; an error or None)."""
    try:
        with Image.open(sample.image) as im:
            size = upright_size(im.size, exif_orientation(im))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, None
    try:
        values = read_mask_values(sample.mask)
        if values_too:
            map_labels(values, split.lookup, sample.mask, len(split.classes), split.ignore_index)
    except DataError as e:
        return -1, str(e)
    if (values.shape[1], values.shape[0]) != size:
        return -1, (
            f"The mask {sample.mask} is {values.shape[1]}x{values.shape[0]} pixels but its image "
            f"{sample.image} is {size[0]}x{size[1]}; a mask must be the size of its image."
        )
    kept = values[values != split.ignore_index] if split.dataset == "folder" else values
    return (int(kept.max()) if kept.size else 0), None


def check_split(
    split: SegSplit, strict: bool = False, progress: Progress = NULL_PROGRESS, find_classes: bool = False
) -> int:
    """Every mask of ``split`` read once, before anything is written: its size against its image's
    (upright) size and, unless ``find_classes``, its values against the classes. Unreadable images are
    left out and counted (with ``strict`` the first one stops). Returns the largest stored label (a
    folder set without classes.txt has the classes 0..largest)."""
    task = progress.task(f"checking {split.split} masks", total=len(split.samples))
    kept, largest = [], 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda s: _check_one(split, s, not find_classes), split.samples)
        for sample, (top, error) in zip(split.samples, results):
            task.advance(1)
            if error is not None:
                raise DataError(error)
            if top is None:
                if strict:
                    raise DataError(f"{sample.image} is not a readable image.")
                log.warning("skipping unreadable image %s", sample.image)
                split.skipped += 1
                continue
            kept.append(sample)
            largest = max(largest, top)
    task.close()
    if not kept:
        raise DataError(f"No image of the {split.split} split of {split.root} could be read.")
    split.samples = kept
    return largest


def load_splits(
    root: str | os.PathLike,
    dataset: str,
    ignore_index: int = VOID_LABEL,
    strict: bool = False,
    progress: Progress = NULL_PROGRESS,
    splits: Sequence[str] = ("train", "val"),
) -> list[SegSplit]:
    """The checked splits of a data set (:func:`segmentation_split`, :func:`check_split`); a folder set
    without classes.txt gets the classes ``class 0`` .. ``class K``, K the largest label found."""
    found = [segmentation_split(root, dataset, name, ignore_index) for name in splits]
    if all(s.classes for s in found):
        for s in found:
            check_split(s, strict, progress)
        return found
    largest = max(check_split(s, strict, progress, find_classes=True) for s in found)
    if largest >= 255:
        raise DataError(f"The masks of {root} hold the label {largest}; class indices go up to 254.")
    names = [f"class {i}" for i in range(largest + 1)]
    return [SegSplit(s.dataset, s.split, s.root, s.samples, names, s.ignore_index, s.skipped) for s in found]


__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "DATASETS",
    "VOC_CLASSES",
    "SegSample",
    "SegSplit",
    "check_split",
    "label_lookup",
    "load_splits",
    "map_labels",
    "read_mask_values",
    "segmentation_split",
]
