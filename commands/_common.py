"""What every subcommand shares: option definitions, error handling, console and progress bars."""

from __future__ import annotations

import enum
import inspect
import logging
import os
import textwrap
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dinokit.errors import DinokitError
from dinokit.presets import PRESETS

#: the width of a table written to a pipe or a file: wide enough that rows stay whole
PIPE_WIDTH = 400


class LogConsole(Console):
    """A rich console that draws for a terminal, but writes to a pipe or a file (logs, SLURM) without
    wrapping: a path or a record stays on one line, whatever COLUMNS says."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)

    @property
    def size(self):
        size = super().size
        if not self.is_terminal and self._width is None:
            return size.__class__(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


console = LogConsole()
console_err = LogConsole(stderr=True)


def _hide_flag_types() -> None:
    """Recent typer labels every on/off flag ``<bool>`` in rich help; a flag takes no value, show none."""
    option_cls = getattr(typer.core, "TyperOption", None)
    original = getattr(option_cls, "display_type_rich", None)
    if original is None or getattr(original, "_dinokit", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._dinokit = True
    option_cls.display_type_rich = display_type_rich


_hide_flag_types()


# -- help that reads at 80 columns, and the old / reference option names -------------------------
def _wrap(text: str, width: int, indent: str = "", first_indent: str | None = None) -> list[str]:
    """Paragraphs (blank-line separated) re-flowed into sentences; words, paths and option names are
    never broken (a word longer than the line gets a line of its own)."""
    lines: list[str] = []
    for i, para in enumerate(p for p in inspect_cleandoc(text).split("\n\n") if p.strip()):
        if i:
            lines.append("")
        if para.startswith("\b"):  # click's mark for a block kept as written
            lines.extend(indent + ln for ln in para[1:].strip("\n").splitlines())
            continue
        lines.extend(
            textwrap.wrap(
                " ".join(para.split()), width=max(width, 20), initial_indent=indent if i or first_indent is None
                else first_indent, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False,
            )
        )
    return lines


def inspect_cleandoc(text: str) -> str:
    return inspect.cleandoc(text or "")


class HelpFormatter(typer.core.TyperCommand.context_class.formatter_class):
    """click's formatter with dinokit's wrapping: sentences flow, nothing is cut or hyphen-split."""

    def write_text(self, text: str) -> None:
        indent = " " * self.current_indent
        self.write("\n".join(_wrap(text, self.width - self.current_indent, indent)) + "\n")

    def write_dl(self, rows, col_max: int = 28, col_spacing: int = 2) -> None:
        rows = list(rows)
        if not rows:
            return
        indent = " " * self.current_indent
        first_col = min(max(len(a) for a, _ in rows), col_max) + col_spacing
        text_width = max(self.width - self.current_indent - first_col, 30)
        for first, second in rows:
            if not second:
                self.write(f"{indent}{first}\n")
                continue
            body = _wrap(second, text_width)
            if len(first) + col_spacing <= first_col and self.width - self.current_indent - first_col >= 30:
                self.write(f"{indent}{first.ljust(first_col)}{body[0]}\n")
                body = body[1:]
            else:  # a long option name: its own line, the description below it
                self.write(f"{indent}{first}\n")
            pad = indent + " " * first_col
            for line in body:
                self.write(f"{pad}{line}\n" if line else "\n")


class DinokitContext(typer.core.TyperCommand.context_class):
    formatter_class = HelpFormatter


def _metavar(param) -> str:
    """A short label for an option's value (INT, NUMBER, PATH, TEXT), never a type's repr or range."""
    if param.metavar:
        return param.metavar
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:  # typer's own parameter types
        label = _annotation_label(descriptor.annotation)
    else:  # typer on click's parameter types
        label = _click_type_label(getattr(param, "type", None))
    nargs = getattr(param, "nargs", 1)
    return " ".join([label] * nargs) if nargs > 1 and " " not in label else label


def _annotation_label(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _annotation_label(next((a for a in args if a is not type(None)), str))
    if origin is typing.Annotated:
        return _annotation_label(args[0])
    if origin is tuple:
        return " ".join(_annotation_label(a) for a in args)
    if origin in (list, set, tuple):
        return _annotation_label(args[0]) if args else "TEXT"
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return "BOOL"
        if issubclass(annotation, int):
            return "INT"
        if issubclass(annotation, float):
            return "NUMBER"
        if issubclass(annotation, enum.Enum):
            return "|".join(str(m.value) for m in annotation)
        if issubclass(annotation, os.PathLike):
            return "PATH"
    return "TEXT"


def _click_type_label(t) -> str:
    name = type(t).__name__
    if name == "Tuple":
        return " ".join(_click_type_label(x) for x in t.types)
    if name == "Choice":
        return "|".join(map(str, t.choices))
    return {"IntParamType": "INT", "IntRange": "INT", "FloatParamType": "NUMBER", "FloatRange": "NUMBER",
            "Path": "PATH", "File": "PATH"}.get(name, "TEXT")


def _default_text(param) -> str | None:
    default = param.default
    if getattr(param, "show_default", True) is False or default is None or callable(default):
        return None
    if getattr(param, "is_flag", False):
        if getattr(param, "secondary_opts", None) and isinstance(default, bool):
            return (param.opts if default else param.secondary_opts)[0]
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or None
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _option_row(ctx, param) -> tuple[str, str]:
    if isinstance(param, typer.core.TyperArgument):
        name = _metavar(param) if param.metavar else param.name.upper() + ("..." if param.nargs == -1 else "")
        return name, getattr(param, "help", None) or ""
    shorts = [o for o in param.opts if not o.startswith("--")]
    longs = [o for o in param.opts if o.startswith("--")]
    names = ", ".join(longs + shorts)
    if getattr(param, "secondary_opts", None):
        names += " / " + ", ".join(param.secondary_opts)
    if not (getattr(param, "is_flag", False) or getattr(param, "count", False)):
        names += " " + _metavar(param)
    help_text = " ".join((param.help or "").split())
    extra = []
    default = _default_text(param)
    if default is not None and default != "":
        extra.append(f"default: {default}")
    if param.required:
        extra.append("required")
    if extra:
        help_text += f" [{'; '.join(extra)}]"
    return names, help_text


def _format_panels(command, ctx, formatter) -> None:
    """The options under their panel titles ("Options" first, then the shared panels in order)."""
    panels: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        is_argument = isinstance(param, typer.core.TyperArgument)
        if is_argument and not getattr(param, "help", None):
            continue
        panel = "Arguments" if is_argument else getattr(param, "rich_help_panel", None) or "Options"
        panels.setdefault(panel, []).append(_option_row(ctx, param))
    for title, rows in panels.items():
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class DinokitCommand(typer.core.TyperCommand):
    """Every subcommand: the plain help layout, old and reference option names rewritten to dinokit's
    (with a note), and no empty run folder left behind by a failed run."""

    context_class = DinokitContext

    def format_help(self, ctx, formatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        _format_panels(self, ctx, formatter)
        self.format_epilog(ctx, formatter)

    def collect_usage_pieces(self, ctx) -> list[str]:
        """``[OPTIONS] IMAGES...``: arguments by their upper-case names, optional ones in brackets."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.name.upper() + ("..." if param.nargs == -1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_help_text(self, ctx, formatter) -> None:
        text = inspect_cleandoc(self.help or "")
        if self.deprecated:
            text += "\n\n(Deprecated)"
        if text:
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(text)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from ._option_checks import refuse_repeated_options

        refuse_repeated_options(self, args, {**RENAMED_OPTIONS["*"], **RENAMED_OPTIONS.get(self.name or "", {})},
                                REFERENCE_OPTIONS)  # fmt: skip
        return super().parse_args(ctx, rewrite_option_names(self, args))

    def invoke(self, ctx):
        from dinokit.io import held_run_folders, release_run_folders

        from ._option_checks import refuse_overlong_values

        refuse_overlong_values(ctx)  # before anything touches the disk
        output = ctx.params.get("output")
        fresh = output is not None and not Path(output).exists()
        held = held_run_folders()  # a command run inside another (the demo's steps) keeps the outer one's
        try:
            return super().invoke(ctx)
        except BaseException:
            release_run_folders(held)  # the lock file first: a folder holding only it is left empty
            if fresh:
                remove_empty_folders(Path(output))
            raise
        finally:
            release_run_folders(held)  # the command's run folders are free for the next command


