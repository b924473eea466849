"""`chiplock fingerprint`: measure this device's fingerprint sources and print public facts about them."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from chiplock.fingerprint import available_sources, get_source

app = typer.Typer(help="Measure this device's hardware fingerprints (public facts only, never key material).",
                  invoke_without_command=True, no_args_is_help=False)
console = Console()


@app.callback()
def fingerprint(ctx: typer.Context,
                source: str = typer.Option("precision", help="Source to measure, or 'all'."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON for machines.")) -> None:
    """Measure SOURCE and print a short, non-secret identifier plus per-source facts."""
    if ctx.invoked_subcommand is not None:
        return
    names = available_sources() if source == "all" else [source]
    results = {}
    for name in names:
        enrollment = get_source(name).enroll()
        # A short hash of the material is public-safe: it identifies, it does not unlock (32 bits of a SHA-256).
        import hashlib
        ident = hashlib.sha256(b"chiplock/id" + enrollment.material).hexdigest()[:8]
        results[name] = {"id": ident, "entropy_bits": enrollment.entropy_bits, "helper": enrollment.helper,
                         "info": enrollment.info}
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    table = Table(title="Hardware fingerprint")
    for col in ("source", "id", "entropy bits", "seconds"):
        table.add_column(col)
    for name, r in results.items():
        ent = "unknown" if r["entropy_bits"] is None else f"{r['entropy_bits']:.1f}"
        table.add_row(name, r["id"], ent, f"{r['info'].get('seconds', float('nan')):.2f}")
    console.print(table)
