"""``dinokit knn``: the paper's weighted k-NN classifier on frozen features."""

from __future__ import annotations

from typing import Annotated

import typer

from ._console import console, plural, print_table, setup_logging
from ._option_checks import require_inputs
from ._options import (
    Arch,
    BatchSize,
    CheckpointKey,
    Device,
    ExactDecode,
    Mean,
    NumWorkers,
    OptionalWeights,
    Output,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    Seed,
    Std,
    Strict,
    Train,
    TrainFeatures,
    Val,
    ValFeatures,
    config_from,
)
from ._progress import RichProgress
from .features import AvgPool, Crop, NLastBlocks, Resize


def parse_ks(text: str) -> tuple[int, ...]:
    from dinokit.errors import DinokitError

    try:
        ks = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise DinokitError(
            f"--k takes comma-separated positive integers such as 10,20,100,200, not {text!r}."
        ) from None
    if not ks or min(ks) < 1:
        raise DinokitError(
            f"--k takes comma-separated positive integers such as 10,20,100,200, not {text!r}."
        )
    return ks


def knn_rows(accuracies: dict, k_used: dict) -> tuple[list[list], bool]:
    """One row per k actually used: a k larger than the training set is cut to its size, and the ks
    cut to the same value share one row that names them ("24-NN (asked 100, 200)")."""
    rows: list[list] = []
    asked_for: dict[int, list[int]] = {}
    for k in accuracies:
        asked_for.setdefault(int(k_used.get(k, k)), []).append(k)
    cut = False
    for used, asked in asked_for.items():
        t1, t5 = accuracies[asked[0]]
        label = f"{used}-NN"
        if asked != [used]:
            cut = True
            label += f" (asked {', '.join(map(str, asked))})"
        rows.append([label, t1, t5])
    return rows, cut


def knn(
    output: Output,
    train: Train = None,
    val: Val = None,
    train_features: TrainFeatures = None,
    val_features: ValFeatures = None,
    weights: OptionalWeights = None,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    mean: Mean = None,
    std: Std = None,
    k: Annotated[str, typer.Option("--k", help="Numbers of neighbours, comma-separated.")] = "10,20,100,200",
    temperature: Annotated[
        float, typer.Option("--temperature", min=1e-6, help="Vote weight exp(sim / T).")
    ] = 0.07,
    n_last_blocks: NLastBlocks = 1,
    avgpool_patch_tokens: AvgPool = False,
    resize: Resize = 256,
    crop: Crop = 224,
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    exact_decode: ExactDecode = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Weighted k-NN on frozen features (paper Sec. 4.1): top-1/top-5 per k, per-class top-1, metrics.json.

    Features of --train/--val are cached in the output folder and reused while their fingerprint
    (weights, arch, transform, options, file list) matches.
    """
    options = dict(locals())  # the parsed options by name, before any other local
    from dinokit.io import prepare_output_dir, write_metrics

    setup_logging(quiet)
    ks = parse_ks(k)
    if train_features is None or val_features is None:  # images are read (both features files: none are)
        require_inputs(("folder", train), ("folder", val))
    out = prepare_output_dir(output, overwrite=overwrite)
    from dinokit.eval.knn import UNITS, KnnConfig, knn_eval  # torch: once the checks above passed
    from dinokit.runtime import cleanup_distributed, dist_env, init_distributed, resolve_device

    cfg = config_from(KnnConfig, options, output=out, ks=ks)
    if train_features is None:
        init_distributed(resolve_device(device))
    try:
        with RichProgress(quiet=quiet or not dist_env().is_main) as progress:
            result = knn_eval(cfg, progress)
        if not dist_env().is_main:
            return
        config = {
            **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "memory_budget"},
            "per_class_k": result.per_class_k,
            "k_used": {str(a): b for a, b in result.k_used.items()},
            "num_classes": result.num_classes,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "fingerprint": result.fingerprint,
        }
        path = write_metrics(out, result.metrics(), config, units=UNITS)
        rows, cut = knn_rows(result.accuracies, result.k_used)
        title = f"Weighted k-NN, T={temperature}"
        if cut:
            title += f" (k cut to the {plural(result.n_train, 'train image')})"
        print_table(title, ["k", "top-1 %", "top-5 %"], rows)
        console.print(
            f"{result.n_train} train and {plural(result.n_val, 'val image')}, {plural(result.num_classes, 'class')}",
            highlight=False,
        )
        if result.num_classes < 5:
            console.print(f"(with {result.num_classes} classes, top-5 counts all of them)", highlight=False)
        console.print(f"metrics: {path}", highlight=False)
    finally:
        cleanup_distributed()


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("knn")(knn)