def remove_empty_folders(root: Path) -> None:
    """Remove ``root`` when it holds nothing but empty folders (a run that failed before writing)."""
    if not root.is_dir() or root.is_symlink():
        return
    try:
        if any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
            return
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        root.rmdir()
    except OSError:
        pass


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
            console_err.print(f"Note: {name} is {new} in dinokit {command.name}.", highlight=False, soft_wrap=True)
        out.append(new + eq + value)
    return out



def version_callback(value: bool) -> None:
    if value:
        from dinokit import __version__

        console.print(f"dinokit {__version__}")
        raise typer.Exit()


def _plain_error(message: str) -> str:
    message = " ".join(str(message).split())
    return message if message.endswith((".", "!", "?")) else message + "."


UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def usage_sentence(error) -> str:
    """A usage error as one sentence that names the command and where its options are listed."""
    ctx = getattr(error, "ctx", None)
    path = ctx.command_path if ctx is not None else "dinokit"
    param = getattr(error, "param", None)
    if type(error).__name__ == "MissingParameter" and getattr(param, "opts", None):
        name = max(param.opts, key=len)
        what = " ".join((param.help or "").split()).rstrip(".")
        text = f"{path} needs {name}" + (f" ({what[0].lower() + what[1:]})" if what else "")
    else:
        text = error.format_message()
    return f"{_plain_error(text)} See {path} --help."


