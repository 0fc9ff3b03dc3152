"""One help layout for every command (panels, flowing text, never cut at 80 columns), the command and
group classes (option names rewritten, one-sentence errors with exit code 2, no empty run folder
left behind), and the usage sentences."""

from __future__ import annotations

import enum
import inspect
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.markup import escape

from dinokit.errors import DinokitError

from ._console import console, console_err
from ._options import REFERENCE_OPTIONS, RENAMED_OPTIONS, reference_instead, rewrite_option_names


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


# -- help that reads at 80 columns ---------------------------------------------------------------
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
                " ".join(para.split()),
                width=max(width, 20),
                initial_indent=indent if i or first_indent is None else first_indent,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
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
    return {
        "IntParamType": "INT",
        "IntRange": "INT",
        "FloatParamType": "NUMBER",
        "FloatRange": "NUMBER",
        "Path": "PATH",
        "File": "PATH",
    }.get(name, "TEXT")


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

        from ._option_checks import refuse_overlong_values, refuse_unknown_weights

        refuse_overlong_values(ctx)  # before anything touches the disk
        refuse_unknown_weights(ctx)  # before the command's heavy imports
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
        for folder in sorted(
            (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            folder.rmdir()
        root.rmdir()
    except OSError:
        pass


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
    elif (
        type(error).__name__ == "NoSuchOption"
        and ctx is not None
        and (instead := reference_instead(ctx.command, getattr(error, "option_name", "")))
    ):
        text = instead
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
        except KeyboardInterrupt:  # a command that does not stop cleanly by itself: say so, never in silence
            console_err.print("Stopped by Ctrl-C.", highlight=False)
            raise typer.Exit(code=130) from None
        except UsageError as e:  # a missing or unknown option: the same one sentence as every error
            console_err.print(
                f"[bold red]Error:[/] {escape(usage_sentence(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None
        except DinokitError as e:
            # soft_wrap: the sentence stays on one line in logs (rich would wrap it at 80 columns)
            console_err.print(
                f"[bold red]Error:[/] {escape(_plain_error(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=e.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            name = e.filename or ""
            console_err.print(
                f"[bold red]Error:[/] cannot use {escape(str(name))}: {e.strerror}.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code=2) from None
        except OSError as e:  # what the file system refuses (read-only, full, a name too long): one sentence
            from ._option_checks import file_system_refusal

            sentence = file_system_refusal(e)
            if sentence is None:
                raise
            console_err.print(f"[bold red]Error:[/] {escape(sentence)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
