"""`chiplock fingerprint`: measure this device's fingerprint sources and print public facts about them.

``chiplock fingerprint --source {precision,clock,sram,all} [--json]`` enrolls each source once and prints a
short public identifier, the entropy estimate and the time; ``chiplock fingerprint report`` measures each
source many times and writes a Markdown report with per-bit reliability maps. Neither prints key material.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from chiplock.errors import FingerprintError
from chiplock.fingerprint import available_sources, get_source

app = typer.Typer(help="Measure this device's hardware fingerprints (public facts only, never key material).",
                  invoke_without_command=True, no_args_is_help=False)
console = Console()
err_console = Console(stderr=True)

_SOURCE_HELP = "Source to measure (precision, clock, sram) or 'all'."
_DEVICE_HELP = "Where precision and clock measure: cpu, cuda or auto (precision only)."
_DUMP_HELP = "SRAM dump file for the sram source (default $CHIPLOCK_SRAM_DUMP)."
_SIM_HELP = "Simulated SRAM device name for the sram source (default $CHIPLOCK_SRAM_SIM_DEVICE)."


def _options(name: str, device: str, sram_dump: Optional[Path], sram_sim: Optional[str]) -> dict[str, Any]:
    if device not in ("cpu", "cuda", "auto"):
        raise typer.BadParameter(f"--device must be cpu, cuda or auto, not {device!r}")
    if name == "precision":
        return {"device": device}
    if name == "clock":
        return {"device": "cuda" if device == "cuda" else "cpu"}
    if name == "sram":
        return {k: v for k, v in (("path", sram_dump), ("simulate", sram_sim)) if v is not None}
    return {}


def _names(source: str) -> list[str]:
    if source == "all":
        return available_sources()
    return [source]


@app.callback()
def fingerprint(ctx: typer.Context,
                source: str = typer.Option("precision", help=_SOURCE_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
                device: str = typer.Option("cpu", help=_DEVICE_HELP),
                sram_dump: Optional[Path] = typer.Option(None, help=_DUMP_HELP),
                sram_sim: Optional[str] = typer.Option(None, help=_SIM_HELP)) -> None:
    """Measure SOURCE and print a short, non-secret identifier plus per-source facts."""
    if ctx.invoked_subcommand is not None:
        return
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in _names(source):
        try:
            enrollment = get_source(name, **_options(name, device, sram_dump, sram_sim)).enroll()
        except FingerprintError as exc:
            if source != "all":
                raise
            skipped[name] = str(exc)
            continue
        # A short hash of the material is public-safe: it identifies, it does not unlock (32 bits of a SHA-256).
        ident = hashlib.sha256(b"chiplock/id" + enrollment.material).hexdigest()[:8]
        results[name] = {"id": ident, "entropy_bits": enrollment.entropy_bits, "helper": enrollment.helper,
                         "info": enrollment.info}
    if as_json:
        typer.echo(json.dumps({**results, **({"skipped": skipped} if skipped else {})}, indent=2))
        return
    table = Table(title="Hardware fingerprint")
    for col in ("source", "id", "entropy bits", "seconds"):
        table.add_column(col)
    for name, r in results.items():
        ent = "unknown" if r["entropy_bits"] is None else f"{r['entropy_bits']:.1f}"
        table.add_row(name, r["id"], ent, f"{r['info'].get('seconds', float('nan')):.2f}")
    console.print(table)
    for name, why in skipped.items():
        console.print(f"[yellow]{name} skipped:[/] {why}")


@app.command()
def report(source: str = typer.Option("all", help=_SOURCE_HELP),
           trials: int = typer.Option(100, min=2, help="Measurements per source after enrollment."),
           out: Path = typer.Option(Path("fingerprint-report"), "-o", "--out", help="Output folder."),
           device: str = typer.Option("cpu", help=_DEVICE_HELP),
           sram_dump: Optional[Path] = typer.Option(None, help=_DUMP_HELP),
           sram_sim: Optional[str] = typer.Option(None, help=_SIM_HELP),
           as_json: bool = typer.Option(False, "--json", help="Print the results as JSON.")) -> None:
    """Measure each source TRIALS times; write report.md, report.json and reliability PNGs to OUT."""
    from dataclasses import asdict

    from chiplock.fingerprint.report import measure_source, write_report

    reports, skipped = [], {}
    with Progress(console=err_console, transient=True) as bar:
        for name in _names(source):
            task = bar.add_task(f"{name}", total=trials)
            try:
                reports.append(measure_source(
                    name, trials=trials, options=_options(name, device, sram_dump, sram_sim),
                    progress=lambda _n, done, _t, task=task: bar.update(task, completed=done)))
            except FingerprintError as exc:
                if source != "all":
                    raise
                skipped[name] = str(exc)
            bar.remove_task(task)
    md = write_report(reports, out, skipped=skipped)
    if as_json:
        typer.echo(json.dumps({"report": str(md), "sources": [
            {k: v for k, v in asdict(r).items() if k not in ("flip_rates", "labels")} for r in reports],
            "skipped": skipped}, indent=2))
    else:
        typer.echo(md.read_text())
        console.print(f"wrote [bold]{md}[/] and reliability maps in {out}")
