"""Plain helpers shared by test files in several folders: tiny images and models written to disk, the
one in-process CLI runner, and the hostile files (decompression bombs, COCO annotations, the coins
photograph) that both the unit tests and the end-to-end tests feed in."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import dinokit
from dinokit.eval.features import FeatureSet
from dinokit.models import VisionTransformer
from dinokit.train.pretrain import PretrainConfig


def make_image(path: Path, size=(40, 40), seed: int = 0, color=None) -> Path:
    """A noise picture of ``size`` (seeded), with a centred square of ``color`` when one is given."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    if color is not None:
        arr[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def save_tiny_vit(path: Path, depth: int = 12) -> Path:
    """A random vit_tiny/16 (seed 0) with ``depth`` blocks, saved in the released-weights format."""
    torch.manual_seed(0)
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=depth), path)
    return path


def tiny_vit(depth: int = 2, patch: int = 16, seed: int = 0, **kw) -> VisionTransformer:
    """A random vit_tiny (seeded) with ``depth`` blocks, in eval mode."""
    torch.manual_seed(seed)
    return dinokit.build_backbone("vit_tiny", patch, depth=depth, **kw).eval()


def run_cli(args, catch_exceptions: bool = True):
    """Run the dinokit CLI in-process; ``.text`` is the output with rich's line wrapping undone.
    ``catch_exceptions=False`` lets an unexpected exception end the test with its traceback."""
    from dinokit.commands import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=catch_exceptions)
    r.text = " ".join(r.output.split())
    return r


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes: two runs made the same files or not."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- training runs ------------------------------------------------------------------------------------
def tiny_pretrain_config(images, out, **kw) -> PretrainConfig:
    """The pretraining config of the tiny runs: a 2-block vit_tiny on 32x32 and 16x16 crops, two epochs."""
    return PretrainConfig(
        data=str(images),
        output=str(out),
        arch="vit_tiny",
        depth=2,
        batch_size=8,
        out_dim=256,
        local_crops=2,
        global_size=32,
        local_size=16,
        precision="fp32",
        num_workers=0,
        epochs=2,
        **kw,
    )


def load_state(path: Path) -> dict:
    """A checkpoint or model file, read as the library reads it (tensors only, on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    """Two fine-tuned ``model.pth`` files hold bitwise the same backbone and head."""
    ma, mb = load_state(a), load_state(b)
    for part in ("backbone", "head"):
        assert ma[part].keys() == mb[part].keys()
        for k in ma[part]:
            assert torch.equal(ma[part][k], mb[part][k]), f"{part}.{k} differs"


def log_lines(run: Path) -> list[dict]:
    """A training run's log.jsonl without its timings (the numbers two equal runs share)."""
    lines = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in lines]


class SignalAfter:
    """A progress sink that sends this process a signal after ``n`` training steps."""

    def __init__(self, n: int, signum: int = signal.SIGTERM):
        self.n, self.signum, self.steps = n, signum, 0
        outer = self

        class Task:
            def __init__(self, training):
                self.training = training

            def advance(self, k=1, **fields):
                if self.training and fields:
                    outer.steps += k
                    if outer.steps == outer.n:
                        os.kill(os.getpid(), outer.signum)

            def update(self, **fields):
                pass

            def close(self):
                pass

        self._task = Task

    def task(self, description, total=None):
        return self._task(description.startswith("epoch"))

    def log(self, message):
        pass


# -- hostile images ---------------------------------------------------------------------------------
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A real side x side 1-bit palette PNG of ~50 KB (what Pillow would decode to side**2 pixels),
    written row by row so that making it costs neither the memory nor the time of the picture."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed 1-bit indices
    z = zlib.compressobj(1)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0))
        + _png_chunk(b"PLTE", bytes(6))
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )
    return path


