"""Pictures without matplotlib: colour maps, mask overlays, contours, labelled grids and GIF/MP4 writing.

Everything works on numpy arrays (``uint8`` RGB images of shape (H, W, 3), float maps of shape
(H, W), boolean masks) and PIL images, so any command can reuse it.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.images import DecodeNeed, open_rgb
from .errors import DinokitError
from .io import atomic_open

if TYPE_CHECKING:
    from av.container import OutputContainer
    from av.video.stream import VideoStream

# Anchor colours sampled at 0, 1/8, ..., 1 of the perceptually uniform maps of van der Walt and
# Smith (viridis, inferno); linear interpolation between 9 anchors stays within a few levels of them.
_COLORMAP_ANCHORS = {
    "viridis": [
        (0.267004, 0.004874, 0.329415),
        (0.282623, 0.140926, 0.457517),
        (0.229739, 0.322361, 0.545706),
        (0.172719, 0.448791, 0.557885),
        (0.127568, 0.566949, 0.550556),
        (0.157851, 0.683765, 0.501686),
        (0.369214, 0.788888, 0.382914),
        (0.678489, 0.863742, 0.189503),
        (0.993248, 0.906157, 0.143936),
    ],
    "inferno": [
        (0.001462, 0.000466, 0.013866),
        (0.092949, 0.045670, 0.224763),
        (0.258234, 0.038571, 0.406485),
        (0.416331, 0.090203, 0.432943),
        (0.578304, 0.148039, 0.404411),
        (0.735683, 0.215906, 0.330245),
        (0.865006, 0.316822, 0.226055),
        (0.954506, 0.468744, 0.099874),
        (0.988362, 0.998364, 0.644924),
    ],
    "gray": [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
}
# inferno rises steeply at the top: two more anchors keep its orange-to-yellow part faithful
_INFERNO_TOP = [(0.9375, (0.978422, 0.557937, 0.034931)), (0.96875, (0.974417, 0.803235, 0.264564))]

COLORMAPS = tuple(_COLORMAP_ANCHORS)

# distinct colours for masks (the first ten are the familiar categorical ones); more are generated
_DISTINCT = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def colormap_table(name: str = "inferno", n: int = 256) -> np.ndarray:
    """An (n, 3) uint8 lookup table of the named colour map (viridis, inferno or gray)."""
    if name not in _COLORMAP_ANCHORS:
        raise ValueError(f"unknown colour map {name!r}; use one of {', '.join(COLORMAPS)}")
    anchors = np.asarray(_COLORMAP_ANCHORS[name], dtype=np.float64)
    pos = list(np.linspace(0.0, 1.0, len(anchors)))
    cols = list(anchors)
    if name == "inferno":
        for p, c in _INFERNO_TOP:
            i = int(np.searchsorted(pos, p))
            pos.insert(i, p)
            cols.insert(i, np.asarray(c))
    pos_a = np.asarray(pos)
    cols_a = np.stack(cols)
    x = np.linspace(0.0, 1.0, n)
    table = np.stack([np.interp(x, pos_a, cols_a[:, c]) for c in range(3)], axis=1)
    return np.clip(np.round(table * 255), 0, 255).astype(np.uint8)


def apply_colormap(
    values: np.ndarray, name: str = "inferno", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Colour a 2-D map: (H, W) floats -> (H, W, 3) uint8, scaled to [vmin, vmax] (its own range by default)."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(v)) if vmin is None else float(vmin)
    hi = float(np.nanmax(v)) if vmax is None else float(vmax)
    scaled = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    idx = np.clip(np.nan_to_num(scaled) * 255 + 0.5, 0, 255).astype(np.int64)
    return colormap_table(name)[idx]


def distinct_colors(n: int) -> np.ndarray:
    """``n`` clearly different RGB colours, (n, 3) uint8; the same n always gives the same colours."""
    cols = list(_DISTINCT[:n])
    k = 0
    while len(cols) < n:
        h = (k * 0.618033988749895 + 0.05) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85 if k % 2 == 0 else 0.6, 0.95)
        cols.append((int(r * 255), int(g * 255), int(b * 255)))
        k += 1
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


def upsample_nearest(grid: np.ndarray, factor: int) -> np.ndarray:
    """Repeat each cell of a (..., h, w) array ``factor`` times along both spatial axes."""
    return np.repeat(np.repeat(np.asarray(grid), factor, axis=-2), factor, axis=-1)


def boundaries(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The contour pixels of a boolean (H, W) mask: pixels of the mask with a neighbour outside it."""
    from skimage.segmentation import find_boundaries

    b = find_boundaries(np.asarray(mask, dtype=bool), mode="inner")
    if thickness > 1:
        from scipy.ndimage import binary_dilation

        b = binary_dilation(b, iterations=thickness - 1) & np.asarray(mask, dtype=bool)
    return b


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray],
    colors: np.ndarray | None = None,
    alpha: float = 0.5,
    contours: bool = True,
    thickness: int = 1,
) -> np.ndarray:
    """Blend each boolean mask onto an RGB image in its own colour and draw its contour.

    ``masks`` is (K, H, W); where masks overlap the later ones are drawn on top.
    """
    out = np.asarray(image, dtype=np.float32).copy()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    colors = distinct_colors(len(masks)) if colors is None else np.asarray(colors, dtype=np.uint8)
    for m, c in zip(masks, colors):
        if not m.any():
            continue
        out[m] = (1 - alpha) * out[m] + alpha * c.astype(np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if contours:
        for m, c in zip(masks, colors):
            if m.any():
                out[boundaries(m, thickness)] = c
    return out


def draw_contours(
    image: np.ndarray,
    labels: np.ndarray,
    color=(255, 255, 255),
    thickness: int = 1,
    ignore: Sequence[int] = (0,),
) -> np.ndarray:
    """Draw the outline of every labelled region of ``labels`` (H, W ints) on ``image`` in one colour."""
    out = np.asarray(image, dtype=np.uint8).copy()
    labels = np.asarray(labels)
    for v in np.unique(labels):
        if int(v) in ignore:
            continue
        out[boundaries(labels == v, thickness)] = color
    return out


def load_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` pixels; its small bitmap font where Pillow is older
    than 10.1 or has no FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def fit_text(text: str, font, width: float) -> str:
    """``text`` cut at the end (with "...") so that it is at most ``width`` pixels wide in ``font``."""
    text = str(text)
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..." if text else ""


def grid_shape(
    n: int, tile_aspect: float = 1.0, target_aspect: float = 4 / 3, header: int = 0
) -> tuple[int, int]:
    """(rows, cols) for ``n`` tiles of width/height ``tile_aspect``: few empty cells and a page close to
    ``target_aspect`` (6 square tiles -> 2x3, 12 -> 3x4, 16 -> 4x4). ``header`` tiles in one row
    above the grid count in the page's shape."""
    if n <= 0:
        raise ValueError("a grid needs at least one tile")
    best, best_score = (1, n), float("inf")
    for cols in range(1, n + 1):
        rows = -(-n // cols)
        empty = rows * cols - n
        if empty >= cols:  # a whole empty row
            continue
        width, height = max(cols, header), rows + (1 if header else 0)
        empty = width * height - n - header  # empty cells of the whole page
        score = abs(np.log(width * tile_aspect / height / target_aspect)) + 0.3 * empty
        if score < best_score - 1e-9:
            best, best_score = (rows, cols), score
    return best


def to_aspect(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A picture resampled (bilinear) to the proportions of ``size`` = (width, height), its height kept:
    a square network input shown at the photo's own aspect ratio."""
    arr = np.asarray(picture, dtype=np.uint8)
    h, w = arr.shape[:2]
    width = max(1, int(round(h * size[0] / max(1, size[1]))))
    if width == w:
        return arr
    return np.asarray(Image.fromarray(arr).resize((width, h), Image.Resampling.BILINEAR))


def enlarge(picture: np.ndarray, min_width: int) -> np.ndarray:
    """A picture narrower than ``min_width`` enlarged by the smallest whole factor that reaches it
    (nearest, so patches stay sharp); wider pictures unchanged."""
    arr = np.asarray(picture)
    w = arr.shape[1]
    if w >= min_width:
        return arr
    f = -(-min_width // max(1, w))
    return np.repeat(np.repeat(arr, f, axis=0), f, axis=1)


def blend_heatmap(
    image: np.ndarray, values: np.ndarray, cmap: str = "viridis", alpha: float = 0.6
) -> np.ndarray:
    """A 2-D map (the image's size, any range) coloured with ``cmap`` and blended over an RGB image:
    ``(1 - alpha) * image + alpha * colours``, the map scaled to its own range."""
    img = np.asarray(image, dtype=np.float32)
    heat = apply_colormap(values, cmap).astype(np.float32)
    if heat.shape[:2] != img.shape[:2]:
        raise ValueError(f"the map is {heat.shape[:2]} but the image is {img.shape[:2]}")
    return np.clip(np.round((1 - alpha) * img + alpha * heat), 0, 255).astype(np.uint8)


def caption_size(width: int) -> int:
    """The font size of a caption for a picture ``width`` pixels wide: about a twentieth of it, so the
    text keeps its size relative to the page, between 11 and 32 pixels."""
    return int(min(32, max(11, width // 20)))


def legend(colors: np.ndarray, labels: Sequence[str], width: int, font_size: int = 13) -> np.ndarray:
    """A white strip ``width`` pixels wide with a colour swatch and its label per entry, in as many rows
    as the width needs (the key of a mask picture drawn in :func:`distinct_colors`)."""
    font = load_font(font_size)
    sw, gap, pad, sep = font_size, max(6, font_size), 4, max(4, font_size // 3)
    items = [(tuple(int(v) for v in c), str(t)) for c, t in zip(np.asarray(colors), labels)]
    widths = [sw + sep + int(font.getlength(t)) + gap for _, t in items]
    rows: list[list[int]] = [[]]
    x = pad
    for i, w in enumerate(widths):
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append(i)
        x += w
    line = font_size + 6
    canvas = Image.new("RGB", (width, pad * 2 + line * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, idx in enumerate(rows):
        x, y = pad, pad + r * line
        for i in idx:
            color, text = items[i]
            draw.rectangle([x, y + 2, x + sw - 1, y + 1 + sw], fill=color, outline=(60, 60, 60))
            text = fit_text(text, font, width - x - sw - sep - pad)
            draw.text((x + sw + sep, y + 1), text, fill=(0, 0, 0), font=font)
            x += widths[i]
    return np.asarray(canvas)


def stack_vertical(pictures: Sequence[np.ndarray], pad: int = 4, background=(255, 255, 255)) -> np.ndarray:
    """Pictures one under the other, left-aligned on a background as wide as the widest."""
    pics = [np.asarray(p, dtype=np.uint8) for p in pictures]
    width = max(p.shape[1] for p in pics)
    height = sum(p.shape[0] for p in pics) + pad * (len(pics) - 1)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = background
    y = 0
    for p in pics:
        canvas[y : y + p.shape[0], : p.shape[1]] = p
        y += p.shape[0] + pad
    return canvas


def make_grid(
    tiles: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    cols: int | None = None,
    pad: int = 4,
    label_height: int | None = None,
    background=(255, 255, 255),
    min_tile: int = 160,
) -> np.ndarray:
    """Tile RGB pictures (resized to the first one's size) in rows of ``cols`` with a caption above each.

    ``cols`` None fits the grid to the number of tiles (:func:`grid_shape`). Tiles narrower than
    ``min_tile`` pixels are enlarged (nearest, so patches stay sharp) and captions are sized to the
    tile and cut to its width: text stays readable and never runs into the next caption.
    """
    if not tiles:
        raise ValueError("make_grid needs at least one picture")
    h, w = np.asarray(tiles[0]).shape[:2]
    if cols is None:
        cols = grid_shape(len(tiles), w / max(1, h))[1]
    if w < min_tile:
        scale = -(-min_tile // w)
        h, w = h * scale, w * scale
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    font_size = caption_size(w)
    lh = (label_height or font_size + 6) if labels else 0
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + lh + pad) + pad), background)
    draw = ImageDraw.Draw(canvas)
    font = load_font(font_size)
    for i, t in enumerate(tiles):
        pic = Image.fromarray(np.asarray(t, dtype=np.uint8))
        if pic.size != (w, h):
            pic = pic.resize((w, h), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (h + lh + pad)
        if labels:
            draw.text((x, y + 1), fit_text(labels[i], font, w), fill=(0, 0, 0), font=font)
        canvas.paste(pic, (x, y + lh))
    return np.asarray(canvas)


#: the confusion picture is drawn for at most this many classes
CONFUSION_MAX_CLASSES = 60


def draw_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> bool:
    """Draw a row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG.

    Returns False (and draws nothing) above ``CONFUSION_MAX_CLASSES`` classes.
    """
    k = len(classes)
    if k > CONFUSION_MAX_CLASSES:
        return False
    cell = max(10, min(48, 720 // k))
    font = ImageFont.load_default()
    names = [c if len(c) <= 16 else c[:15] + "~" for c in classes]
    label_w = max(int(font.getlength(n)) for n in names) + 10
    top = 40 + label_w  # column labels are written vertically
    left = label_w + 8
    subtitle = "rows: true class, columns: predicted class (row-normalised)"
    title = title or "Confusion matrix"
    width = max(left + k * cell + 20, int(max(font.getlength(title), font.getlength(subtitle))) + 16)
    height = top + k * cell + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 22), subtitle, fill=(90, 90, 90), font=font)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    for i in range(k):
        for j in range(k):
            v = float(frac[i, j])
            shade = (int(255 - 225 * v), int(255 - 170 * v), int(255 - 60 * v))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(225, 225, 225))
            if cell >= 24 and cm[i, j] > 0:
                txt = str(int(cm[i, j]))
                tw = font.getlength(txt)
                draw.text(
                    (x0 + (cell - tw) / 2, y0 + cell / 2 - 5),
                    txt,
                    fill="white" if v > 0.5 else "black",
                    font=font,
                )
        tw = font.getlength(names[i])
        draw.text((left - 6 - tw, top + i * cell + cell / 2 - 5), names[i], fill="black", font=font)
    for j in range(k):
        label = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(label).text((2, 1), names[j], fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (left + j * cell + (cell - 14) // 2, top - label_w - 4))
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
    return True


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array (RGB uint8, or a 2-D uint8/bool mask) as a PNG, atomically."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    with atomic_open(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")
    return path


class GifWriter:
    """An animated GIF written one frame at a time (constant memory), each frame with its own palette.

    Use as a context manager; ``add(frame)`` takes an RGB uint8 array. The file appears (atomically)
    when the writer is closed without an error.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 10.0, loop: int = 0):
        self.path = Path(path)
        self.duration_ms = max(20, int(round(1000.0 / fps)))
        self.loop = loop
        self.frames = 0
        self._ctx: AbstractContextManager[IO] | None = None
        self._f: IO | None = None
        self._size: tuple[int, int] | None = None

    def __enter__(self) -> GifWriter:
        self._ctx = atomic_open(self.path, "wb")
        self._f = self._ctx.__enter__()
        return self

    def add(self, frame: np.ndarray) -> None:
        from PIL import GifImagePlugin

        assert self._f is not None, "add() inside the with block"
        pic = Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
        if self._size is None:
            self._size = pic.size
        elif pic.size != self._size:
            pic = pic.resize(self._size, Image.Resampling.BILINEAR)
        q = pic.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
        if self.frames == 0:
            header, _ = GifImagePlugin.getheader(
                q.copy(), info={"loop": self.loop, "duration": self.duration_ms}
            )
            for chunk in header:
                self._f.write(chunk)
        for chunk in GifImagePlugin.getdata(q, duration=self.duration_ms, include_color_table=True):
            self._f.write(chunk)
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.frames == 0:
            exc_type, exc = ValueError, ValueError("no frames were written")
        assert self._ctx is not None and self._f is not None, "__exit__ after __enter__"
        if exc_type is None:
            self._f.write(b";")
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(exc_type, exc, tb)


class Mp4Writer:
    """An H.264 MP4 written one frame at a time through PyAV (the optional ``dinokit[video]`` extra)."""

    def __init__(self, path: str | os.PathLike, fps: float = 10.0):
        self.path = Path(path)
        self.fps = fps
        self.frames = 0
        self._container: OutputContainer | None = None
        self._stream: VideoStream | None = None
        self._tmp = self.path.with_name(f".{self.path.name}.tmp.mp4")

    def __enter__(self) -> Mp4Writer:

        try:
            import av
        except ImportError as e:
            raise DinokitError("Writing MP4 needs PyAV; install it with pip install 'dinokit[video]'.") from e
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
        self._stream.pix_fmt = "yuv420p"
        return self

    def add(self, frame: np.ndarray) -> None:
        import av

        assert self._container is not None and self._stream is not None, "add() inside the with block"
        arr = np.asarray(frame, dtype=np.uint8)
        h, w = arr.shape[:2]
        if self.frames == 0:
            self._stream.width, self._stream.height = w - w % 2, h - h % 2
        arr = arr[: self._stream.height, : self._stream.width]
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._container is not None and self._stream is not None, "__exit__ after __enter__"
        try:
            if exc_type is None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Near-duplicate contact sheets
# ---------------------------------------------------------------------------------------------
def _thumbnail(path: str, size: int) -> Image.Image:
    """An image shrunk to fit ``size`` x ``size`` for a contact sheet; a grey square for one that
    cannot be read."""
    try:
        im = open_rgb(path, DecodeNeed(long_side=size))  # a phone photo decoded at 1/8, not in full
    except DinokitError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    im.thumbnail((size, size))
    return im


def contact_sheet(
    pairs: Sequence, path: str | os.PathLike, max_pairs: int = 24, thumb: int = 160
) -> Path | None:
    """A PNG of the best ``max_pairs`` near-duplicate pairs (``image_a``, ``image_b``, ``score``; see
    :class:`dinokit.eval.duplicates.DuplicatePair`), one row each: the two images side by side
    and the score."""
    # here, not at the top: the image reader brings torch, which the other pictures do not need

    pairs = list(pairs)[:max_pairs]
    if not pairs:
        return None
    # captions read like the page's text when the sheet is shown at its own size (or shrunk to a page
    # 960 pixels wide): the score at about a ninth of a thumbnail's height, the names a little smaller
    big, small = load_font(max(15, thumb // 9)), load_font(max(13, thumb // 11))
    labels = []
    for pair in pairs:
        names = []
        for name in (pair.image_a, pair.image_b):
            label = "/".join(Path(name).parts[-2:])  # the folder tells apart copies that share a file name
            names.append(label if len(label) <= 44 else "..." + label[-41:])
        labels.append(names)
    pad = 8
    text_w = (
        int(max(big.getlength("00.  similarity 0.000"), *(small.getlength(n) for ns in labels for n in ns)))
        + 2 * pad
    )
    row_h = thumb + pad
    sheet = Image.new("RGB", (2 * thumb + text_w + 4 * pad, pad + row_h * len(pairs)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, pair in enumerate(pairs):
        y = pad + r * row_h
        for c, name in enumerate((pair.image_a, pair.image_b)):
            im = _thumbnail(name, thumb)
            x = pad + c * (thumb + pad)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        tx = 2 * (thumb + pad) + 2 * pad
        draw.text((tx, y + 4), f"{r + 1}.  similarity {pair.score:.3f}", fill=(0, 0, 0), font=big)
        line = int(small.size) + 6 if hasattr(small, "size") else 18
        for k, label in enumerate(labels[r]):
            draw.text(
                (tx, y + 12 + int(getattr(big, "size", 16)) + line * k), label, fill=(60, 60, 60), font=small
            )
    path = Path(path)
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path


def similar_sheet(
    rows: Sequence, path: str | os.PathLike, max_rows: int = 24, thumb: int = 128
) -> Path | None:
    """A PNG with one row per query: the query image, then its matches in rank order, each captioned
    with its rank, similarity and name (``rows``: :class:`dinokit.eval.similar.SimilarQuery`)."""
    rows = [r for r in rows if r.matches][:max_rows]
    if not rows:
        return None
    k = max(len(r.matches) for r in rows)
    pad, gap = 8, 12  # gap: the space between the query and its matches
    font = load_font(12)
    line = 15
    row_h = thumb + 2 * line + pad
    width = pad + thumb + gap + k * (thumb + pad)
    sheet = Image.new("RGB", (width, pad + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def tile(p: str) -> Image.Image:
        return _thumbnail(p, thumb)

    def put(p: str, x: int, y: int, first: str, second: str, bold: bool = False) -> None:
        im = tile(p)
        sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        if bold:
            draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + 1], outline=(31, 119, 180), width=2)
        draw.text((x, y + thumb + 2), fit_text(first, font, thumb), fill=(0, 0, 0), font=font)
        draw.text((x, y + thumb + 2 + line), fit_text(second, font, thumb), fill=(90, 90, 90), font=font)

    for r, q in enumerate(rows):
        y = pad + r * row_h
        put(q.query, pad, y, "query", Path(q.query).name, bold=True)
        for c, m in enumerate(q.matches):
            x = pad + thumb + gap + c * (thumb + pad)
            put(m.image, x, y, f"{m.rank}. {m.score:.3f}", "/".join(Path(m.image).parts[-2:]))
    path = Path(path)
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path
