"""`chiplock split`: split a model into pipeline stages locked one per group, and train it with one stage per rank.

``lock`` (the vendor) builds the architecture, splits it by depth into stages of about equal size, locks it once
with one content key per stage and issues ``stageI.lic`` per rank; ``train`` writes the run's spec and starts
``torchrun`` with one local rank per stage (``--spec-only`` writes the spec for a multi-node launch, see
docs/split.md). Also runnable as ``python -m chiplock.split.cli``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from chiplock.errors import ChiplockError, OutputError, UnsupportedConfig

app = typer.Typer(help="Split a model into stages that no rank holds together; pipeline-train it.",
                  no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)


def _fail(exc: ChiplockError) -> None:
    console.print(f"error: {exc}", markup=False, highlight=False)
    raise typer.Exit(2)


@app.command("lock")
def lock_cmd(
    out: Path = typer.Option(..., "-o", "--out", help="Existing empty folder for model.chiplock, split.json and "
                             "the stage licences."),
    keys: Path = typer.Option(..., "--keys", help="Content keys file to write (mode 0600; keep it secret, outside "
                              "the folder)."),
    profile: List[Path] = typer.Option([], "--profile", help="Device profile of the rank of stage I, in order; one "
                                       "profile licenses every stage to that device. None: issue no licences."),
    arch: str = typer.Option("mlp", help="mlp or resnet18."),
    width: int = typer.Option(64, min=1, help="Hidden units (mlp) or first-stage channels (resnet18)."),
    depth: int = typer.Option(3, min=1, help="Hidden layers (mlp)."),
    image_size: int = typer.Option(28, min=1, help="Input side: 28 for mnist5000, 8 for digits8."),
    stages: int = typer.Option(2, min=1, help="Pipeline stages (ranks)."),
    seed: int = typer.Option(0, help="Seeds the initial weights."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret mixed into the licences."),
    allow_weak_key: bool = typer.Option(False, "--allow-weak-key", help="Issue licences on a weak device key."),
) -> None:
    """Build, split and lock a freshly initialised model; issue one licence per stage."""
    import torch

    from chiplock.profile import DeviceProfile
    from chiplock.split.shards import lock_split
    from chiplock.split.units import ArchSpec, build_units, make_layout

    try:
        try:
            layout = make_layout(ArchSpec(arch, width=width, depth=depth, image_size=image_size), stages)
        except ValueError as exc:
            raise UnsupportedConfig(f"{exc}; see `chiplock split lock --help`") from None
        if not out.is_dir():
            raise UnsupportedConfig(f"output folder {str(out)!r} does not exist; create it first")
        profiles = [DeviceProfile.load(p) for p in profile]
        secret = secret_file.read_bytes().strip() if secret_file else None
        torch.manual_seed(seed)
        units, _ = build_units(layout.arch)
        lics = lock_split(units, layout, out, keys_path=keys, profiles=profiles, secret=secret,
                          allow_weak_key=allow_weak_key)
    except ChiplockError as exc:
        _fail(exc)
    for i, names in enumerate(layout.stages):
        console.print(f"stage{i}: {', '.join(names)}" + (f" -> {lics[i]}" if lics else ""), markup=False)


@app.command("train")
def train_cmd(
    split_dir: Path = typer.Argument(..., help="The folder `chiplock split lock` wrote."),
    out: Path = typer.Option(..., "-o", "--out", help="Existing folder for the trained stages and reports."),
    ranks: int = typer.Option(0, min=0, help="Local ranks (default: one per stage)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Unlock as this device profile (default: "
                                           "measure this device)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret of the licences."),
    data: str = typer.Option("mnist5000", help="mnist5000, digits8 or a .safetensors file."),
    max_train: Optional[int] = typer.Option(None, min=1, help="Use only the first N training images."),
    epochs: int = typer.Option(1, min=1),
    batch_size: int = typer.Option(64, min=1),
    microbatches: int = typer.Option(4, min=1),
    optimizer: str = typer.Option("adam", help="adam or sgd."),
    lr: float = typer.Option(1e-3),
    schedule: str = typer.Option("gpipe", help="gpipe or 1f1b."),
    boundary: bool = typer.Option(True, "--boundary/--no-boundary", help="Fold random boundary maps."),
    rotate_every: int = typer.Option(0, min=0, help="Redraw the boundary maps every N steps (0: never)."),
    scale_max: float = typer.Option(2.0, min=1.0, help="Boundary scales are drawn in [1/S, S]; 1: permutations "
                                    "only."),
    optimizer_state: str = typer.Option("transform", help="On rotation: transform or reset the optimiser state."),
    threads: int = typer.Option(1, min=1, help="torch threads per rank."),
    spec_only: bool = typer.Option(False, "--spec-only", help="Write OUT/spec.json and print the torchrun "
                                   "command instead of running it (for several nodes)."),
) -> None:
    """Pipeline-train the split model, one stage per rank, through torchrun."""
    from chiplock.split.pipeline import SplitTrainSpec
    from chiplock.split.shards import LAYOUT_FILE
    from chiplock.split.units import Layout

    try:
        try:
            spec = SplitTrainSpec(split_dir=str(split_dir.resolve()), out=str(out.resolve()),
                                  profile=str(profile.resolve()) if profile else None,
                                  secret_file=str(secret_file.resolve()) if secret_file else None,
                                  data=str(Path(data).resolve()) if data.endswith(".safetensors") else data,
                                  max_train=max_train, epochs=epochs, batch_size=batch_size,
                                  microbatches=microbatches, optimizer=optimizer, lr=lr, schedule=schedule,
                                  boundary=boundary, rotate_every=rotate_every, optimizer_state=optimizer_state,
                                  scale_range=(1.0 / scale_max, scale_max),
                                  threads=threads)
        except ValueError as exc:
            raise UnsupportedConfig(f"{exc}; see `chiplock split train --help`") from None
        if not out.is_dir():
            raise UnsupportedConfig(f"output folder {str(out)!r} does not exist; create it first")
        try:
            layout = Layout.from_json((split_dir / LAYOUT_FILE).read_text())
        except OSError:
            raise UnsupportedConfig(f"{str(split_dir)!r} holds no {LAYOUT_FILE}; pass the folder `chiplock split "
                                    "lock` wrote") from None
        n = len(layout.stages)
        if ranks and ranks != n:
            raise UnsupportedConfig(f"this split has {n} stages: pass --ranks {n} (one rank per stage)")
        taken = sorted(p.name for p in out.glob("stage*.keys"))
        if taken:
            raise OutputError(f"{str(out)!r} already holds {', '.join(taken)} from an earlier run (their only "
                              "copy); pass another --out")
    except ChiplockError as exc:
        _fail(exc)
    spec_path = out / "spec.json"
    spec_path.write_text(spec.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "chiplock.split.train", "--spec", str(spec_path.resolve())]
    if spec_only:
        print(" ".join(cmd))
        return
    rc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if rc:
        console.print(f"error: torchrun exited with {rc}; see the ranks' messages above", markup=False)
        raise typer.Exit(2)
    print(json.dumps(summarize(out, n), indent=1))


def summarize(out: Path, ranks: int) -> dict:
    """Accuracy, step time and rotation overhead of a finished run, from its per-rank reports."""
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    step = max(sum(r["step_s"]) for r in reports)
    rot = max(sum(r["rotation_s"]) for r in reports)
    return {"accuracy": reports[-1]["accuracy"], "steps": reports[0]["steps"], "train_s": round(step, 3),
            "rotation_s": round(rot, 3), "rotation_overhead": round(rot / step, 4) if step else None,
            "param_bytes_per_rank": [r["held_after_load"]["param_bytes"] for r in reports]}


if __name__ == "__main__":
    try:
        app()
    except ChiplockError as exc:  # raised outside a command's own handler
        console.print(f"error: {exc}", markup=False)
        sys.exit(2)


@app.command("attack")
def attack_cmd(
    preset: str = typer.Option("paper", help="paper: ResNet-18 on mnist5000, p in 0.1..0.9 (hours on 2 CPU cores); "
                               "smoke: seconds."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a setting, KEY=VALUE (JSON value); "
                                             "`--set help=1` lists them."),
    out: Path = typer.Option(Path("bench/results/split"), "-o", "--out", help="Folder for the outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    threads: int = typer.Option(1, min=1, help="Torch threads."),
) -> None:
    """Reconstruction attacks: fine-tune from the shards a fraction p of ranks hold, with and without boundary maps."""
    from chiplock.attacks.cli import run_and_print
    from chiplock.split import reconstruct

    run_and_print("reconstruct", preset=preset, sets=set_, out=out, as_json=as_json, threads=threads, mod=reconstruct)
