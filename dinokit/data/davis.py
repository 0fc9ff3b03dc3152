"""DAVIS 2017 layout, frames and first-frame masks for video object segmentation.

Layout (spec video): ``ROOT/ImageSets/2017/<split>.txt`` names the sequences,
``ROOT/JPEGImages/480p/<seq>/00000.jpg ...`` holds the frames and ``ROOT/Annotations/480p/<seq>/
00000.png ...`` the indexed masks (0 background, k object k, 255 void). A user's own video is a
folder of frames (or a video file, with the optional PyAV extra) plus one first-frame mask.

Frames are prepared as the reference evaluation does: resized so that the short side is 480 and the
long side is floored to a multiple of 64 (854x480 -> 832x480) with bilinear interpolation WITHOUT
antialiasing -- the sampling of OpenCV's ``INTER_LINEAR`` on the reference's uint8 frames, rounded to
whole grey levels (OpenCV's 11-bit fixed-point weights may round a pixel one level the other way) --
then normalised with mean (0.485, 0.456, 0.406) and std (0.228,
0.224, 0.225) (0.228 is the reference's value) for weights normalised with ImageNet's values; weights
with their own normalisation (or --mean/--std) use theirs. The first mask goes straight to the patch grid with
PIL's NEAREST (torch's ``nearest`` picks other cells).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError, DinokitError
from .images import is_image_file, open_rgb
from .masks import read_label_mask
from .normalization import IMAGENET, Normalization
from .palette import VOID_LABEL, read_label_png

DAVIS_MEAN = (0.485, 0.456, 0.406)
DAVIS_STD = (0.228, 0.224, 0.225)
DAVIS_NORMALIZATION = Normalization(DAVIS_MEAN, DAVIS_STD, "ImageNet's, with the DAVIS reference's std 0.228")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class VideoSequence:
    """One video to segment: its frames in order, the first-frame mask and, where the data set has
    it, the folder of ground-truth masks for scoring."""

    name: str
    frames: list[Path]
    first_mask: Path
    gt_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.frames)


# -- sizes ------------------------------------------------------------------------------------
def propagation_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """(height, width) a frame is resized to: short side ``short_side``, long side floored to a
    multiple of ``multiple`` (480x854 -> 480x832), as the reference's ``read_frame``."""
    if height > width:
        tw = short_side
        th = int(((tw * height) / width) // multiple * multiple)
    else:
        th = short_side
        tw = int(((th * width) / height) // multiple * multiple)
    if th < 1 or tw < 1:
        # the long side is rounded down to a multiple of ``multiple``: a short side whose long side falls
        # below one multiple leaves nothing of the frame
        ratio = max(height, width) / min(height, width)
        need = math.ceil(multiple / ratio)
        while int((need * ratio) // multiple * multiple) < 1:
            need += 1
        raise DataError(
            f"At --image-size {short_side} the long side of a {width}x{height} frame is {short_side * ratio:.0f} "
            f"pixels, which the reference's rounding down to a multiple of {multiple} makes 0; use --image-size "
            f"{need} or more."
        )
    return th, tw


def resize_bilinear_uint8(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float32 in [0, 255], bilinear without antialiasing and rounded
    to whole grey levels, as OpenCV's ``resize(..., INTER_LINEAR)`` gives on uint8 images (up to its
    fixed-point rounding)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.round_().clamp_(0, 255)
    return x[0]


def frame_normalization(norm: Normalization | None = None) -> Normalization:
    """The frames' normalisation for weights normalised with ``norm``: ImageNet's (the weights' own,
    not given by --mean/--std) becomes the reference's values (std 0.228); any other is kept."""
    if norm is None or (
        (norm.mean, norm.std) == (IMAGENET.mean, IMAGENET.std) and not norm.source.startswith("--")
    ):
        return DAVIS_NORMALIZATION
    return norm


def normalize_frame(x: torch.Tensor, norm: Normalization | None = None) -> torch.Tensor:
    """[0, 255] float (3, h, w) -> normalised with ``norm`` (the reference's mean and std when None)."""
    norm = norm or DAVIS_NORMALIZATION
    mean = torch.tensor(norm.mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=x.dtype).view(3, 1, 1)
    return (x / 255.0 - mean) / std


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    return np.array(open_rgb(path))


class FrameDataset(torch.utils.data.Dataset):
    """The frames of one video, resized and normalised; every frame must have the first one's size.

    Yields ``(frame (3, h, w), index)``.
    """

    def __init__(self, frames: Sequence[Path], short_side: int = 480, norm: Normalization | None = None):
        self.norm = norm  #: the frames' normalisation (None: the reference's)
        self.frames = list(frames)
        if not self.frames:
            raise DataError("The video has no frames.")
        first = _image_size(self.frames[0])
        self.original_size = first  # (height, width)
        self.size = propagation_size(*first, short_side=short_side)
        for f in self.frames[1:]:  # headers only: a wrong frame is reported before any work starts
            size = _image_size(f)
            if size != first:
                raise DataError(
                    f"The frame {f} is {size[1]}x{size[0]} pixels but the video's first frame "
                    f"{self.frames[0]} is {first[1]}x{first[0]}; all frames of a video must have one size."
                )

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        rgb = read_rgb(self.frames[i])
        if rgb.shape[:2] != self.original_size:
            h, w = self.original_size
            raise DataError(
                f"The frame {self.frames[i]} is {rgb.shape[1]}x{rgb.shape[0]} pixels but the video's "
                f"first frame {self.frames[0]} is {w}x{h}; all frames of a video must have one size."
            )
        return normalize_frame(resize_bilinear_uint8(rgb, self.size), self.norm), i


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError as e:
        raise DataError(f"The frame {path} does not exist.") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"The frame {path} is not a readable image ({e.__class__.__name__}).") from e


# -- masks ------------------------------------------------------------------------------------
def read_mask(path: str | os.PathLike, what: str = "first-frame mask") -> np.ndarray:
    """An indexed (palette) or greyscale PNG mask as an (H, W) uint8 label map; an RGB mask is
    refused with one sentence naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {what} {path} does not exist.")
    labels = read_label_png(path, what)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DataError(f"The {what} {path} holds labels outside 0..255.")
    return labels.astype(np.uint8)


def read_first_mask(path: str | os.PathLike, binary: bool = False) -> np.ndarray:
    """The first frame's object labels, (H, W) uint8, refused when they hold no object.

    Without ``binary`` the mask is an indexed PNG of labels (0 background, k object k, 255 void);
    with it any nonzero pixel, whatever the file's mode, is the one object 1 (a white-on-black mask
    from an image editor). A mask without any label 1..254 would propagate nothing: every later
    frame would come out empty with a score of zero, so it is refused with what to do instead.
    """
    path = Path(path)
    if binary:
        if not path.is_file():
            raise DataError(f"The first-frame mask {path} does not exist.")
        labels = read_label_mask(path, binary=True).astype(np.uint8)
    else:
        labels = read_mask(path)
    if not ((labels != 0) & (labels != VOID_LABEL)).any():
        if (labels == VOID_LABEL).any():
            raise DataError(
                f"The first-frame mask {path} holds no object label, only 0 (background) and {VOID_LABEL} "
                "(void in DAVIS masks, ignored); give each object its own label (1, 2, ...) in an indexed PNG, "
                "or pass --binary-mask to take every nonzero pixel as one object."
            )
        raise DataError(
            f"The first-frame mask {path} holds no object (every pixel is 0, background); give each "
            "object its own label (1, 2, ...)."
        )
    return labels


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The first mask as one-hot soft labels on the patch grid, (C, h, w) float32.

    The mask is resized straight to the grid with PIL's NEAREST; C = largest label + 1 (channel 0 is
    the background). Void (255) is treated as background.
    """
    h, w = grid
    m = np.where(mask == VOID_LABEL, 0, mask).astype(np.uint8)
    small = np.asarray(Image.fromarray(m, mode="L").resize((w, h), Image.Resampling.NEAREST)).astype(np.int64)
    n_channels = int(m.max()) + 1
    onehot = torch.zeros(n_channels, h * w)
    onehot.scatter_(0, torch.from_numpy(small.reshape(1, -1)), 1.0)
    return onehot.view(n_channels, h, w)


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 labels -> (H, W) with PIL's NEAREST, as the reference writes its results."""
    H, W = size
    if labels.shape == (H, W):
        return labels
    return np.asarray(
        Image.fromarray(labels.astype(np.uint8), mode="L").resize((W, H), Image.Resampling.NEAREST)
    )


# -- finding videos ---------------------------------------------------------------------------
def split_sequences(root: str | os.PathLike, split: str) -> list[str]:
    """The sequence names listed in ``ROOT/ImageSets/2017/<split>.txt``.

    A missing list is refused, naming the splits that exist: falling back to every folder under the
    root would score a misspelt split (``vall``) over all sequences and print a plausible number.
    """
    lists = Path(root) / "ImageSets" / "2017"
    lst = lists / f"{split}.txt"
    if not lst.is_file():
        present = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        there = (
            f"the splits there are {', '.join(present)}"
            if present
            else f"{lists} holds no split lists; name the sequences with --sequences a,b"
        )
        raise DataError(f"The DAVIS split list {lst} does not exist ({there}).")
    return [s.strip() for s in lst.read_text().splitlines() if s.strip()]


def davis_sequences(
    root: str | os.PathLike,
    split: str = "val",
    names: Sequence[str] | None = None,
    resolution: str = "480p",
) -> list[VideoSequence]:
    """The sequences of a DAVIS 2017 root: the split's list (or ``names``), frames and masks."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The DAVIS folder {root} does not exist.")
    img_root = root / "JPEGImages" / resolution
    ann_root = root / "Annotations" / resolution
    if not img_root.is_dir():
        raise DataError(
            f"{root} is not a DAVIS root: {img_root} is missing (expected JPEGImages/{resolution}/<seq>/)."
        )
    if names is None:
        names = split_sequences(root, split)
    if not names:
        raise DataError(f"The DAVIS folder {root} lists no sequences for the split {split!r}.")
    out = []
    for name in names:
        seq_dir = img_root / name
        if not seq_dir.is_dir():
            raise DataError(f"The sequence folder {seq_dir} does not exist.")
        frames = sorted(p for p in seq_dir.iterdir() if is_image_file(p))
        if not frames:
            raise DataError(f"The sequence folder {seq_dir} holds no frames.")
        gt_dir = ann_root / name
        first = gt_dir / (frames[0].stem + ".png")
        if not first.is_file():
            raise DataError(f"The first-frame mask {first} of sequence {name} does not exist.")
        out.append(VideoSequence(name=name, frames=frames, first_mask=first, gt_dir=gt_dir))
    return out


def is_video_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def folder_video(
    frames: str | os.PathLike, first_mask: str | os.PathLike, name: str | None = None
) -> VideoSequence:
    """A user's own video: a folder of frames (sorted by name) and the first frame's mask."""
    frames = Path(frames)
    if not frames.is_dir():
        raise DataError(f"The frames folder {frames} does not exist.")
    paths = sorted(p for p in frames.iterdir() if p.is_file() and is_image_file(p))
    if not paths:
        raise DataError(f"The frames folder {frames} holds no images.")
    first_mask = Path(first_mask)
    if not first_mask.is_file():
        raise DataError(f"The first-frame mask {first_mask} does not exist.")
    return VideoSequence(name=name or frames.name, frames=paths, first_mask=first_mask)


def decode_video(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Decode a video file into ``out_dir/00000.png ...`` with PyAV (``pip install 'dinokit[video]'``).

    Frames already decoded (same count, a marker written last) are reused.
    """
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise DataError(f"The video {path} does not exist.")
    marker = out_dir / ".decoded"
    if marker.is_file():
        frames = sorted(out_dir.glob("*.png"))
        if frames and marker.read_text().strip() == str(len(frames)):
            return frames
    try:
        import av
    except ImportError as e:
        raise DinokitError(
            f"Reading the video file {path} needs PyAV: pip install 'dinokit[video]' "
            "(or pass a folder of frames)."
        ) from e
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                p = out_dir / f"{i:05d}.png"
                frame.to_image().save(p)
                frames.append(p)
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise DataError(f"The video {path} cannot be decoded ({e}).") from e
    if not frames:
        raise DataError(f"The video {path} holds no frames.")
    marker.write_text(str(len(frames)))
    return frames
