"""The `chiplock` command line: parses arguments and calls the public verbs."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from chiplock.errors import ChiplockError
from chiplock.fingerprint.cli import app as fingerprint_app
from chiplock.softlock.cli import app as softlock_app

class Transform(str, enum.Enum):
    aes = "aes"
    shuffle = "shuffle"
    pre_aes = "pre-aes"


app = typer.Typer(help="Lock machine-learning models to the hardware they are licensed for.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)

# Sub-command groups owned by other packages mount here, one line each.
app.add_typer(fingerprint_app, name="fingerprint")
app.add_typer(softlock_app, name="softlock")


@app.command()
def enroll(out: Path = typer.Option(..., "-o", "--out", help="Where to write the device profile (JSON, secret)."),
           source: list[str] = typer.Option(["precision"], "--source", help="Fingerprint source; repeatable.")) -> None:
    """Measure this device and write its profile (the vendor keeps it secret)."""
    from chiplock.profile import enroll as _enroll

    with console.status("measuring fingerprints..."):
        profile = _enroll(source)
    profile.save(out)
    console.print(f"wrote device profile [bold]{out}[/] (sources: {', '.join(profile.sources)}); keep it secret")


def _read_secret(secret_file: Optional[Path]) -> Optional[bytes]:
    if secret_file is None:
        return None
    try:
        return secret_file.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read secret file {secret_file} ({exc.strerror})") from None


@contextlib.contextmanager
def _progress(label: str) -> Iterator:
    """A rich progress bar fed by the verbs' ``progress(stage, done, total)`` callback."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
            bar.update(tasks[stage], completed=done)

        yield update


@app.command("lock")
def lock_cmd(model: Path = typer.Argument(..., help="Weights: .safetensors, or a .pt/.bin state dict."),
             profile: Path = typer.Option(..., "--profile", help="Device profile from `chiplock enroll`."),
             transform: Transform = typer.Option(Transform.pre_aes, "--transform", help="Parameter transform."),
             out: Path = typer.Option(..., "-o", "--out", help="Container to write."),
             secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret (raw bytes)."),
             signing_key: Optional[Path] = typer.Option(None, "--signing-key",
                                                        help="Ed25519 private key (PEM) to sign the file."),
             as_json: bool = typer.Option(False, "--json", help="Print the public metadata as JSON.")) -> None:
    """Lock MODEL to the device of PROFILE and write a container."""
    from chiplock.api import lock
    from chiplock.profile import DeviceProfile

    key = None
    if signing_key is not None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        key = load_pem_private_key(signing_key.read_bytes(), password=None)
    with _progress("lock") as update:
        info = lock(model, out, DeviceProfile.load(profile), transform=transform.value,
                    secret=_read_secret(secret_file), signing_key=key, progress=update)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        console.print(f"locked {len(info['tensors'])} tensors with [bold]{info['transform']}[/] -> {out} "
                      f"({info['total_bytes'] / 1e6:.2f} MB)")


@app.command("unlock")
def unlock_cmd(container: Path = typer.Argument(..., help="A chiplock container."),
               out: Optional[Path] = typer.Option(None, "-o", "--out",
                                                  help="Write the unlocked weights here (.safetensors). "
                                                       "Without it nothing is written."),
               profile: Optional[Path] = typer.Option(None, "--profile",
                                                      help="Unlock as this profile's device would "
                                                           "(default: measure this device)."),
               secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret."),
               verify_key: Optional[Path] = typer.Option(None, "--verify-key",
                                                         help="Vendor's Ed25519 public key (PEM): require a "
                                                              "valid signature."),
               as_json: bool = typer.Option(False, "--json", help="Print a JSON summary.")) -> None:
    """Unlock CONTAINER on this device; write plaintext weights only with -o."""
    from chiplock._io import atomic_writer
    from chiplock.api import unlock
    from chiplock.profile import DeviceProfile

    pub = None
    if verify_key is not None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        pub = load_pem_public_key(verify_key.read_bytes())
    prof = DeviceProfile.load(profile) if profile is not None else None
    with _progress("unlock") as update:
        weights = unlock(container, profile=prof, secret=_read_secret(secret_file), verify_key=pub,
                         progress=update)
    if out is not None:
        from safetensors.torch import save
        with atomic_writer(out, mode=0o600) as fh:
            fh.write(save({k: v.contiguous() for k, v in weights.items()}))
    summary = {"tensors": len(weights), "parameters": sum(v.numel() for v in weights.values()),
               "written": str(out) if out else None}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(f"unlocked {summary['tensors']} tensors ({summary['parameters']:,} parameters)"
                      + (f" -> {out}" if out else " in memory (nothing written; pass -o to write)"))


@app.command("inspect")
def inspect_cmd(container: Path = typer.Argument(..., help="A chiplock container."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show a container's public metadata (needs no key)."""
    from chiplock.api import inspect

    info = inspect(container)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    out = Console()
    out.print(f"[bold]{container}[/]: chiplock v{info['version']}, transform [bold]{info['transform']}[/], "
              f"sources {', '.join(info['sources'])}, vendor secret {'required' if info['secret_required'] else 'no'}, "
              f"{'signed' if info['signed'] else 'unsigned'}")
    table = Table("tensor", "dtype", "shape")
    for name, t in info["tensors"].items():
        table.add_row(name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar")
    out.print(table)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("chiplock-report"), "--out", help="Report folder.")) -> None:
    """Lock a real MNIST model to this machine, show what another machine gets, write a report."""
    from chiplock.demo import run_demo

    with console.status("demo") as status:
        report = run_demo(out, say=console.print, step=lambda s: (console.print(f"- {s}"), status.update(s)))
    from rich.markdown import Markdown

    Console().print(Markdown(report.read_text()))
    Console().print(f"report written to [bold]{report}[/]")


def main() -> None:
    """Console-script entry point: turns ChiplockError into a one-line message and exit code 2."""
    import warnings

    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"
    try:
        app()
    except ChiplockError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
