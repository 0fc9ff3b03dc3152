"""``dinokit davis``: video object segmentation by label propagation (DAVIS 2017, semi-supervised)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, plural, setup_logging
from ._options import (
    BACKBONE_PANEL,
    PRESET_NAMES,
    Arch,
    CheckpointKey,
    Device,
    Mean,
    NumWorkers,
    Output,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    Seed,
    Std,
    config_from,
)
from ._progress import RichProgress
from .davis_score import print_davis_table

#: the file that marks a folder as a davis run's (dinokit.eval.davis_run.RUN_MARKER, named here without its imports)
RUN_MARKER = "davis_run.json"


def davis(
    output: Output,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="A DAVIS 2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017)."),
    ] = None,
    frames: Annotated[
        Optional[Path],
        typer.Option(
            "--frames", help="Your own video: a folder of frames, or a video file (needs dinokit[video])."
        ),
    ] = None,
    first_mask: Annotated[
        Optional[Path],
        typer.Option(
            "--first-mask",
            help="With --frames: the first frame's indexed PNG mask (0 = background, k = object k, 255 = void).",
        ),
    ] = None,
    binary_mask: Annotated[
        bool,
        typer.Option(
            "--binary-mask",
            help="Read any nonzero pixel of the first-frame mask as one object (a white-on-black mask).",
        ),
    ] = False,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            "-w",
            rich_help_panel=BACKBONE_PANEL,
            help=f"A checkpoint file, a preset ({PRESET_NAMES}) or 'random'; dino_vits16 by default, the "
            "weights the reference evaluation loads when given none.",
        ),
    ] = "dino_vits16",
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="The DAVIS split whose sequences are segmented (ImageSets/2017/<split>.txt)."
        ),
    ] = "val",
    sequences: Annotated[
        Optional[str],
        typer.Option("--sequences", help="Only these sequences, comma-separated (e.g. bmx-trees,dogs-jump)."),
    ] = None,
    n_last_frames: Annotated[
        int, typer.Option("--n-last-frames", min=0, help="Previous frames in the context, besides the first.")
    ] = 7,
    neighborhood: Annotated[
        int, typer.Option("--neighborhood", min=0, help="Window radius in patches (0 = the whole frame).")
    ] = 12,
    topk: Annotated[int, typer.Option("--k", min=1, help="Neighbours kept jointly over the context.")] = 5,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Affinity = exp(cos / temperature).")
    ] = 0.1,
    short_side: Annotated[
        int, typer.Option("--image-size", min=16, help="The frames' short side in pixels (480 as the paper).")
    ] = 480,
    visualize: Annotated[
        bool, typer.Option("--visualize", help="Also write overlay PNGs and an animated GIF per sequence.")
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=0,
            help="Frames per feature batch; 0 = auto: 8 on a GPU, about 4,000 tokens on a CPU (2 frames at 480p "
            "with patch 16), where larger batches run slower.",
        ),
    ] = 0,
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Segment videos from their first frame's masks by label propagation between patch features,
    then score them as DAVIS 2017 does where ground truth exists.

    Writes OUT/<seq>/<frame>.png (indexed, DAVIS palette), OUT/metrics.json (J&F as fractions),
    OUT/global_results-<split>.csv and OUT/per-sequence_results-<split>.csv. A rerun skips the
    sequences already finished with the same weights and settings.
    """
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import check_run_folder

    setup_logging(quiet)
    # a folder holding an earlier run's marker is continued, as run_davis does once it takes the folder
    check_run_folder(output, overwrite, resume=(Path(output) / RUN_MARKER).is_file())
    from dinokit.eval.davis_run import DavisRunConfig, run_davis  # torch: once the checks above passed
    from dinokit.eval.propagation import PropagationConfig

    names = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    cfg = config_from(
        DavisRunConfig, options, sequences=names, propagation=config_from(PropagationConfig, options)
    )
    with RichProgress(quiet=quiet) as progress:
        result = run_davis(cfg, progress)
    n_frames = sum(v.n_frames for v in result.videos)
    skipped = sum(v.skipped for v in result.videos)
    if result.scores is not None:
        print_davis_table(result.scores)
    console.print(
        f"{plural(len(result.videos), 'video')}, {plural(n_frames, 'frame')}"
        + (f" ({skipped} already done)" if skipped else "")
        + f"; masks in {result.output}/<seq>/, metrics in {result.metrics_path}",
        highlight=False,
    )


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("davis")(davis)
