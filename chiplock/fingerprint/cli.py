"""`chiplock fingerprint`: measure this device's fingerprint sources and print public facts about them.

``chiplock fingerprint --source {precision,clock,sram,tpm,all} [--json] [--sensitive]`` enrolls each source once and
prints the entropy estimate, the public helper data and the time; only ``--sensitive`` adds ids of the material,
per-probe ids and configuration facts (they identify the configuration among enumerated candidates).
``chiplock fingerprint report`` measures each source many times and writes a Markdown report with per-bit
reliability maps and, with ``--enumerate``, the precision source's measured configuration space. Neither prints
key material. The sources and their options (``--device``, ``--sram-dump``, ...) come from the source registry: each
source declares its own ``cli_options``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from chiplock._extras import require
from chiplock._io import check_output_folder
from chiplock.errors import FingerprintError
from chiplock.fingerprint import SOURCES, available_sources, get_source
from chiplock.registry import load_plugins, merge_options, with_options

app = typer.Typer(help="Measure this device's hardware fingerprints (public facts only, never key material).",
                  invoke_without_command=True, no_args_is_help=False)
console = Console()
err_console = Console(stderr=True)

load_plugins()
_SOURCE_HELP = f"Source to measure ({', '.join(available_sources())}) or 'all'."
#: Every source's declared options, one flag each (``--device`` serves precision and clock).
_SOURCE_OPTIONS = merge_options((name, cls.cli_options) for name, cls in SOURCES.items())
_ENUM_HELP = ("Also enumerate the configurations software can reach here (environment variables, thread "
              "counts) and count distinct precision fingerprints: a few minutes of fresh processes.")
_SENSITIVE_HELP = ("Also print ids of the material, per-probe ids and this machine's configuration (CPU, ISA, "
                   "library versions, threads). They identify the configuration: keep that output private.")


def _options(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Constructor keywords for source ``name`` from the CLI values of the options it declares."""
    kwargs = {}
    for opt in SOURCES.get(name).cli_options:
        value = opt.value(values.get(opt.name))
        if value is not None:
            kwargs[opt.kwarg or opt.name] = value
    return kwargs


#: Enrollment ``info`` keys that describe the configuration; printed only with ``--sensitive``.
#: ``seconds`` too: the precision suite's run time tells one thread from several (0.03 s vs 0.3 s, red team).
SENSITIVE_INFO = frozenset({"probes", "config", "threads", "cpu", "gpu", "seconds"})


def _public(enrollment: Any) -> dict[str, Any]:
    """What may be published about one enrollment: no digest of the material, no configuration facts."""
    return {"entropy_bits": enrollment.entropy_bits, "helper": enrollment.helper,
            "info": {k: v for k, v in enrollment.info.items() if k not in SENSITIVE_INFO}}


def _sensitive(name: str, enrollment: Any, device: str) -> dict[str, Any]:
    # Unsalted ids compare across runs and machines, which is what --sensitive is for; they also name the
    # configuration to anyone who enumerates candidates, which is why they are not printed by default.
    out: dict[str, Any] = {"id": hashlib.sha256(b"chiplock/id" + enrollment.material).hexdigest()[:8],
                           "sensitive_info": {k: v for k, v in enrollment.info.items() if k in SENSITIVE_INFO}}
    if name == "precision":
        from chiplock.fingerprint.precision import probe_digests, probe_ids

        out["probes"] = probe_ids(probe_digests(enrollment.helper.get("device", device)))
    return out


def _names(source: str) -> list[str]:
    if source == "all":
        return available_sources()
    return [source]


