"""``dinokit synth classify|video|copydays|segment``: the built-in data sets, generated offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._console import console, plural, print_table, setup_logging
from ._options import RUN_PANEL, Overwrite, Quiet
from ._progress import RichProgress

Output = Annotated[
    Path,
    typer.Option("--output", "-o", rich_help_panel=RUN_PANEL, help="The folder the data set is written to."),
]
Seed0 = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives byte-identical files.")]


def classify(
    output: Output,
    classes: Annotated[
        int, typer.Option("--classes", min=1, help="Number of shape classes (up to 72).")
    ] = 10,
    per_class: Annotated[
        int, typer.Option("--per-class", min=1, help="Images per class (train + val).")
    ] = 100,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", min=0.0, max=0.99, help="Fraction of each class held out for val."),
    ] = 0.2,
    size: Annotated[int, typer.Option("--image-size", min=16, help="Image side in pixels.")] = 96,
    style: Annotated[
        str,
        typer.Option(
            "--style",
            help="cluttered: textured objects over photographs/clutter; simple: flat-coloured objects on "
            "smooth low-contrast backgrounds (learnable by a few minutes of pretraining).",
        ),
    ] = "cluttered",
    class_colour: Annotated[
        float,
        typer.Option(
            "--class-colour",
            help="With --style simple: fraction of images whose object hue follows the class (a noisy cue).",
        ),
    ] = 0.0,
    class_texture: Annotated[
        float,
        typer.Option(
            "--class-texture",
            help="With --style simple: fraction of images whose object carries its class's surface pattern.",
        ),
    ] = 0.0,
    background: Annotated[
        str,
        typer.Option(
            "--background",
            help="With --style simple: random (a colour per image) or grey (one colour for all, so that "
            "the object is what tells images apart).",
        ),
    ] = "random",
    seed: Seed0 = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a shape-classification set: ImageFolder roots DIR/train and DIR/val plus exact object masks.

    Each image shows one textured shape (circle, square, triangle, star, ...) over a photograph or
    clutter; the class is the shape. Masks: DIR/masks/<split>/<class>/<name>.png (0 background, 1 object).
    """
    from dinokit.data.synth_output import check_synth_output

    setup_logging(quiet)
    check_synth_output(output, overwrite)  # refused at once, before numpy and PIL load
    from dinokit.data.synth import make_classify_dataset

    with RichProgress(quiet=quiet) as progress:
        s = make_classify_dataset(
            output,
            classes=classes,
            per_class=per_class,
            val_fraction=val_fraction,
            size=size,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            style=style,
            class_colour=class_colour,
            class_texture=class_texture,
            background=background,
        )
    print_table(
        "dinokit synth classify",
        ["what", "where", "images"],
        [
            ["train", str(s.train_dir), s.n_train],
            ["val", str(s.val_dir), s.n_val],
            ["masks", str(s.mask_dir), s.n_train + s.n_val],
        ],
    )
    console.print(
        f"{plural(len(s.classes), 'class')} ({', '.join(s.classes)}), {s.size}x{s.size} px, seed {s.seed}, "
        f"{s.seconds:.1f} s.",
        highlight=False,
    )


