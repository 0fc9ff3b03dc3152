"""``dinokit info``: versions, devices, threads and native bf16 support."""

from __future__ import annotations

import json

import typer

from ._console import console


def info(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print versions, devices, threads and whether the CPU/GPU computes bf16 natively."""
    from rich.table import Table

    from dinokit.runtime import describe_runtime

    data = describe_runtime()
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table(title="dinokit info", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    console.print(table)


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("info")(info)