@app.callback()
@with_options(_SOURCE_OPTIONS.values())
def fingerprint(ctx: typer.Context,
                source: str = typer.Option("precision", help=_SOURCE_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
                sensitive: bool = typer.Option(False, "--sensitive", help=_SENSITIVE_HELP),
                **values: Any) -> None:
    """Measure SOURCE and print public facts per source (entropy, helper data, timings).

    The default output is safe to publish: it holds no digest of fingerprint material and no configuration facts.
    With --sensitive it adds a 32-bit id of each source's material, per-probe ids (precision) and this machine's
    configuration (CPU, ISA, library versions, thread counts); those let an attacker who enumerates
    configurations recognise the right one at once, so keep that output private.
    """
    if ctx.invoked_subcommand is not None:
        return
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in _names(source):
        try:
            enrollment = get_source(name, **_options(name, values)).enroll()
        except FingerprintError as exc:
            if source != "all":
                raise
            skipped[name] = str(exc)
            continue
        results[name] = _public(enrollment)
        if sensitive:
            results[name].update(_sensitive(name, enrollment, values.get("device") or "cpu"))
    extra: dict[str, Any] = {"skipped": skipped} if skipped else {}
    if sensitive:
        from chiplock.fingerprint.precision import config_facts

        extra["config"] = config_facts()
    if as_json:
        typer.echo(json.dumps({**results, **extra}, indent=2))
        return
    table = Table(title="Hardware fingerprint" + (" (SENSITIVE: keep private)" if sensitive else ""))
    for col in ("source", *(("id",) if sensitive else ()), "entropy bits", *(("seconds",) if sensitive else ())):
        table.add_column(col)
    for name, r in results.items():
        ent = "unknown" if r["entropy_bits"] is None else f"{r['entropy_bits']:.1f}"
        seconds = (f"{r['sensitive_info'].get('seconds', float('nan')):.2f}",) if sensitive else ()
        table.add_row(name, *((r["id"],) if sensitive else ()), ent, *seconds)
    console.print(table)
    if sensitive:
        console.print_json(json.dumps(extra["config"]))
    for name, why in skipped.items():
        console.print(f"[yellow]{name} skipped:[/] {why}")


@app.command()
@with_options(_SOURCE_OPTIONS.values())
def report(source: str = typer.Option("all", help=_SOURCE_HELP),
           trials: int = typer.Option(100, min=2, help="Measurements per source after enrollment."),
           out: Path = typer.Option(Path("fingerprint-report"), "-o", "--out", help="Output folder."),
           as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
           enumerate_: bool = typer.Option(False, "--enumerate", help=_ENUM_HELP),
           workers: int = typer.Option(2, min=1, help="Fresh processes at once for --enumerate."),
           **values: Any) -> None:
    """Measure each source TRIALS times; write report.md, report.json and reliability PNGs to OUT."""
    from dataclasses import asdict

    from chiplock.fingerprint.report import measure_source, public_enumeration, write_report

    # Fail on an unusable output folder before minutes of measurements (rich's progress stays off when
    # stderr is no terminal, so an error is one line).
    check_output_folder(out)
    require(("matplotlib",), "demo", what="chiplock fingerprint report's reliability maps")

    reports, skipped = [], {}
    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        for name in _names(source):
            task = bar.add_task(f"{name}", total=trials)
            try:
                reports.append(measure_source(
                    name, trials=trials, options=_options(name, values),
                    progress=lambda _n, done, _t, task=task: bar.update(task, completed=done)))
            except FingerprintError as exc:
                if source != "all":
                    raise
                skipped[name] = str(exc)
            bar.remove_task(task)
    enumeration = None
    if enumerate_:
        from chiplock.fingerprint.configurations import enumerate_configurations

        with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
            tasks: dict[str, Any] = {}

            def tick(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"precision configurations: {stage}", total=total)
                bar.update(tasks[stage], completed=done, total=total)

            device = "cuda" if values.get("device") == "cuda" else "cpu"
            enumeration = enumerate_configurations(device=device, workers=workers,
                                                   progress=tick)
    md = write_report(reports, out, skipped=skipped, enumeration=enumeration)
    if as_json:
        typer.echo(json.dumps({"report": str(md), "sources": [
            {k: v for k, v in asdict(r).items() if k not in ("flip_rates", "labels")} for r in reports],
            "skipped": skipped,
            **({"precision_enumeration": public_enumeration(enumeration)} if enumeration else {})}, indent=2))
    else:
        typer.echo(md.read_text())
        console.print(f"wrote [bold]{md}[/] and reliability maps in {out}")
