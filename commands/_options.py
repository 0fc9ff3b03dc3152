"""The options every command shares (same names and meaning everywhere), their help panels, and the
earlier and the DINO reference scripts' option names rewritten to dinokit's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from dinokit.presets import PRESETS

from ._console import console_err

#: options renamed for one vocabulary across commands: old name -> dinokit name, per command
#: ("*": every command that has the new name). The old names keep working, with a note.
RENAMED_OPTIONS: dict[str, dict[str, str]] = {
    "*": {"--crop": "--image-size", "--topk": "--k", "--neighbours": "--k", "--size": "--image-size"},
    "davis": {"--short-side": "--image-size"},
    "copydetect": {"--top": "--k"},
    "predict": {"--top": "--k"},
    "attn": {"--threshold": "--attention-mass"},
    "duplicates": {"--threshold": "--min-similarity"},
}

#: the DINO reference scripts' option names that mean the same as a dinokit option
REFERENCE_OPTIONS: dict[str, str] = {
    "--data_path": "--data",
    "--pretrained_weights": "--weights",
    "--output_dir": "--output",
    "--batch_size_per_gpu": "--batch-size",
    "--nb_knn": "--k",
    "--local_crops_number": "--local-crops",
    "--global_crops_scale": "--global-scale",
    "--local_crops_scale": "--local-scale",
    "--size_mask_neighborhood": "--neighborhood",
    "--use_cuda": None,  # type: ignore[dict-item]
}
REFERENCE_OPTIONS = {k: v for k, v in REFERENCE_OPTIONS.items() if v}

#: reference names that a command without their one-to-one option takes as two: the reference's
#: evaluations read DATA_PATH/train and DATA_PATH/val, which knn, linear and finetune take as two options
REFERENCE_SPLITS: dict[str, tuple[str, ...]] = {"--data_path": ("--train", "--val")}


def reference_instead(command, name: str) -> str | None:
    """What to give instead of a reference option ``name`` that ``command`` has no one-to-one option for
    (``--data_path`` in ``dinokit knn``: ``--train`` and ``--val``), or None."""
    own = {o for p in command.params for o in getattr(p, "opts", ())}
    split = REFERENCE_SPLITS.get(name)
    if not split or REFERENCE_OPTIONS.get(name) in own or not set(split) <= own:
        return None
    value = name.lstrip("-").upper()
    parts = [f"{opt} {value}/{opt.lstrip('-')}" for opt in split]
    return (f"dinokit {command.name} has no {name}: give {' and '.join(parts)} (the reference's {value} holds "
            f"{' and '.join(opt.lstrip('-') + '/' for opt in split)}).")  # fmt: skip


def rewrite_option_names(command, args: list[str]) -> list[str]:
    """Old dinokit names and the reference's names (``--patch_size``) replaced by the command's own,
    with a one-line note on stderr for each; anything after ``--`` is left alone."""
    own = {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    renamed = {**RENAMED_OPTIONS["*"], **RENAMED_OPTIONS.get(command.name or "", {})}
    out: list[str] = []
    noted: set[str] = set()
    args = list(args)
    i = -1
    while i + 1 < len(args):
        i += 1
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        name, eq, value = arg.partition("=")
        if name == "--nb_knn" and not eq:  # the reference's "--nb_knn 10 20 100 200" is "--k 10,20,100,200"
            values = []
            while i + 1 < len(args) and args[i + 1].isdigit():
                i += 1
                values.append(args[i])
            eq, value = ("=", ",".join(values)) if values else ("", "")
        new = None
        if name.startswith("--") and name not in own:
            candidate = renamed.get(name) or REFERENCE_OPTIONS.get(name) or name.replace("_", "-")
            if candidate in own:
                new = candidate
        if new is None:
            out.append(arg)
            continue
        if name not in noted:
            noted.add(name)
            console_err.print(
                f"Note: {name} is {new} in dinokit {command.name}.", highlight=False, soft_wrap=True
            )
        out.append(new + eq + value)
    return out


# -- from options to a config ----------------------------------------------------------------------
def config_from(cls, options: dict[str, Any], /, **values: Any):
    """The config ``cls`` (a dataclass) of a command's parsed options, matched by name: every field the
    config declares takes the option of the same name from ``options`` (the command's ``locals()`` taken
    at its first line); ``values`` give the fields whose value is converted or comes from elsewhere.
    Options the config has no field for (--quiet, the report's) are left out."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return cls(**{**{k: v for k, v in options.items() if k in names}, **values})


# -- shared options (same names and meaning in every command) ------------------------------------
#: help panels: a command's own options come first under "Options", the shared ones below these titles
BACKBONE_PANEL = "Backbone"
RUNTIME_PANEL = "Runtime"
RUN_PANEL = "Run folder and output"


def _preset_names() -> str:
    """Every released preset, from the preset table (so that the help stays true when one is added):
    DINO's by name, DINOv2's and DINOv3's as their first and last (``dinokit models`` lists all)."""
    groups: dict[str, list[str]] = {}
    for name in PRESETS:
        groups.setdefault(name.split("_", 1)[0], []).append(name)
    parts = [", ".join(groups.pop("dino", []))]
    parts += [
        f"{names[0]} ... {names[-1]}" if len(names) > 2 else ", ".join(names) for names in groups.values()
    ]
    return "; ".join(p for p in parts if p)


PRESET_NAMES = _preset_names()

Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        rich_help_panel=BACKBONE_PANEL,
        help="vit_tiny, vit_small, vit_base, resnet50, or a DINOv2/DINOv3 hub name such as "
        "dinov2_vits14, dinov2_vits14_reg, dinov3_vits16 (default: read from --weights; "
        "dinokit models lists them all).",
    ),
]
PatchSize = Annotated[
    int | None,
    typer.Option(
        "--patch-size",
        rich_help_panel=BACKBONE_PANEL,
        help="ViT patch size in pixels (default: read from --weights).",
    ),
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        rich_help_panel=BACKBONE_PANEL,
        help=f"A checkpoint file, a Hugging Face repo id, a preset ({PRESET_NAMES}) or 'random'.",
    ),
]
CheckpointKey = Annotated[
    str,
    typer.Option(
        "--checkpoint-key",
        rich_help_panel=BACKBONE_PANEL,
        help="Which weights of a training checkpoint: teacher or student.",
    ),
]
Output = Annotated[
    Path, typer.Option("--output", "-o", rich_help_panel=RUN_PANEL, help="The run folder for results.")
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", min=1, rich_help_panel=RUNTIME_PANEL, help="Images per batch (per process)."
    ),
]
NumWorkers = Annotated[
    int,
    typer.Option(
        "--num-workers", min=0, rich_help_panel=RUNTIME_PANEL, help="Data-loading worker processes."
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device", rich_help_panel=RUNTIME_PANEL, help="auto (cuda, then mps, then cpu), cpu, cuda or mps."
    ),
]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        rich_help_panel=RUNTIME_PANEL,
        help="auto, fp32, bf16 or fp16. auto = bf16 for training where the hardware has native bf16, "
        "and for embeddings (features, similar, duplicates, attention maps) on a CPU with it; fp32 for "
        "the protocols' evaluations.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=RUNTIME_PANEL, help="Random seed.")]
