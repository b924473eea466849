"""`chiplock softlock`: lock-train a model to its authorized number format or sparsity, and evaluate the lock.

``train``'s lock options (``--lambda``, ``--epochs``, ...) are built from :class:`SoftLockConfig`'s fields, and the
format names come from the soft-lock registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from chiplock._io import check_input, check_output
from chiplock.registry import load_plugins, options_from_dataclass, with_options
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.registry import example_names

app = typer.Typer(help="Soft locking: models that work only in their authorized number format or sparsity.",
                  no_args_is_help=True)
console = Console()
_MODEL_HINT = "pass a model written by `chiplock softlock train`"
load_plugins()
_NAMES = ", ".join(example_names())


def _load(path: Path, what: str):
    """Read a soft-lock model; a missing or unreadable file is a one-line ChiplockError, not a traceback."""
    from chiplock.errors import ChiplockError, UnsupportedConfig
    from chiplock.softlock.model_io import load_model

    check_input(path, what, _MODEL_HINT)
    try:
        return load_model(path)
    except (ChiplockError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file becomes one clear error.
        raise UnsupportedConfig(f"cannot read {what} {str(path)!r} ({type(exc).__name__}); {_MODEL_HINT}") from None


#: The lock options of `train`, one per documented SoftLockConfig field.
_LOCK_OPTIONS = options_from_dataclass(SoftLockConfig)


@app.command()
@with_options(_LOCK_OPTIONS)
def train(
    authorized: str = typer.Option("fp32", help=f"Authorized configuration, e.g. {_NAMES}."),
    unauthorized: List[str] = typer.Option(..., help="Unauthorized configuration; repeatable (e.g. int8, 2:4)."),
    out: Path = typer.Option(Path("locked.safetensors"), "-o", "--out", help="Locked model (safetensors)."),
    base: Optional[Path] = typer.Option(None, help="Trained model to lock; default: train the fp32 original."),
    original_out: Optional[Path] = typer.Option(None, help="Where to save the trained original "
                                                "(default: <out>.original.safetensors)."),
    data: str = typer.Option("mnist5000", help="mnist5000 (28x28) or digits8 (8x8)."),
    arch: str = typer.Option("resnet18", help="resnet18, resnet50, smallcnn or gpt."),
    width: int = typer.Option(16, help="First-stage channels (64 is the standard ResNet)."),
    pretrain_epochs: int = typer.Option(3, help="Epochs for the original when --base is not given."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file (resumed when it exists)."),
    max_train: Optional[int] = typer.Option(None, help="Use only the first N training images."),
    nproc: int = typer.Option(1, help="DDP processes (torchrun, gloo on CPU / NCCL on GPU)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    **lock_options: Any,
) -> None:
    """Fine-tune a model so it works on AUTHORIZED and drops to chance on every UNAUTHORIZED configuration."""
    from chiplock.errors import UnsupportedConfig
    from chiplock.softlock.pipeline import TrainSpec, load_dataset, pretrain, run_lock

    # Fail on a typo in a format name or an option before any training starts.
    try:
        lock = SoftLockConfig(authorized=authorized, unauthorized=tuple(unauthorized),
                              **{o.name: o.value(lock_options[o.name]) for o in _LOCK_OPTIONS})
    except ValueError as exc:
        raise UnsupportedConfig(f"{exc}; see `chiplock softlock train --help`") from None
    if base is not None:
        check_input(base, "base model", _MODEL_HINT)
    for path in (out, original_out, checkpoint):
        if path is not None:
            check_output(path, kind="file", inputs=[base] if base is not None else [])
    common = dict(out=str(out), lock=lock, data=data, arch=arch, width=width, pretrain_epochs=pretrain_epochs)
    if base is None:
        base = original_out or out.with_name(out.stem + ".original.safetensors")
        with console.status(f"training the fp32 original ({arch}, {pretrain_epochs} epochs)..."):
            pretrain(TrainSpec(**common), load_dataset(data), str(base))
        console.print(f"wrote original [bold]{base}[/]")
    spec = TrainSpec(**common, base=str(base), checkpoint=None if checkpoint is None else str(checkpoint),
                     max_train=max_train)
    if nproc > 1:
        _launch_ddp(spec, nproc, progress)
    else:
        run_lock(spec, progress=progress)
    console.print(f"wrote locked model [bold]{out}[/] (authorized {authorized}; unauthorized "
                  f"{', '.join(unauthorized)}); evaluate with: chiplock softlock eval {out} --original {base}")


def _launch_ddp(spec, nproc: int, progress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        Path(path).write_text(spec.to_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "chiplock.softlock.ddp", "--spec", path]
        env = dict(os.environ, CHIPLOCK_PROGRESS="1" if progress else "0")
        rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        from chiplock.errors import ChiplockError

        raise ChiplockError(f"DDP lock training failed (torchrun exit code {rc})")


@app.command("eval")
def evaluate(
    locked: Path = typer.Argument(..., help="Locked model written by `chiplock softlock train`."),
    original: Optional[Path] = typer.Option(None, help="The model before locking (for Δorig)."),
    config: List[str] = typer.Option([], "--config", help="Extra configuration to evaluate; repeatable."),
    out: Path = typer.Option(Path("softlock-report"), "-o", "--out", help="Folder for JSON, Markdown and PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print and write the paper-style table Acc_authorized^locked (Δorig, Δlock) plus accuracy per configuration."""
    from chiplock.softlock.pipeline import load_dataset
    from chiplock.softlock.report import build_report, write_report
    from chiplock._extras import require

    require(("matplotlib",), "softlock", what="the soft-lock report's plot")
    model, info = _load(locked, "locked model")
    if "lock" not in info:
        from chiplock.errors import UnsupportedConfig

        raise UnsupportedConfig(f"{locked} is not a locked model (no lock description); pass the locked file")
    orig = _load(original, "original model")[0] if original is not None else None
    data = load_dataset(info["data"])
    lock = info["lock"]
    from chiplock.softlock.registry import config_from_dict

    auth = config_from_dict(lock["authorized"])
    unauth = [config_from_dict(u) for u in lock["unauthorized"]]
    with console.status("evaluating..."):
        report = build_report(model, data.x_test, data.y_test, authorized=auth, unauthorized=unauth,
                              configs=config, original=orig, info={"locked": str(locked), "data": info["data"]})
    paths = write_report(report, out)
    if as_json:
        typer.echo(report.to_json())
        return
    table = Table(title="Soft lock: Acc_authorized^locked (Δorig, Δlock)")
    table.add_column("authorized -> unauthorized")
    table.add_column("Acc (Δorig, Δlock)")
    for r in report.rows:
        table.add_row(f"{r.authorized} -> {r.unauthorized}", r.cell())
    console.print(table)
    acc = Table(title="Accuracy per configuration")
    for col in ("configuration", "original", "locked"):
        acc.add_column(col)
    for c in report.configs:
        acc.add_row(c, "" if report.original is None else f"{report.original[c]:.3f}", f"{report.locked[c]:.3f}")
    console.print(acc)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def attack(
    locked: Path = typer.Argument(..., help="Locked model written by `chiplock softlock train`."),
    unauthorized: List[str] = typer.Option([], help="Target configuration(s); default: the lock's unauthorized."),
    calib: int = typer.Option(256, help="Unlabelled calibration images the attacker uses."),
    standard_only: bool = typer.Option(False, help="Skip the bespoke (mechanism-aware) attacks."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the table as JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Deploy LOCKED on its unauthorized configuration with every standard tool of that format (amax/MX scaling,
    BN folding and re-estimation, cross-layer equalisation, bias correction, GPTQ, Wanda, SparseGPT, ...) and
    report the accuracy each reaches: the lock is as strong as the best row."""
    import json

    from rich.progress import Progress

    from chiplock.errors import UnsupportedConfig
    from chiplock.softlock.deploy import attack_table, recipes_for
    from chiplock.softlock.pipeline import load_dataset
    from chiplock.softlock.registry import config_from_dict, parse_config

    model, info = _load(locked, "locked model")
    if out is not None:
        check_output(out, kind="file", inputs=[locked])
    targets = [parse_config(u) for u in unauthorized] or [config_from_dict(u) for u in
                                                          info.get("lock", {}).get("unauthorized", [])]
    if not targets:
        raise UnsupportedConfig(f"{locked} records no unauthorized configuration; pass --unauthorized e4m3fn")
    if calib < 1:
        raise UnsupportedConfig("--calib must be at least 1 image")
    data = load_dataset(info["data"])
    results = []
    for target in targets:
        recipes = recipes_for(target, standard_only=standard_only, model=model)
        with Progress(console=console, transient=True, disable=as_json) as bar:
            task = bar.add_task(f"attacking {target.name}", total=len(recipes))
            table = attack_table(model, target, data.x_train[:calib], data.x_test, data.y_test, recipes=recipes,
                                 on_row=lambda r: bar.advance(task))
        results.append(table.to_dict() | {"best_standard": table.best().recipe,
                                          "best_standard_accuracy": table.best().accuracy})
        if not as_json:
            t = Table(title=f"{locked.name} deployed on {target.name}")
            for col in ("recipe", "runs on", "accuracy", "seconds", "kind"):
                t.add_column(col)
            best = table.best(standard_only=False)
            for r in table.rows:
                style = "bold red" if r is best else None
                t.add_row(r.recipe, r.config, f"{r.accuracy:.3f}", f"{r.seconds:.1f}",
                          "standard" if r.standard else "bespoke", style=style)
            console.print(t)
            for recipe, err in table.failed:
                console.print(f"[yellow]recipe {recipe} failed on this model: {err}[/]")
    text = json.dumps(results, indent=2)
    if out is not None:
        from chiplock._io import atomic_write_bytes

        atomic_write_bytes(out, text.encode())
    if as_json:
        typer.echo(text)


@app.command()
def formats() -> None:
    """List the registered configurations and example names."""
    from chiplock.softlock.registry import registered_types

    console.print("types: " + ", ".join(registered_types()))
    console.print(f"names: {' '.join(example_names())} (+ composes several, applied left to right)")
