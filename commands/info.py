"""``dinokit info``: versions, devices, threads (and the CPU plan a run started now would use) and
native bf16 support."""

from __future__ import annotations

import json

import typer

from ._console import console


def info(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print versions, devices, threads and whether the CPU/GPU computes bf16 natively."""
    import torch
    from rich.table import Table

    from dinokit.runtime import describe_runtime, plan_cpu

    data = describe_runtime()
    # what a training run started now would compute with on the CPU; a run records its plan in its
    # config.json and checkpoints, and --resume reuses it whatever the load is then
    data["cpu_plan_now"] = plan_cpu(None, 4, torch.device("cpu")).describe()
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
