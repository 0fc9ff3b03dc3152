"""Ground-truth object masks: folders of PNG masks (PASCAL VOC style, binary, or the masks that
``dinokit synth classify`` writes) and COCO annotation files (through pycocotools).

Every reader returns a label map: an (H, W) ``int32`` array where 0 is background, 255 is void
("don't care", as in VOC's SegmentationObject/SegmentationClass PNGs and COCO crowd regions) and
every other value is one object.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, find_images, is_image_file
from .palette import VOID_LABEL

log = logging.getLogger("dinokit")

BACKGROUND = 0
VOID = VOID_LABEL
# VOC's void colour, for masks saved as RGB pictures instead of indexed PNGs
_VOC_VOID_RGB = (224, 224, 192)


def _object_ids(n: int) -> list[int]:
    """n object ids 1, 2, ... skipping the void value."""
    ids: list[int] = []
    v = 1
    while len(ids) < n:
        if v != VOID:
            ids.append(v)
        v += 1
    return ids


def read_label_mask(path: str | os.PathLike, binary: bool = False) -> np.ndarray:
    """A mask file as an (H, W) int32 label map.

    Indexed (palette) PNGs give their palette indices (VOC); 8- and 16-bit grey PNGs give their
    values; RGB masks give one id per distinct colour (black = background, VOC's (224, 224, 192) =
    void). With ``binary`` any nonzero pixel is the one object (value 1).
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "1"):
                arr = np.asarray(im if mode != "1" else im.convert("L"), dtype=np.int32)
                if mode == "1":
                    arr = (arr > 0).astype(np.int32)
            elif mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.int64).astype(np.int32)
            elif mode in ("LA", "PA"):
                arr = np.asarray(im.getchannel(0), dtype=np.int32)
            else:
                arr = _rgb_to_labels(np.asarray(im.convert("RGB")), binary)
    except FileNotFoundError as e:
        raise DataError(f"The mask {path} does not exist.") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path} is not a readable mask image (more pixels than Pillow decodes safely)."
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable mask image ({e.__class__.__name__}).") from e
    if binary:
        return (arr != 0).astype(np.int32)
    return arr


def _rgb_to_labels(rgb: np.ndarray, binary: bool) -> np.ndarray:
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int32)
    flat = rgb.reshape(-1, 3)
    colors, inverse = np.unique(flat, axis=0, return_inverse=True)
    lut = np.zeros(len(colors), dtype=np.int32)
    others = []
    for i, c in enumerate(map(tuple, colors)):
        if c == (0, 0, 0):
            lut[i] = BACKGROUND
        elif c == _VOC_VOID_RGB and not binary:
            lut[i] = VOID
        else:
            others.append(i)
    for i, v in zip(others, _object_ids(len(others))):
        lut[i] = v
    return lut[inverse.reshape(-1)].reshape(rgb.shape[:2])


