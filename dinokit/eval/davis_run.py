"""A DAVIS run: videos in, masks and scores out (``dinokit davis``).

The algorithm is :mod:`dinokit.eval.propagation`; this module is what surrounds it: the frames of a
video read and embedded in batches, the propagated masks written as indexed PNGs by a small thread
pool, finished videos marked so that a rerun skips them, the output folder checked against the
weights and settings of an earlier run (its fingerprint), video files decoded, overlays drawn
(``--visualize``) and the DAVIS 2017 J&F scored where ground truth exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoints import BackboneOptions, prepare_backbone, state_dict_fingerprint
from ..data.davis import (
    DAVIS_NORMALIZATION,
    VIDEO_EXTENSIONS,
    FrameDataset,
    VideoSequence,
    davis_sequences,
    decode_video,
    first_frame_labels,
    folder_video,
    frame_normalization,
    is_video_file,
    read_first_mask,
    read_mask,
    read_rgb,
    resize_labels_nearest,
)
from ..data.normalization import Normalization
from ..data.palette import VOID_LABEL, save_indexed_png, voc_colormap
from ..errors import DataError, DinokitError
from ..io import atomic_open, atomic_write_text, prepare_output_dir, to_json, write_json, write_metrics
from ..models.inference import inference_model
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, loader_workers, precision_name
from .davis_metrics import UNITS as DAVIS_UNITS
from .davis_metrics import DavisScores, boundary_map, score_sequence_folders
from .propagation import LabelPropagator, PropagationConfig, config_dict, patch_features, soft_labels_to_mask

log = logging.getLogger("dinokit")


# -- one video ------------------------------------------------------------------------------------
@dataclass
class SegmentationTimes:
    """Where the time of one video went (seconds)."""

    features: float = 0.0
    propagation: float = 0.0
    io: float = 0.0

    @property
    def total(self) -> float:
        return self.features + self.propagation + self.io


@dataclass
class VideoResult:
    name: str
    n_frames: int
    skipped: bool = False
    times: SegmentationTimes = field(default_factory=SegmentationTimes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: tokens per feature batch on a CPU: more frames per batch only leave the caches (measured with
#: ViT-S/16 on 832x480 frames, 1,561 tokens: 0.19 s/frame at 2 frames per batch, 0.27 at 8 in bf16)
CPU_BATCH_TOKENS = 4096


def auto_frame_batch(device: torch.device, tokens: int, dtype: torch.dtype | None = None) -> int:
    """Frames per feature batch for ``--batch-size 0``: 8 on a GPU; on a CPU about
    ``CPU_BATCH_TOKENS`` tokens in bf16 (2 frames at 480p with patch 16) and half as many in fp32
    (1 frame: 0.58 s/frame against 0.60 at 2 and 0.65 at 8)."""
    if torch.device(device).type != "cpu":
        return 8
    return max(1, (CPU_BATCH_TOKENS if dtype is not None else CPU_BATCH_TOKENS // 2) // tokens)


def segment_video(
    model: nn.Module,
    sequence: VideoSequence,
    out_dir: str | Path,
    config: PropagationConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 0,
    num_workers: int = 0,
    short_side: int = 480,
    fingerprint: str = "",
    progress: Progress = NULL_PROGRESS,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
    binary_mask: bool = False,
    norm: Normalization | None = None,
) -> VideoResult:
    """Segment one video into ``out_dir/<frame>.png``.

    Frames are read and resized by a data loader and embedded in batches; labels are propagated
    frame by frame; PNGs are written by a small thread pool. A finished video leaves
    ``out_dir/.done`` (with ``fingerprint``); a video whose marker matches is skipped. With
    ``binary_mask`` any nonzero pixel of the first mask is the one object (:func:`read_first_mask`).
    """
    config = config or PropagationConfig()
    config.validate()
    device = torch.device(device)
    if dtype is not None and config.similarity_dtype is None:
        # --precision bf16: the features are bf16 products already; so are their similarities
        config = replace(config, similarity_dtype=dtype)
    out_dir = Path(out_dir)
    marker = out_dir / ".done"
    names = [f.stem + ".png" for f in sequence.frames]
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("fingerprint") == fingerprint and all((out_dir / n).is_file() for n in names):
            return VideoResult(sequence.name, len(names), skipped=True)
    marker.unlink(missing_ok=True)
    times = SegmentationTimes()
    t0 = time.perf_counter()
    dataset = FrameDataset(sequence.frames, short_side=short_side, norm=norm)
    H, W = dataset.original_size
    mask = read_first_mask(sequence.first_mask, binary_mask)
    if mask.shape != (H, W):
        raise DataError(
            f"The first-frame mask {sequence.first_mask} is {mask.shape[1]}x{mask.shape[0]} pixels but "
            f"the frames of {sequence.name} are {W}x{H}."
        )
    patch_size = getattr(model, "patch_size", None)
    if not isinstance(patch_size, int):
        raise DinokitError("Label propagation needs a ViT backbone (patch features); ResNet-50 has none.")
    grid = (dataset.size[0] // patch_size, dataset.size[1] // patch_size)
    first_labels = first_frame_labels(mask, grid).to(device)
    batch_size = batch_size if batch_size > 0 else auto_frame_batch(device, grid[0] * grid[1] + 1, dtype)
    model, dtype = inference_model(model, dtype)  # bf16: a copy cast once, faster than autocast on CPUs
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _MaskWriter(out_dir, names, (H, W), on_frame)
    writer.write(0, mask)
    times.io += time.perf_counter() - t0

    workers = loader_workers(num_workers, device)
    if workers < num_workers:
        log.debug("%d frame loader worker(s) instead of %d: the compute threads take the other cores", workers,
                  num_workers)  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    propagator = LabelPropagator(config)
    task = progress.task(f"{sequence.name}", total=len(dataset))
    try:
        _segment_frames(model, patch_size, dtype, loader, propagator, first_labels, writer, times, task)
    except DinokitError as e:
        raise _unwrap_worker_error(e) from None
    finally:
        writer.close()
        task.close()
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "frames": len(names)}))
    return VideoResult(sequence.name, len(names), times=times)


def _unwrap_worker_error(e: DinokitError) -> DinokitError:
    """A data-loader worker re-raises our error with its traceback in the message: keep the sentence."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return type(e)(last.split(": ", 1)[1] if "Error: " in last else last)