class DinokitGroup(typer.core.TyperGroup):
    """Turns dinokit's own errors (and unreadable files) into one sentence and exit code 2; lists
    the commands with their whole first sentence, never cut."""

    context_class = DinokitContext

    def format_help(self, ctx, formatter) -> None:
        self.format_usage(ctx, formatter)
        DinokitCommand.format_help_text(self, ctx, formatter)
        _format_panels(self, ctx, formatter)
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            text = cmd.short_help or inspect_cleandoc(cmd.help or "").split("\n\n")[0]
            rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows, col_max=14)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:  # a missing or unknown option: the same one sentence as every error
            console_err.print(f"[bold red]Error:[/] {escape(usage_sentence(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except DinokitError as e:
            # soft_wrap: the sentence stays on one line in logs (rich would wrap it at 80 columns)
            console_err.print(f"[bold red]Error:[/] {escape(_plain_error(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=e.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            name = e.filename or ""
            console_err.print(
                f"[bold red]Error:[/] cannot use {escape(str(name))}: {e.strerror}.", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None
        except OSError as e:  # what the file system refuses (read-only, full, a name too long): one sentence
            from ._option_checks import file_system_refusal

            sentence = file_system_refusal(e)
            if sentence is None:
                raise
            console_err.print(f"[bold red]Error:[/] {escape(sentence)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None


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
    parts += [f"{names[0]} ... {names[-1]}" if len(names) > 2 else ", ".join(names) for names in groups.values()]
    return "; ".join(p for p in parts if p)


PRESET_NAMES = _preset_names()

Arch = Annotated[
    str | None,
    typer.Option("--arch", rich_help_panel=BACKBONE_PANEL,
                 help="vit_tiny, vit_small, vit_base, resnet50, or a DINOv2/DINOv3 hub name such as "
                 "dinov2_vits14, dinov2_vits14_reg, dinov3_vits16 (default: read from --weights; "
                 "dinokit models lists them all)."),
]
PatchSize = Annotated[
    int | None,
    typer.Option("--patch-size", rich_help_panel=BACKBONE_PANEL,
                 help="ViT patch size in pixels (default: read from --weights)."),
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights", "-w", rich_help_panel=BACKBONE_PANEL,
        help=f"A checkpoint file, a Hugging Face repo id, a preset ({PRESET_NAMES}) or 'random'.",
    ),
]
CheckpointKey = Annotated[
    str,
    typer.Option("--checkpoint-key", rich_help_panel=BACKBONE_PANEL,
                 help="Which weights of a training checkpoint: teacher or student."),
]
Output = Annotated[Path, typer.Option("--output", "-o", rich_help_panel=RUN_PANEL, help="The run folder for results.")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, rich_help_panel=RUNTIME_PANEL, help="Images per batch (per process).")
]
NumWorkers = Annotated[
    int, typer.Option("--num-workers", min=0, rich_help_panel=RUNTIME_PANEL, help="Data-loading worker processes.")
]
Device = Annotated[
    str, typer.Option("--device", rich_help_panel=RUNTIME_PANEL, help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")
]
Precision = Annotated[
    str,
    typer.Option(
        "--precision", rich_help_panel=RUNTIME_PANEL,
        help="auto, fp32, bf16 or fp16. auto = bf16 for training where the hardware has native bf16, "
        "and for embeddings (features, similar, duplicates, attention maps) on a CPU with it; fp32 for "
        "the protocols' evaluations.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=RUNTIME_PANEL, help="Random seed.")]
OptionalWeights = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w", rich_help_panel=BACKBONE_PANEL,
        help=f"A checkpoint file, a Hugging Face repo id, a preset ({PRESET_NAMES}) or 'random' "
        "(a randomly initialised baseline); needed wherever images are embedded.",
    ),
]
Train = Annotated[Path | None, typer.Option("--train", help="Labelled training images (ROOT/<class>/<image>).")]
Val = Annotated[Path | None, typer.Option("--val", help="Labelled validation images (ROOT/<class>/<image>).")]
TrainFeatures = Annotated[
    Path | None, typer.Option("--train-features", help="A features file from dinokit features (instead of --train).")
]
ValFeatures = Annotated[
    Path | None, typer.Option("--val-features", help="A features file from dinokit features (instead of --val).")
]
Resume = Annotated[
    bool, typer.Option("--resume", rich_help_panel=RUN_PANEL, help="Continue the run in --output from its checkpoint.")
]
StopAfter = Annotated[
    int | None,
    typer.Option("--stop-after", min=1, rich_help_panel=RUN_PANEL,
                 help="End cleanly after N epochs of the schedule (resumable)."),
]
CheckpointMinutes = Annotated[
    float,
    typer.Option(
        "--checkpoint-minutes", min=0.0, rich_help_panel=RUN_PANEL,
        help="Also write checkpoint.pth every this many minutes within an epoch, so that a killed run "
        "loses at most that much (0: only at the end of each epoch).",
    ),
]
Whitening = Annotated[
    Path | None, typer.Option("--whitening", help="A folder of other images to learn the whitening on.")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", rich_help_panel=RUN_PANEL, help="Write into an output that already holds results.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=RUN_PANEL, help="No progress bars.")]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict", rich_help_panel=RUN_PANEL,
        help="Stop at the first unreadable image (by default unreadable images are skipped and counted).",
    ),
]
ExactDecode = Annotated[
    bool,
    typer.Option(
        "--exact-decode", rich_help_panel=RUNTIME_PANEL,
        help="Decode every JPEG at full size. By default a large JPEG is decoded at the reduced scale "
        "(1/2, 1/4 or 1/8) that still covers the resize, several times faster; images already small "
        "are decoded in full either way.",
    ),
]
class PlainLogHandler(logging.Handler):
    """Log records for a pipe or a file: ``LEVEL message`` on one line, no padding, no wrapping."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record never stops the program
            self.handleError(record)
            return
        console_err.file.write(f"{record.levelname} {message}\n")
        console_err.file.flush()


def setup_logging(quiet: bool = False) -> None:
    """The ``dinokit`` logger on stderr: rich lines on a terminal, plain unpadded lines elsewhere."""
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("dinokit")
    logger.setLevel(level)
    kind = RichHandler if console_err.is_terminal else PlainLogHandler
    for h in [h for h in logger.handlers if isinstance(h, (RichHandler, PlainLogHandler)) and type(h) is not kind]:
        logger.removeHandler(h)
    if not any(type(h) is kind for h in logger.handlers):
        if kind is RichHandler:
            handler = RichHandler(console=console_err, show_path=False, show_time=False, markup=False)
        else:
            handler = PlainLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


#: a training run with fewer optimisation steps than this is short: the paper's learning rates, made
#: for ImageNet-size runs (hundreds of thousands of steps), barely move the weights in it
SHORT_RUN_STEPS = 1000


def short_run_note(command: str, steps: int, lr_option_given: bool, lr_text: str) -> str | None:
    """The one line that says which option to raise when a run with the paper's learning rate is short
    (``None`` for a run of real size, or when --lr was chosen)."""
    if lr_option_given or steps >= SHORT_RUN_STEPS:
        return None
    return (
        f"Note: this {command} run made {plural(steps, 'optimisation step')} with the paper's learning rate "
        f"({lr_text}), made for runs of hundreds of thousands of steps; on small data raise --lr "
        "(or --epochs) to learn more than chance."
    )


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 class``, ``2 classes``: a count with its noun in the right number."""
    return f"{n} {word if n == 1 else many or word + ('es' if word.endswith(('s', 'x', 'sh', 'ch')) else 's')}"