@dataclass
class GroundTruth:
    """One image and how to read its ground truth (a mask file, or its COCO annotations)."""

    image: Path
    name: str
    mask: Path | None = None
    binary: bool = False
    coco_annotations: list[dict] = field(default_factory=list)
    coco_size: tuple[int, int] | None = None  # (height, width) the annotation file states
    objects: str = "instance"

    def load(self, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The label map at the image's original size; ``image_size`` (width, height) is checked."""
        if self.mask is not None:
            labels = read_label_mask(self.mask, binary=self.binary)
            where = f"The mask {self.mask}"
        else:
            assert self.coco_size is not None, "a target without a mask file reads COCO annotations"
            h, w = self.coco_size
            if image_size is not None and (w, h) != tuple(image_size):
                # checked before the masks are drawn: they are allocated at the file's size, and a file
                # claiming 100000x100000 for a small image would ask for tens of GiB
                raise DataError(
                    f"The COCO annotation file gives the image {self.image} a size of {w}x{h} pixels, but it is "
                    f"{image_size[0]}x{image_size[1]}; the annotations belong to another image or another size."
                )
            labels = coco_label_map(self.coco_annotations, h, w, self.objects)
            where = f"The COCO annotations of {self.name}"
        if image_size is not None and (labels.shape[1], labels.shape[0]) != tuple(image_size):
            raise DataError(
                f"{where} are {labels.shape[1]}x{labels.shape[0]} pixels but the image {self.image} is "
                f"{image_size[0]}x{image_size[1]}."
                if self.mask is None
                else f"{where} is {labels.shape[1]}x{labels.shape[0]} pixels but its image {self.image} is "
                f"{image_size[0]}x{image_size[1]}."
            )
        return labels


def read_image_list(path: str | os.PathLike) -> set[str]:
    """Image ids, one a line (VOC's ImageSets/Segmentation/val.txt): names or relative paths, with or
    without extension."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The image list {p} does not exist.")
    ids = set()
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.add(_strip_ext(line.split()[0]))
    if not ids:
        raise DataError(f"The image list {p} is empty.")
    return ids


def _strip_ext(name: str) -> str:
    return name[: -len(Path(name).suffix)] if is_image_file(name) else name


def _filter_by_list(images: list[Path], root: Path, ids: set[str] | None) -> list[Path]:
    if ids is None:
        return images
    kept = [p for p in images if _strip_ext(p.relative_to(root).as_posix()) in ids or p.stem in ids]
    if not kept:
        raise DataError(f"None of the images under {root} is in the image list.")
    return kept


def _mask_index(masks_root: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    by_rel: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for m in find_images(masks_root):
        rel = _strip_ext(m.relative_to(masks_root).as_posix())
        # a PNG wins over a lossy copy of the same mask
        if rel not in by_rel or m.suffix.lower() == ".png":
            by_rel[rel] = m
        by_stem.setdefault(m.stem, []).append(m)
    return by_rel, by_stem


def ground_truth_from_masks(
    images_root: str | os.PathLike,
    masks_root: str | os.PathLike,
    binary: bool = False,
    image_list: set[str] | None = None,
) -> list[GroundTruth]:
    """Pair every image under ``images_root`` with the mask of the same name under ``masks_root``.

    The mask of ``IMAGES/a/b.jpg`` is ``MASKS/a/b.<ext>`` (any image extension; PNG preferred), or
    in a flat mask folder ``MASKS/b.<ext>`` when that name is unique. This covers VOC
    (JPEGImages + SegmentationObject) and ``dinokit synth classify`` (``DIR/val`` + ``DIR/masks/val``).
    Every image must have a mask: a missing one is an error, not a silently smaller data set.
    """
    images_root, masks_root = Path(images_root), Path(masks_root)
    if not images_root.is_dir():
        raise DataError(f"The image folder {images_root} does not exist.")
    if not masks_root.is_dir():
        raise DataError(f"The mask folder {masks_root} does not exist.")
    images = [p for p in find_images(images_root) if masks_root not in p.parents]
    if not images:
        raise DataError(f"No images were found under {images_root}.")
    images = _filter_by_list(images, images_root, image_list)
    by_rel, by_stem = _mask_index(masks_root)
    if not by_rel:
        raise DataError(f"No mask images were found under {masks_root}.")
    out, missing = [], []
    for img in images:
        rel = _strip_ext(img.relative_to(images_root).as_posix())
        mask = by_rel.get(rel)
        if mask is None and len(by_stem.get(img.stem, [])) == 1:
            mask = by_stem[img.stem][0]
        if mask is None:
            missing.append(img)
            continue
        out.append(GroundTruth(image=img, name=rel, mask=mask, binary=binary))
    if missing:
        example = missing[0].relative_to(images_root)
        raise DataError(
            f"{len(missing)} of {len(images)} images under {images_root} have no mask under {masks_root} "
            f"(for example {example}); masks must be named like their images"
            + ("" if image_list else ", or pass --image-list to evaluate a subset")
            + "."
        )
    return out


# -- COCO ------------------------------------------------------------------------------------------
def load_coco(ann_file: str | os.PathLike):
    """A ``pycocotools.coco.COCO`` index of an annotation file; a clear error for anything else."""
    p = Path(ann_file)
    if not p.is_file():
        raise DataError(f"The annotation file {p} does not exist.")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p} is not a COCO annotation file (not JSON: {e.__class__.__name__}).") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{p} is not a COCO annotation file (it lacks the 'images' and 'annotations' lists).")
    bad = [
        a
        for a in data["annotations"]
        if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a
    ]
    if bad:
        raise DataError(
            f"{p} is not a COCO segmentation file (an annotation lacks image_id or segmentation)."
        )
    if any(
        not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im)
        for im in data["images"]
    ):
        raise DataError(
            f"{p} is not a COCO annotation file (an image entry lacks id, file_name, height or width)."
        )
    data.setdefault("categories", [])
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        coco.createIndex()
    return coco


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """One COCO annotation (polygons, uncompressed or compressed RLE) as a bool (H, W) mask."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    what = f"Annotation {ann.get('id', '?')}"
    try:
        if isinstance(seg, list):  # polygons
            polygons = [p for p in (_checked_polygon(poly, height, width, what) for poly in seg) if p]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            _check_rle(seg, seg["counts"], height, width, what)
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict):
            rle = dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            _check_rle(rle, _rle_string_counts(rle["counts"], what), height, width, what)
        else:
            raise TypeError(type(seg).__name__)
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword notice
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise DataError(
            f"Annotation {ann.get('id', '?')} has a segmentation pycocotools cannot decode ({e})."
        ) from e
    if m.ndim == 3:
        m = m.any(axis=2)
    if m.shape != (height, width):
        raise DataError(
            f"Annotation {ann.get('id', '?')} decodes to {m.shape[1]}x{m.shape[0]} pixels, not the image's "
            f"{width}x{height}."
        )
    return m.astype(bool)


