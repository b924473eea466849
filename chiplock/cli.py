"""The `chiplock` command line: parses arguments and calls the public verbs."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from chiplock.errors import ChiplockError
from chiplock.fingerprint.cli import app as fingerprint_app

app = typer.Typer(help="Lock machine-learning models to the hardware they are licensed for.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)

# Sub-command groups owned by other packages mount here, one line each.
app.add_typer(fingerprint_app, name="fingerprint")


@app.command()
def enroll(out: Path = typer.Option(..., "-o", "--out", help="Where to write the device profile (JSON, secret)."),
           source: list[str] = typer.Option(["precision"], "--source", help="Fingerprint source; repeatable.")) -> None:
    """Measure this device and write its profile (the vendor keeps it secret)."""
    from chiplock.profile import enroll as _enroll

    with console.status("measuring fingerprints..."):
        profile = _enroll(source)
    profile.save(out)
    console.print(f"wrote device profile [bold]{out}[/] (sources: {', '.join(profile.sources)}); keep it secret")


def main() -> None:
    """Console-script entry point: turns ChiplockError into a one-line message and exit code 2."""
    try:
        app()
    except ChiplockError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