#: without a terminal, a progress line at least this often (seconds) ...
HEARTBEAT_SECONDS = 30.0
#: ... and at each tenth of the work, but not more often than this
HEARTBEAT_MIN_SECONDS = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _RichTask:
    def __init__(self, progress: RichProgress, task_id, total, description: str = ""):
        self._p = progress
        self._id = task_id
        self._fields: dict[str, Any] = {}
        self._start = self._last_log = time.monotonic()
        self._done = 0
        self._logged_done = 0
        self._total = total
        self._description = description

    def _info(self) -> str:
        parts = []
        for k, v in self._fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._fields.update(fields)
        self._done += n
        if self._p.bar is not None:
            self._p.bar.update(self._id, advance=n, info=self._info())
        elif self._p.log_lines and self._heartbeat_due():
            self._heartbeat()

    def _heartbeat_due(self) -> bool:
        """Every HEARTBEAT_SECONDS, or at each further tenth of the work once MIN_SECONDS have passed."""
        since = time.monotonic() - self._last_log
        if since >= HEARTBEAT_SECONDS:
            return True
        if self._total and since >= HEARTBEAT_MIN_SECONDS:
            return int(10 * self._done / self._total) > int(10 * self._logged_done / self._total)
        return False

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._last_log, self._logged_done = now, self._done
        elapsed = now - self._start
        if self._total:
            share = min(self._done / self._total, 1.0)
            eta = f", eta {_duration(elapsed * (1 - share) / share)}" if 0 < share < 1 else ""
            where = f"{self._done}/{self._total} ({100 * share:.0f}%)"
        else:
            eta, where = "", str(self._done)
        info = self._info()
        console_err.print(
            f"{self._description}: {where}, {_duration(elapsed)}{eta}" + (f", {info}" if info else ""),
            highlight=False, markup=False, soft_wrap=True,
        )

    def update(self, **fields: Any) -> None:
        self._fields.update(fields)
        if self._p.bar is not None:
            self._p.bar.update(self._id, info=self._info())

    def close(self) -> None:
        if self._p.bar is not None:
            self._p.bar.update(self._id, visible=True, refresh=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RichProgress:
    """The CLI's implementation of :class:`dinokit.progress.Progress`: rich bars with rate and ETA.

    Bars are drawn only on a terminal and not with ``--quiet``; elsewhere (a log file, a scheduler)
    a plain line says how far the work is every 30 s, and at each tenth of it (at most every 5 s).
    """

    def __init__(self, quiet: bool = False, enabled: bool = True):
        self.quiet = quiet
        show = enabled and not quiet and console_err.is_terminal
        self.log_lines = enabled and not quiet and not show
        self.bar = (
            Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console_err,
                transient=False,
            )
            if show
            else None
        )

    def __enter__(self) -> RichProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int | None = None) -> _RichTask:
        task_id = self.bar.add_task(description, total=total, info="") if self.bar is not None else None
        if self.bar is None and self.log_lines:
            steps = plural(total, "step") if total is not None else "? steps"
            console_err.print(f"{description} ({steps})", highlight=False, markup=False, soft_wrap=True)
        return _RichTask(self, task_id, total, description)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False)
        else:
            console_err.print(message, highlight=False)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)


def is_main_process() -> bool:
    from dinokit.runtime import dist_env

    return dist_env().is_main