#: how far outside the image a polygon is kept exact; beyond it the polygon is cut (the pixels
#: inside the image stay the same) so that rasterising costs memory bounded by the image size
_POLYGON_MARGIN = 1.0


def _checked_polygon(poly, height: int, width: int, what: str) -> list[float]:
    """A COCO polygon ``[x0, y0, x1, y1, ...]`` validated (numbers, finite, at least 3 points) and cut
    to the image plus a margin, ready for pycocotools (whose rasteriser allocates memory in proportion
    to the polygon's perimeter: one coordinate of 1e308 would exhaust the machine)."""
    if not isinstance(poly, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
    ):
        raise DataError(f"{what} has a polygon that is not a list of numbers.")
    if len(poly) % 2 or len(poly) < 6:
        raise DataError(
            f"{what} has a polygon of {len(poly)} coordinates; a polygon needs at least 3 (x, y) points."
        )
    try:
        coords = [float(v) for v in poly]
    except OverflowError:  # an integer beyond any float
        coords = [math.inf]
    if not all(math.isfinite(v) for v in coords):
        raise DataError(f"{what} has a polygon with a non-finite coordinate (NaN or inf).")
    # far-away vertices are pulled in to where the arithmetic below stays exact; the pixels inside the
    # image do not change visibly (an edge to 1e9 and an edge to 1e308 cross the image alike)
    far = 1e9
    points = [(min(max(x, -far), far), min(max(y, -far), far)) for x, y in zip(coords[0::2], coords[1::2])]
    lo_x, hi_x, lo_y, hi_y = (
        -_POLYGON_MARGIN,
        width + _POLYGON_MARGIN,
        -_POLYGON_MARGIN,
        height + _POLYGON_MARGIN,
    )
    if all(lo_x <= x <= hi_x and lo_y <= y <= hi_y for x, y in points):
        return list(poly)
    # Sutherland-Hodgman: cut by each side of the box in turn
    for axis, bound, keep_below in ((0, lo_x, False), (0, hi_x, True), (1, lo_y, False), (1, hi_y, True)):
        points = _cut_polygon(points, axis, bound, keep_below)
    if len(points) < 3:
        return []  # nothing of it inside the image
    return [float(v) for p in points for v in p]


def _cut_polygon(points: list[tuple[float, float]], axis: int, bound: float, keep_below: bool) -> list:
    """The part of a polygon on one side of the line ``coordinate[axis] == bound``."""

    def inside(p: tuple[float, float]) -> bool:
        return p[axis] <= bound if keep_below else p[axis] >= bound

    cut: list[tuple[float, float]] = []
    for i, cur in enumerate(points):
        before = points[i - 1]
        if inside(cur) != inside(before):
            t = (bound - before[axis]) / (cur[axis] - before[axis])
            crossing = [0.0, 0.0]
            crossing[axis] = bound
            crossing[1 - axis] = before[1 - axis] + t * (cur[1 - axis] - before[1 - axis])
            cut.append((crossing[0], crossing[1]))
        if inside(cur):
            cut.append(cur)
    return cut