class _MaskWriter:
    """Writes a video's masks at the frames' own size as indexed PNGs, in a small thread pool, so
    that the PNG encoding overlaps the propagation of the next frames; a failed write is raised at
    the next batch."""

    def __init__(self, out_dir: Path, names: list[str], size: tuple[int, int],
                 on_frame: Callable[[int, np.ndarray], None] | None) -> None:  # fmt: skip
        self.out_dir, self.names, self.size, self.on_frame = out_dir, names, size, on_frame
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.pending: list[Future] = []

    def write(self, index: int, labels: np.ndarray) -> None:
        """Frame ``index``'s labels, resized to the frame's size where they are smaller."""
        full = resize_labels_nearest(labels, self.size)
        self.pending.append(self.pool.submit(save_indexed_png, full, self.out_dir / self.names[index]))
        if self.on_frame is not None:
            self.on_frame(index, full)

    def check(self) -> None:
        """Forget the finished writes, raising the error of a failed one."""
        self.pending = [f for f in self.pending if not f.done() or f.result() is not None]

    def wait(self) -> None:
        for f in self.pending:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@torch.no_grad()
def _segment_frames(
    model: nn.Module,
    patch_size: int,
    dtype: torch.dtype | None,
    loader,
    propagator: LabelPropagator,
    first_labels: torch.Tensor,
    writer: _MaskWriter,
    times: SegmentationTimes,
    task,
) -> None:
    """Embed the frames batch by batch, propagate the labels frame by frame, hand the masks to ``writer``."""
    device = first_labels.device
    t_io = time.perf_counter()
    for frames, index in loader:
        t1 = time.perf_counter()
        times.io += t1 - t_io
        frames = frames.to(device, non_blocking=True)
        feats = patch_features(model, frames, dtype)
        _sync(device)
        t2 = time.perf_counter()
        times.features += t2 - t1
        masks = []
        for b in range(feats.shape[0]):
            i = int(index[b])
            if i == 0:
                propagator.start(feats[b], first_labels)
                continue
            soft = propagator.step(feats[b])
            masks.append((i, soft_labels_to_mask(soft, patch_size).to(torch.uint8)))
        host = [(i, m.cpu().numpy()) for i, m in masks]
        t3 = time.perf_counter()
        times.propagation += t3 - t2
        for i, m in host:
            writer.write(i, m)
        writer.check()
        task.advance(feats.shape[0])
        t_io = time.perf_counter()
        times.io += t_io - t3
    t4 = time.perf_counter()
    writer.wait()
    times.io += time.perf_counter() - t4


# -- pictures of a run (--visualize) ------------------------------------------------------------
def overlay_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend each object's DAVIS palette colour over the frame and draw its outline."""
    cmap = voc_colormap()
    out = rgb.astype(np.float32).copy()
    fg = (labels > 0) & (labels != VOID_LABEL)
    colours = cmap[labels].astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    for k in np.unique(labels[fg]):
        edge = boundary_map(labels == k)
        out[edge] = cmap[k]
    return out.clip(0, 255).astype(np.uint8)


