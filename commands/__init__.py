"""The ``dinokit`` command line: a Typer app with one module per subcommand.

Each module in this package defines ``register(app, synth_app)``; the modules listed in
``COMMAND_MODULES`` are registered in that order when present.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from ._console import console_err
from ._help import DinokitCommand, DinokitGroup, version_callback

COMMAND_MODULES = (
    "info",
    "models",
    "pretrain",
    "features",
    "knn",
    "linear",
    "finetune",
    "predict",
    "attn",
    "patches",
    "davis",
    "davis_score",
    "segment",
    "copydetect",
    "duplicates",
    "similar",
    "retrieval",
    "synth",
    "demo",
)

# help text up to 100 columns wide (the terminal's width when narrower), "-h" as well as "--help"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

app = typer.Typer(
    name="dinokit",
    cls=DinokitGroup,
    help="DINO self-supervised Vision Transformers: pretrain, evaluate, segment video, detect copies, "
    "look at attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)
synth_app = typer.Typer(
    name="synth",
    help="Generate the built-in data sets (no download needed).",
    no_args_is_help=True,
    cls=DinokitGroup,
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """DINO self-supervised Vision Transformers as a command-line tool."""


for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}").register(app, synth_app)

for _typer in (app, synth_app):
    for _info in _typer.registered_commands:  # one help layout and one option vocabulary everywhere
        if _info.cls in (None, typer.core.TyperCommand):
            _info.cls = DinokitCommand
        _info.context_settings = {**CONTEXT_SETTINGS, **(_info.context_settings or {})}
app.add_typer(synth_app, name="synth")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="dinokit")
    except KeyboardInterrupt:
        console_err.print("Interrupted.")
        sys.exit(130)