def _rle_string_counts(counts: bytes, what: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (the format of pycocotools' rleFrString)."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise DataError(f"{what} has a compressed RLE that ends in the middle of a number.")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _check_rle(rle: dict, counts: Sequence, height: int, width: int, what: str) -> None:
    """An RLE must describe exactly the image's pixels: pycocotools allocates its ``size`` and writes
    its runs without bounds checks."""
    size = rle.get("size")
    if not (isinstance(size, (list, tuple)) and list(size) == [height, width]):
        raise DataError(f"{what} has an RLE of size {size}, not the image's [{height}, {width}].")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise DataError(f"{what} has an RLE with a run length that is not a non-negative integer.")
    if sum(counts) != height * width:
        raise DataError(f"{what} has an RLE covering {sum(counts)} pixels, not the image's {height * width}.")


def coco_label_map(
    annotations: Sequence[dict], height: int, width: int, objects: str = "instance"
) -> np.ndarray:
    """The label map of one image's COCO annotations.

    ``objects="instance"``: each non-crowd annotation is an object (larger ones are painted first, so a
    small object on top of a large one stays visible); ``"class"``: the instances of a category are
    merged into one object. Crowd regions are void (255).
    """
    if objects not in ("instance", "class"):
        raise DataError(f"--objects must be instance or class, not {objects!r}.")
    labels = np.zeros((height, width), dtype=np.int32)
    normal = [a for a in annotations if not a.get("iscrowd", 0)]
    crowd = [a for a in annotations if a.get("iscrowd", 0)]
    masks = [(a, annotation_mask(a, height, width)) for a in normal]
    if objects == "instance":
        masks.sort(key=lambda am: -int(am[1].sum()))
        for (_, m), v in zip(masks, _object_ids(len(masks))):
            labels[m] = v
    else:
        cats = sorted({a.get("category_id", 0) for a, _ in masks})
        ids = dict(zip(cats, _object_ids(len(cats))))
        merged: dict[int, np.ndarray] = {}
        for a, m in masks:
            c = a.get("category_id", 0)
            merged[c] = merged[c] | m if c in merged else m
        for c, m in sorted(merged.items(), key=lambda cm: -int(cm[1].sum())):
            labels[m] = ids[c]
    for a in crowd:
        labels[annotation_mask(a, height, width) & (labels == 0)] = VOID
    return labels


def ground_truth_from_coco(
    images_root: str | os.PathLike,
    ann_file: str | os.PathLike,
    objects: str = "instance",
    image_list: set[str] | None = None,
) -> list[GroundTruth]:
    """Every image of a COCO annotation file, found under ``images_root`` by its ``file_name``.

    An image of the file that is not in the folder, or an image of the folder (within
    ``image_list``) that the file does not annotate, is an error.
    """
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise DataError(f"The image folder {images_root} does not exist.")
    if objects not in ("instance", "class"):
        raise DataError(f"--objects must be instance or class, not {objects!r}.")
    coco = load_coco(ann_file)
    entries = sorted(coco.imgs.values(), key=lambda im: str(im["file_name"]))
    if image_list is not None:
        entries = [
            im
            for im in entries
            if _strip_ext(str(im["file_name"])) in image_list or Path(str(im["file_name"])).stem in image_list
        ]
    if not entries:
        raise DataError(f"{ann_file} describes no images" + (" of the image list." if image_list else "."))
    found = {p.relative_to(images_root).as_posix(): p for p in find_images(images_root)}
    by_name: dict[str, list[Path]] = {}
    for p in found.values():
        by_name.setdefault(p.name, []).append(p)
    out, used = [], set()
    for im in entries:
        fname = str(im["file_name"]).replace("\\", "/")
        path = found.get(fname)
        if path is None and len(by_name.get(Path(fname).name, [])) == 1:
            path = by_name[Path(fname).name][0]
        if path is None:
            raise DataError(f"The image {fname} of {ann_file} is not under {images_root}.")
        used.add(path)
        anns = [dict(a) for a in coco.imgToAnns.get(im["id"], [])]
        out.append(
            GroundTruth(
                image=path,
                name=_strip_ext(fname),
                coco_annotations=anns,
                coco_size=(int(im["height"]), int(im["width"])),
                objects=objects,
            )
        )
    extra = [p for p in found.values() if p not in used]
    if image_list is not None:
        extra = [
            p
            for p in extra
            if p.stem in image_list or _strip_ext(p.relative_to(images_root).as_posix()) in image_list
        ]
    if extra:
        raise DataError(
            f"{len(extra)} images under {images_root} have no entry in {ann_file} (for example "
            f"{extra[0].relative_to(images_root)}); pass --image-list to evaluate the annotated ones only."
        )
    return out


__all__ = [
    "BACKGROUND",
    "IMAGE_EXTENSIONS",
    "VOID",
    "GroundTruth",
    "annotation_mask",
    "coco_label_map",
    "ground_truth_from_coco",
    "ground_truth_from_masks",
    "load_coco",
    "read_image_list",
    "read_label_mask",
]