def write_visualization(
    sequence: VideoSequence, result_dir: str | os.PathLike, vis_dir: str | os.PathLike, gif_width: int = 480
) -> Path:
    """``vis_dir/<seq>/<frame>.png`` overlays and ``vis_dir/<seq>.gif`` (10 frames per second)."""
    result_dir, vis_dir = Path(result_dir), Path(vis_dir)
    seq_dir = vis_dir / sequence.name
    seq_dir.mkdir(parents=True, exist_ok=True)
    gif_frames = []
    for f in sequence.frames:
        rgb = read_rgb(f)
        labels = read_mask(result_dir / (f.stem + ".png"), "result mask")
        img = Image.fromarray(overlay_labels(rgb, labels))
        with atomic_open(seq_dir / (f.stem + ".png"), "wb") as fh:
            img.save(fh, format="PNG")
        scale = min(1.0, gif_width / img.width)
        small = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR
        )
        gif_frames.append(small.convert("P", palette=Image.Palette.ADAPTIVE, colors=255))
    gif = vis_dir / f"{sequence.name}.gif"
    with atomic_open(gif, "wb") as fh:
        gif_frames[0].save(
            fh, format="GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0
        )
    return gif


# -- a whole run: videos in, masks + scores out -------------------------------------------------
@dataclass(kw_only=True)
class DavisRunConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit davis`` does: segment DAVIS sequences (or one video) and score them."""

    output: Path
    data: Path | None = None  #: a DAVIS 2017 root
    split: str = "val"
    sequences: list[str] | None = None
    frames: Path | None = None  #: a user's video: a folder of frames or a video file
    first_mask: Path | None = None
    binary_mask: bool = False  #: any nonzero pixel of a first-frame mask is the one object
    weights: str = "dino_vits16"
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    short_side: int = 480
    batch_size: int = 0  #: frames per feature batch; 0 = :func:`auto_frame_batch`
    visualize: bool = False
    overwrite: bool = False


@dataclass
class DavisRunResult:
    videos: list[VideoResult]
    scores: DavisScores | None  #: when ground truth exists
    metrics_path: Path | None
    output: Path


#: the run's fingerprint in its output folder: a rerun with other weights or settings is refused
RUN_MARKER = "davis_run.json"


def _run_sequences(cfg: DavisRunConfig) -> list[VideoSequence]:
    if cfg.data is not None and cfg.frames is not None:
        raise DinokitError("Give either --data (a DAVIS root) or --frames (your own video), not both.")
    if cfg.data is not None:
        return davis_sequences(cfg.data, cfg.split, cfg.sequences)
    if cfg.frames is None:
        raise DinokitError(
            "Give --data DAVIS_ROOT, or --frames DIR with --first-mask PNG for your own video."
        )
    if cfg.first_mask is None:
        raise DinokitError(
            f"--frames {cfg.frames} needs --first-mask: the indexed PNG mask of its first frame."
        )
    if not Path(cfg.first_mask).is_file():
        raise DataError(f"The first-frame mask {cfg.first_mask} does not exist.")
    frames = Path(cfg.frames)
    if frames.is_file() and is_video_file(frames):
        # decoded into the output folder once it is prepared (see run_davis)
        return [VideoSequence(name=frames.stem, frames=[], first_mask=Path(cfg.first_mask))]
    if frames.is_file():
        raise DataError(
            f"{frames} is neither a folder of frames nor a video file ({', '.join(VIDEO_EXTENSIONS)})."
        )
    return [folder_video(frames, cfg.first_mask)]


def _has_ground_truth(seq: VideoSequence) -> bool:
    if seq.gt_dir is None or not Path(seq.gt_dir).is_dir():
        return False
    return sum(1 for p in Path(seq.gt_dir).glob("*.png")) >= 3


def _run_fingerprint(cfg: DavisRunConfig, model: nn.Module, dtype: torch.dtype | None) -> str:
    """What the masks of a run depend on: the weights themselves and every setting that changes them."""
    settings = {
        "weights": state_dict_fingerprint(model.state_dict()),
        "patch_size": model.patch_size,
        "propagation": config_dict(cfg.propagation),
        "short_side": cfg.short_side,
        "precision": precision_name(dtype),
        # how 16-bit similarities are formed (cos - 1, see offset_features): results made otherwise
        # by an earlier version are not mixed with these on a rerun
        "similarities": "offset-1" if dtype is not None else "fp32",
    }
    if cfg.binary_mask:  # only when set: runs made before the option keep their fingerprint
        settings["binary_mask"] = True
    norm = frame_normalization(getattr(model, "normalization", None))
    if norm != DAVIS_NORMALIZATION:  # likewise: only another normalisation than the reference's
        settings["normalization"] = norm.record()
    return to_json(settings, indent=None)


def _claim_output(out: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse a folder that holds a run with another fingerprint (unless ``overwrite``); mark it ours."""
    marker = out / RUN_MARKER
    if marker.is_file() and not overwrite:
        try:
            earlier = json.loads(marker.read_text()).get("fingerprint")
        except ValueError:
            earlier = None
        if earlier != fingerprint:
            raise DinokitError(
                f"The output folder {out} holds a run with other weights or settings; pass --overwrite "
                "to replace its results or choose another folder."
            )
    write_json(marker, {"fingerprint": fingerprint})


