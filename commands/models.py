"""``dinokit models``: the architectures and released checkpoints dinokit knows, and what is cached."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from ._console import console


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    """A table whose cells fold onto a second line rather than being cut: file names stay whole."""
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    console.print(table)


def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List the architectures, the presets (--weights NAME) with their files and whether each is in
    torch.hub's cache, the Hugging Face DINO repositories (--weights owner/name) and where the caches are."""
    from dinokit.models.registry import arch_catalogue
    from dinokit.presets import hf_cache_dir, hf_catalogue, hub_cache_dir, preset_catalogue

    archs, presets, repos = arch_catalogue(), preset_catalogue(), hf_catalogue()
    if as_json:
        data = {
            "architectures": archs,
            "presets": [asdict(p) for p in presets],
            "hugging_face": [asdict(r) for r in repos],
            "torch_hub_cache": str(hub_cache_dir()),
            "hugging_face_cache": str(hf_cache_dir()),
        }
        console.print_json(json.dumps(data))
        return
    _table(
        "Architectures (--arch)",
        ["arch", "kind", "width", "blocks", "heads", "aliases"],
        [
            [
                a["arch"],
                a["kind"],
                a["embed_dim"],
                a["depth"] or "-",
                a["num_heads"] or "-",
                ", ".join(a["aliases"]) or "-",
            ]
            for a in archs
        ],
    )
    _table(
        "Presets (--weights NAME)",
        ["preset", "model", "file", "cached", "linear head"],
        [
            [
                p.name,
                p.arch + (f"/{p.patch_size}" if p.patch_size else ""),
                p.file,
                "yes" if p.cached else "no",
                ("cached" if p.linear_head_cached else "yes") if p.linear_head else "-",
            ]
            for p in presets
        ],
    )
    _table(
        "Hugging Face repositories (--weights OWNER/NAME; any ViT repository works)",
        ["repository", "model", "cached"],
        [[r.repo_id, f"{r.arch}/{r.patch_size}", "yes" if r.cached else "no"] for r in repos],
    )
    n = sum(p.cached for p in presets)
    console.print(
        f"{n} of {len(presets)} presets are in torch.hub's cache: {hub_cache_dir()} (set TORCH_HOME to move it).",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"Hugging Face cache: {hf_cache_dir()} (set HF_HOME to move it).", soft_wrap=True, highlight=False
    )


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("models")(models)