@contextlib.contextmanager
def memory_headroom(extra: int = 1 << 30):
    """Cap the process's data segment at its present size plus ``extra`` for the block, so that code
    which would allocate without bound fails at once instead of eating the machine."""
    try:
        import resource
    except ImportError:  # not on this platform: nothing to cap
        yield
        return
    status = Path("/proc/self/status")
    if not status.is_file():
        yield
        return
    used_kb = next(
        int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmData:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used_kb * 1024 + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# -- COCO annotations -------------------------------------------------------------------------------
COCO_H, COCO_W = 20, 18  # the size of the one image the COCO annotation file describes


def black_image(path, size=(12, 10)):
    """An all-black RGB picture: a stand-in image where only its size and name matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def rle_counts(mask: np.ndarray) -> list[int]:
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


def coco_file(tmp_path):
    """A COCO annotation file for one 18x20 image: a polygon, an uncompressed and a compressed RLE and a
    crowd region, with the masks built by hand that each should decode to."""
    from pycocotools import mask as mask_utils

    poly = np.zeros((COCO_H, COCO_W), bool)
    poly[3:9, 2:7] = True  # the polygon below covers x in [2, 7), y in [3, 9)
    rle_m = np.zeros((COCO_H, COCO_W), bool)
    rle_m[0:2, 0:10] = True
    rle_m[9:12, 6:9] = True
    comp_m = np.zeros((COCO_H, COCO_W), bool)
    comp_m[10:12, 0:3] = True
    crowd_m = np.zeros((COCO_H, COCO_W), bool)
    crowd_m[5:7, 8:10] = True
    comp = mask_utils.encode(np.asfortranarray(comp_m.astype(np.uint8)))
    comp["counts"] = comp["counts"].decode("ascii")
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": COCO_H, "width": COCO_W}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [[2, 3, 7, 3, 7, 9, 2, 9]],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": {"size": [COCO_H, COCO_W], "counts": rle_counts(rle_m)},
            },
            {"id": 3, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": comp},
            {
                "id": 4,
                "image_id": 7,
                "category_id": 5,
                "iscrowd": 1,
                "segmentation": {"size": [COCO_H, COCO_W], "counts": rle_counts(crowd_m)},
            },
        ],
        "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    black_image(tmp_path / "images" / "a.jpg", size=(COCO_W, COCO_H))
    return path, data, {"poly": poly, "rle": rle_m, "comp": comp_m, "crowd": crowd_m}


# -- the coins photograph ---------------------------------------------------------------------------
def coins_ground_truth(tmp_path):
    """scikit-image's coins photograph and its coins segmented here: dark and bright thresholds as
    markers, a watershed on the Sobel edges, holes filled, connected components: one object per coin."""
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    img = data.coins()
    markers = np.zeros(img.shape, np.int32)
    markers[img < 30] = 1
    markers[img > 150] = 2
    fg = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(img), markers) == 2)
    comp = measure.label(fg, connectivity=2)
    sizes = np.bincount(comp.ravel())
    keep = [c for c in np.flatnonzero(sizes >= 150) if c != 0]  # drop specks
    labels = np.zeros(comp.shape, np.int32)
    for new, old in enumerate(keep, 1):
        labels[comp == old] = new
    assert labels.max() == 24  # the picture shows 24 coins
    image_path = tmp_path / "images" / "coins.jpg"
    image_path.parent.mkdir(parents=True)
    Image.fromarray(img).convert("RGB").save(image_path, quality=95)
    mask_path = tmp_path / "masks" / "coins.png"
    mask_path.parent.mkdir(parents=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(mask_path)
    return image_path, mask_path, labels


# -- copy detection -----------------------------------------------------------------------------------
def ap_from_relevance(relevance: list[int], n_pos: int) -> float:
    """The trapezoid rule on the precision-recall curve, walked item by item."""
    ap, hits = 0.0, 0
    for r, rel in enumerate(relevance):
        if rel:
            p_before = 1.0 if r == 0 else hits / r
            hits += 1
            p_after = hits / (r + 1)
            ap += (p_before + p_after) / 2 / n_pos
    return ap


def smooth_photo(seed: int, size=64) -> Image.Image:
    """A smooth random picture: 8x8 noise upsampled bicubically and blurred."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return img.filter(ImageFilter.GaussianBlur(1))


def make_copydays(root: Path, n_groups: int = 4) -> Path:
    """original/{g}00.jpg, strong/{g}01.jpg (+ {g}02 for the first group), jpegqual/{10,50}, crops/50."""
    for g in range(n_groups):
        group = 2000 + g
        img = smooth_photo(g)
        name = f"{group:04d}00.jpg"
        for sub in ("original",):
            (root / sub).mkdir(parents=True, exist_ok=True)
            img.save(root / sub / name, quality=95)
        for q in (10, 50):
            (root / "jpegqual" / str(q)).mkdir(parents=True, exist_ok=True)
            img.save(root / "jpegqual" / str(q) / name, quality=q)
        (root / "crops" / "50").mkdir(parents=True, exist_ok=True)
        img.crop((8, 8, 56, 56)).save(root / "crops" / "50" / name, quality=90)
        (root / "strong").mkdir(parents=True, exist_ok=True)
        img.rotate(10).filter(ImageFilter.GaussianBlur(2)).save(root / "strong" / f"{group:04d}01.jpg")
        if g == 0:
            Image.eval(img, lambda v: 255 - v).save(root / "strong" / f"{group:04d}02.jpg")
    (root / "notes").mkdir(exist_ok=True)  # other folders are ignored
    return root


# -- linear probe and retrieval ------------------------------------------------------------------------
def feature_clusters(n_per_class, classes, dim, seed, spread=0.3):
    """A feature file's content: ``classes`` Gaussian clusters of ``n_per_class`` points in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    names = [f"c{i}" for i in range(classes)]
    fp = {"weights": "random(seed=0)", "arch": "vit_tiny", "n_last_blocks": 1, "avgpool_patch_tokens": False}
    return FeatureSet(feats, labels, names, [f"{i}.png" for i in range(len(labels))], fp)


def shifted_retrieval_scores(ranking, positives, junk, kappas=(1, 5, 10)):
    """The other way to ignore junk: positions of positives in the full ranking, each moved up by the
    number of junk images ranked before it; then trapezoids, and precision at min(k, last positive)."""
    ranking = list(ranking)
    pos = [r for r, idx in enumerate(ranking) if idx in set(positives)]
    jpos = [r for r, idx in enumerate(ranking) if idx in set(junk) and idx not in set(positives)]
    shifted = [p - sum(1 for j in jpos if j < p) for p in pos]
    ap = 0.0
    for i, r in enumerate(shifted):
        p0 = 1.0 if r == 0 else i / r
        p1 = (i + 1) / (r + 1)
        ap += (p0 + p1) * (1.0 / len(positives)) / 2
    one = np.array(shifted) + 1
    prs = [float((one <= min(one.max(), k)).sum()) / min(one.max(), k) for k in kappas]
    return ap, prs


def oxford_ground_truth(n_db=8, nq=2):
    """A revisited-Oxford ground-truth dict (the ``gnd_*.pkl`` content) for ``nq`` queries."""
    return {
        "imlist": [f"db_{i}" for i in range(n_db)],
        "qimlist": [f"q_{i}" for i in range(nq)],
        "gnd": [
            {"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [4.0, 4.0, 60.0, 60.0]},
            {
                "easy": np.array([4], dtype=np.int64),
                "hard": np.array([5, 6], dtype=np.int64),
                "junk": np.array([], dtype=np.int64),
                "bbx": np.array([0.0, 0.0, 64.0, 48.0]),
            },
        ][:nq],
    }