def run_davis(cfg: DavisRunConfig, progress: Progress = NULL_PROGRESS) -> DavisRunResult:
    """Segment every sequence into ``OUT/<seq>/<frame>.png`` and score those with ground truth.

    Sequences finished by an earlier run with the same weights and settings are skipped.
    """
    cfg.propagation.validate()
    if cfg.short_side < 16:
        raise DinokitError("--image-size must be at least 16 pixels.")
    sequences = _run_sequences(cfg)
    for seq in sequences:  # a mask without objects is refused before any folder or model is made
        read_first_mask(seq.first_mask, cfg.binary_mask)
    out = Path(cfg.output)
    prepare_output_dir(out, overwrite=cfg.overwrite, resume=(out / RUN_MARKER).is_file())
    backbone = prepare_backbone(cfg)
    model, device, dtype = backbone.model, backbone.device, backbone.dtype
    if not hasattr(model, "patch_size"):
        raise DinokitError("Label propagation needs a ViT backbone (patch features); ResNet-50 has none.")
    fingerprint = _run_fingerprint(cfg, model, dtype)
    norm = frame_normalization(getattr(model, "normalization", None))
    _claim_output(out, fingerprint, cfg.overwrite)
    for seq in sequences:
        if not seq.frames:  # a video file
            assert cfg.frames is not None  # the only source of a video
            seq.frames = decode_video(cfg.frames, out / ".frames" / seq.name)

    videos = []
    scores = DavisScores(sequences=[])
    overall = progress.task("Videos", total=len(sequences)) if len(sequences) > 1 else None
    for seq in sequences:
        res_dir = out / seq.name
        res = segment_video(
            model, seq, res_dir, cfg.propagation, device, dtype, cfg.batch_size, cfg.num_workers,
            cfg.short_side, fingerprint, progress, binary_mask=cfg.binary_mask, norm=norm,
        )  # fmt: skip
        if res.skipped:
            progress.log(f"{seq.name}: already segmented in {res_dir}, skipped")
        videos.append(res)
        if cfg.visualize:
            write_visualization(seq, res_dir, out / "visualize")
        if seq.gt_dir is not None and _has_ground_truth(seq):
            objs = score_sequence_folders(seq.gt_dir, res_dir, seq.name)
            scores.sequences.append(seq.name)
            for key, o in objs.items():
                scores.per_object[key] = o.summary()
                scores.per_frame[key] = {"J": o.J, "F": o.F}
        if overall is not None:
            overall.advance(1)
    if overall is not None:
        overall.close()

    config = {
        "data": cfg.data, "frames": cfg.frames, "first_mask": cfg.first_mask,
        "binary_mask": cfg.binary_mask, "split": cfg.split,
        "sequences": [s.name for s in sequences], "weights": cfg.weights,
        "arch": getattr(model, "arch", cfg.arch), "patch_size": model.patch_size,
        "checkpoint_key": cfg.checkpoint_key, **config_dict(cfg.propagation), "short_side": cfg.short_side,
        "batch_size": cfg.batch_size, "device": str(device), "precision": precision_name(dtype), "seed": cfg.seed,
        "normalization": norm.record(),
    }  # fmt: skip
    path = _write_run_metrics(out, videos, scores, config, cfg.split)
    return DavisRunResult(
        videos=videos, scores=scores if scores.per_object else None, metrics_path=path, output=out
    )


def _write_run_metrics(
    out: Path, videos: list[VideoResult], scores: DavisScores, config: dict, split: str
) -> Path:
    """metrics.json (the scores where there were any, and where each video's time went) and the
    toolkit's CSVs."""
    timing = {
        v.name: {"frames": v.n_frames, "skipped": v.skipped, "features_s": v.times.features,
                 "propagation_s": v.times.propagation, "io_s": v.times.io}
        for v in videos
    }  # fmt: skip
    metrics: dict = {}
    if scores.per_object:
        metrics.update(scores.metrics())
        scores.write_csvs(out, split)
    else:
        metrics["scored"] = False
        metrics["note"] = "no ground truth beyond the first frame: masks written, nothing scored"
    metrics["videos"] = timing
    return write_metrics(out, metrics, config=config, units=DAVIS_UNITS if scores.per_object else None)