OptionalWeights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        rich_help_panel=BACKBONE_PANEL,
        help=f"A checkpoint file, a Hugging Face repo id, a preset ({PRESET_NAMES}) or 'random' "
        "(a randomly initialised baseline); needed wherever images are embedded.",
    ),
]
Train = Annotated[
    Path | None, typer.Option("--train", help="Labelled training images (ROOT/<class>/<image>).")
]
Val = Annotated[Path | None, typer.Option("--val", help="Labelled validation images (ROOT/<class>/<image>).")]
TrainFeatures = Annotated[
    Path | None,
    typer.Option("--train-features", help="A features file from dinokit features (instead of --train)."),
]
ValFeatures = Annotated[
    Path | None,
    typer.Option("--val-features", help="A features file from dinokit features (instead of --val)."),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", rich_help_panel=RUN_PANEL, help="Continue the run in --output from its checkpoint."
    ),
]
StopAfter = Annotated[
    int | None,
    typer.Option(
        "--stop-after",
        min=1,
        rich_help_panel=RUN_PANEL,
        help="End cleanly after N epochs of the schedule (resumable).",
    ),
]
CheckpointMinutes = Annotated[
    float,
    typer.Option(
        "--checkpoint-minutes",
        min=0.0,
        rich_help_panel=RUN_PANEL,
        help="Also write checkpoint.pth every this many minutes within an epoch, so that a killed run "
        "loses at most that much (0: only at the end of each epoch).",
    ),
]
Whitening = Annotated[
    Path | None, typer.Option("--whitening", help="A folder of other images to learn the whitening on.")
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        rich_help_panel=RUN_PANEL,
        show_default=False,
        help="Where image descriptors are stored, one store per weights and settings, shared by "
        "duplicates and similar runs (default: $DINOKIT_CACHE_DIR, else ~/.cache/dinokit/embeddings).",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", rich_help_panel=RUN_PANEL, help="Write into an output that already holds results."
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=RUN_PANEL, help="No progress bars.")]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        rich_help_panel=RUN_PANEL,
        help="Stop at the first unreadable image (by default unreadable images are skipped and counted).",
    ),
]
ExactDecode = Annotated[
    bool,
    typer.Option(
        "--exact-decode",
        rich_help_panel=RUNTIME_PANEL,
        help="Decode every JPEG at full size. By default a large JPEG is decoded at the reduced scale "
        "(1/2, 1/4 or 1/8) that still covers the resize, several times faster; images already small "
        "are decoded in full either way.",
    ),
]


def _channels(name: str, text: str | None) -> tuple[float, float, float] | None:
    """Three comma-separated numbers, one per channel, checked: a std above 0, a mean in [0, 1]."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise typer.BadParameter(f"takes three comma-separated numbers such as 0.485,0.456,0.406, not {text!r}",
                                 param_hint=name) from None  # fmt: skip
    if len(values) != 3:
        raise typer.BadParameter(
            f"takes three values, one per channel (R,G,B), not {len(values)}", param_hint=name
        )
    if name == "--std" and min(values) <= 0:
        raise typer.BadParameter(f"takes three positive values, not {text}", param_hint=name)
    if name == "--mean" and not all(0.0 <= v <= 1.0 for v in values):
        raise typer.BadParameter(f"takes three values in [0, 1] (of pixel values scaled to [0, 1]), not {text}",
                                 param_hint=name)  # fmt: skip
    return values  # type: ignore[return-value]


Mean = Annotated[
    str | None,
    typer.Option(
        "--mean",
        rich_help_panel=BACKBONE_PANEL,
        callback=lambda v: _channels("--mean", v),
        help="The per-channel mean the images are normalised with, R,G,B (default: the weights' own: "
        "ImageNet's 0.485,0.456,0.406, or DINOv3's satellite values for its SAT-493M weights).",
    ),
]
Std = Annotated[
    str | None,
    typer.Option(
        "--std",
        rich_help_panel=BACKBONE_PANEL,
        callback=lambda v: _channels("--std", v),
        help="The per-channel standard deviation, R,G,B (default: the weights' own, as --mean).",
    ),
]
