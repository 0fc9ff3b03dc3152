"""``dinokit features``: embed a folder of images into a features file (for k-NN, linear probes or
other tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._console import console, console_err, plural, setup_logging
from ._option_checks import require_inputs, require_weights
from ._options import (
    Arch,
    BatchSize,
    CheckpointKey,
    Device,
    ExactDecode,
    Mean,
    NumWorkers,
    OptionalWeights,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    Seed,
    Std,
    Strict,
    config_from,
)
from ._progress import RichProgress

NLastBlocks = Annotated[
    int, typer.Option("--n-last-blocks", min=1, help="Concatenate the CLS tokens of the last n blocks.")
]
AvgPool = Annotated[
    bool,
    typer.Option("--avgpool-patch-tokens", help="Append the average of the last block's patch tokens."),
]
Resize = Annotated[
    int, typer.Option("--resize", min=1, help="Resize the short side to this (bicubic) before the crop.")
]
Crop = Annotated[
    int, typer.Option("--image-size", min=1, help="The centre crop in pixels: the size the network sees.")
]


def features(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="A labelled ImageFolder root or any folder of images.")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The features file: its ending says the format (.pt, .csv or "
            ".npy); a path without one is a folder that gets features.pt (or .csv, .npy with --format).",
        ),
    ],
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    n_last_blocks: NLastBlocks = 1,
    avgpool_patch_tokens: AvgPool = False,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            help="pt (one file for dinokit), npy (features.npy + paths.txt) or csv (one "
            "row per image: path, label, then the dimensions; for spreadsheets and pandas). Default: "
            "from --output's ending; one that disagrees with it is refused.",
            show_default=False,
        ),
    ] = None,
    resize: Resize = 256,
    crop: Crop = 224,
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for the compute (default: the cores other programs leave free).",
        ),
    ] = None,
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Embed every image of a folder (recursively) with the evaluation transform; under torchrun each
    process embeds a shard and the first writes the file."""
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.eval.feature_files import features_output
    from dinokit.io import check_output_file

    setup_logging(quiet)
    require_inputs(("folder", data))
    fmt, target = features_output(output, fmt)
    check_output_file(target, overwrite)
    require_weights(weights)
    from dinokit.eval.features import Embedder, FeatureSpec, save_features  # torch: once checked
    from dinokit.runtime import (
        cleanup_distributed,
        dist_env,
        embedding_precision,
        init_distributed,
        resolve_device,
    )

    spec = config_from(FeatureSpec, options, precision=embedding_precision(precision, device))
    init_distributed(resolve_device(device))
    try:
        embedder = Embedder(spec)
        try:
            with RichProgress(quiet=quiet or not dist_env().is_main) as progress:
                fs = embedder.embed(data, progress=progress)
        except KeyboardInterrupt:
            console_err.print(f"Stopped by Ctrl-C while embedding; nothing was written ({target} is written once "
                              "every image is embedded).", highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(130) from None
        if dist_env().is_main:
            written = save_features(fs, output, format=fmt, overwrite=overwrite)
            labelled = f", {plural(len(fs.classes), 'class')}" if fs.labels is not None else ""
            console.print(
                f"{plural(len(fs), 'image')}{labelled} -> {fs.dim}-d features: "
                + ", ".join(str(p) for p in written),
                highlight=False,
            )
    finally:
        cleanup_distributed()


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("features")(features)