def video(
    output: Output,
    sequences: Annotated[int, typer.Option("--sequences", min=1, help="Number of video sequences.")] = 3,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per sequence.")] = 20,
    height: Annotated[int, typer.Option("--height", min=16, help="Frame height in pixels.")] = 480,
    width: Annotated[int, typer.Option("--width", min=16, help="Frame width in pixels.")] = 854,
    objects: Annotated[
        str, typer.Option("--objects", help="Objects per sequence: a number or a range such as 1-3.")
    ] = "1-3",
    seed: Seed0 = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write DAVIS-2017-layout videos of moving textured objects over photographs, with exact masks.

    DIR/JPEGImages/480p/<seq>/00000.jpg, DIR/Annotations/480p/<seq>/00000.png (indexed, DAVIS palette,
    every frame annotated), DIR/ImageSets/2017/val.txt.
    """
    from dinokit.data.synth_output import check_synth_output

    setup_logging(quiet)
    check_synth_output(output, overwrite)  # refused at once, before numpy and PIL load
    from dinokit.data.synth_video import make_video_dataset

    with RichProgress(quiet=quiet) as progress:
        s = make_video_dataset(
            output,
            sequences=sequences,
            frames=frames,
            height=height,
            width=width,
            objects=objects,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        )
    print_table(
        "dinokit synth video",
        ["sequence", "frames", "objects"],
        [[name, s.frames, s.n_objects[name]] for name in s.sequences],
    )
    console.print(
        f"{plural(len(s.sequences), 'sequence')} of {s.width}x{s.height} in {s.root} (DAVIS 2017 layout, split val), "
        f"seed {s.seed}, {s.seconds:.1f} s.",
        highlight=False,
    )


def copydays(
    output: Output,
    originals: Annotated[
        int, typer.Option("--originals", min=1, help="Number of original images (groups).")
    ] = 30,
    distractors: Annotated[
        int,
        typer.Option("--distractors", min=0, help="Distinct images for DIR/distractors (join the database)."),
    ] = 100,
    whitening: Annotated[
        int,
        typer.Option(
            "--whitening", min=0, help="Other distinct images for DIR/whitening (to learn a whitening)."
        ),
    ] = 100,
    size: Annotated[
        int, typer.Option("--image-size", min=32, help="Long side of the originals in pixels.")
    ] = 256,
    seed: Seed0 = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a Copydays-layout copy-detection set under DIR/copydays, with DIR/distractors and DIR/whitening.

    original/ (200000.jpg, 200100.jpg, ...), strong/ (1-3 heavily edited copies per original: 200001.jpg, ...),
    jpegqual/<q>/ (JPEG quality 3 ... 75) and crops/<c>/ (c% of the area removed, 10 ... 80).
    """
    from dinokit.data.synth_output import check_synth_output

    setup_logging(quiet)
    check_synth_output(output, overwrite)  # refused at once, before numpy and PIL load
    from dinokit.data.synth_copydays import CROP_PERCENTS, JPEG_QUALITIES, make_copydays_dataset

    with RichProgress(quiet=quiet) as progress:
        s = make_copydays_dataset(
            output,
            originals=originals,
            distractors=distractors,
            whitening=whitening,
            size=size,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        )
    rows = [
        ["original", str(s.copydays / "original"), s.n_originals],
        ["strong", str(s.copydays / "strong"), s.n_strong],
        [f"jpegqual/{{{','.join(map(str, JPEG_QUALITIES))}}}", str(s.copydays / "jpegqual"), s.n_originals],
        [f"crops/{{{','.join(map(str, CROP_PERCENTS))}}}", str(s.copydays / "crops"), s.n_originals],
    ]
    if s.n_distractors:
        rows.append(["distractors", str(s.distractors), s.n_distractors])
    if s.n_whitening:
        rows.append(["whitening", str(s.whitening), s.n_whitening])
    print_table("dinokit synth copydays", ["block", "where", "images per folder"], rows)
    console.print(
        f"Copydays layout in {s.copydays}, long side {s.size} px, seed {s.seed}, {s.seconds:.1f} s.",
        highlight=False,
    )


def segment(
    output: Output,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="voc2012 (JPEGImages, SegmentationClass, ImageSets) or "
            "folder ({train,val}/{images,masks}, classes.txt).",
        ),
    ] = "folder",
    classes: Annotated[
        int, typer.Option("--classes", min=1, max=8, help="Shape classes besides the background.")
    ] = 3,
    train: Annotated[int, typer.Option("--train", min=1, help="Training scenes.")] = 48,
    val: Annotated[int, typer.Option("--val", min=1, help="Validation scenes.")] = 16,
    size: Annotated[
        int, typer.Option("--image-size", min=32, help="Longer side of a scene in pixels.")
    ] = 160,
    style: Annotated[
        str,
        typer.Option(
            "--style",
            help="cluttered: textured shapes over photographs or clutter; simple: flat shapes with their "
            "class's hue and pattern on a smooth grey background, as synth classify --style simple draws them.",
        ),
    ] = "cluttered",
    seed: Seed0 = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a semantic segmentation set: scenes of several textured shapes (the class is the shape) over
    photographs or clutter, with exact label maps and 2-pixel void (255) borders, in the VOC 2012 or the
    folder layout that dinokit segment reads.
    """
    from dinokit.data.synth_output import check_synth_output

    setup_logging(quiet)
    check_synth_output(output, overwrite)  # refused at once, before numpy and PIL load
    from dinokit.data.synth_segment import make_segment_dataset

    with RichProgress(quiet=quiet) as progress:
        s = make_segment_dataset(
            output,
            layout=layout,
            classes=classes,
            train=train,
            val=val,
            size=size,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            style=style,
        )
    print_table("dinokit synth segment", ["split", "scenes"], [["train", s.n_train], ["val", s.n_val]])
    console.print(
        f"{s.layout} layout in {s.root}, {plural(len(s.classes), 'class')} ({', '.join(s.classes)}), "
        f"longer side {size} px, seed {s.seed}, {s.seconds:.1f} s. Train a probe: dinokit segment --data "
        f"{s.root} --dataset {s.layout} --weights W --output RUN",
        highlight=False,
    )


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    synth_app.command("classify")(classify)
    synth_app.command("video")(video)
    synth_app.command("copydays")(copydays)
    synth_app.command("segment")(segment)
