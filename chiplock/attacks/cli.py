"""`chiplock attack`: attacks that price every lock, one sub-command each (``crack``, ``enumerate``, ...).

Every sub-command runs one attack module of :mod:`chiplock.attacks` with a preset (``paper``: the settings behind
docs/results.md; ``smoke``: seconds, to check it works) and optional ``--set key=value`` overrides, writes
``<out>/<attack>.json``, ``.md`` and ``.png``, and prints the tables (or the JSON with ``--json``). ``chiplock
attack all`` runs every attack and writes the combined report (what ``make paper`` runs).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown

from chiplock.errors import UnsupportedConfig

#: Sub-command -> (module under chiplock.attacks, one-line help). The order is the report's.
ATTACKS: dict[str, tuple[str, str]] = {
    "crack": ("crack", "Crack hard locks over a reduced key space: cost per guess (KDF / check), success."),
    "enumerate": ("enumeration", "Count the precision-fingerprint configurations software reaches here; open a "
                  "precision-locked file by walking them."),
    "distinguish": ("distinguish", "The structural panel: AUC per statistic and tensor, right vs wrong keys."),
    "emulate": ("emulate", "Native vs emulated throughput and latency per authorized configuration (Table 4)."),
    "retrain": ("retraining", "Fine-tune soft-locked models in the unauthorized configuration with 1/10/100 % of "
                "the data, against training from scratch (Figures 3-4)."),
    "noise": ("noise", "Gaussian weight noise against soft locks: authorized and unauthorized accuracy (Fig. 5)."),
    "scale": ("scale", "Lock/unlock time vs parameter count (linear fit) and the attacker's cost per guess."),
    "steal": ("chiplock.enclave.stealing", "Model stealing against partitioned models (TEESlice protocol), per "
              "strategy, and ShadowNet's filter matching (also `chiplock enclave attack`)."),
    "extract": ("chiplock.enclave.extraction", "Chosen-input extraction from partitioned models (active host): exact "
                "attacks per strategy and the mitigations against them."),
}

app = typer.Typer(help="Attacks that price the locks: each writes a table (.md, .json) and a plot (.png).",
                  no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)

_PRESET_HELP = "paper: the settings behind docs/results.md (minutes); smoke: a quick check (seconds)."
_SET_HELP = ("Override one setting of the preset, KEY=VALUE with VALUE as JSON (e.g. --set 'bits=[6,8]' "
             "--set trials=2); repeatable. `--set help=1` lists the settings.")


def module(name: str):
    """The attack module behind sub-command ``name`` (a module of :mod:`chiplock.attacks`, or a dotted path for
    attacks that live with what they attack, such as :mod:`chiplock.enclave.stealing`)."""
    if name not in ATTACKS:
        raise UnsupportedConfig(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    mod = ATTACKS[name][0]
    return importlib.import_module(mod if "." in mod else f"chiplock.attacks.{mod}")


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``["bits=[6,8]", "model=digitcnn"]`` -> ``{"bits": [6, 8], "model": "digitcnn"}`` (JSON, else a string).

    Raises:
        UnsupportedConfig: An item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UnsupportedConfig(f"--set takes KEY=VALUE, got {item!r}; e.g. --set trials=2")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _progress(label: str):
    """The rich progress bar of the main CLI (imported when used: chiplock.cli mounts this app)."""
    from chiplock.cli import _progress as progress_bar

    return progress_bar(label)


def run_attack(name: str, *, preset: str = "paper", overrides: dict[str, Any] | None = None,
               out: Path | None = None, threads: int = 1, progress=None, mod: Any = None):
    """Run attack ``name`` with ``preset`` and ``overrides`` on ``threads`` torch threads; save into ``out``.

    ``mod`` runs a module of the same shape (``PRESETS``, ``run``) that is not a registered attack, such as a
    measurement (:mod:`chiplock.enclave.overhead`).

    Returns:
        The :class:`~chiplock.attacks.result.AttackResult`.

    Raises:
        UnsupportedConfig: Unknown attack, preset or setting.
    """
    import torch

    mod = mod if mod is not None else module(name)
    overrides = dict(overrides or {})
    if overrides.pop("help", None) is not None:
        presets = mod.PRESETS
        raise UnsupportedConfig(f"{name} takes: " + "; ".join(
            f"{k} (paper {presets['paper'][k]!r}, smoke {presets['smoke'][k]!r})" for k in presets["paper"]))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = mod.run(preset=preset, progress=progress, **overrides)
    finally:
        torch.set_num_threads(before)
    if out is not None:
        result.save(out)
    return result


def run_and_print(name: str, *, preset: str, sets: list[str] | None, out: Path, as_json: bool, threads: int,
                  mod: Any = None) -> None:
    """What every harness command does: run with a progress bar, save into ``out``, print the tables (or JSON)."""
    with _progress(name) as bar:
        result = run_attack(name, preset=preset, overrides=parse_sets(sets), out=out, threads=threads, progress=bar,
                            mod=mod)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), default=str) + "\n")
    else:
        out_console.print(Markdown(result.to_markdown()))
        console.print(f"wrote {out / (result.name + '.md')} (and .json{', .png' if result.plot else ''})")


def _command(name: str, help_text: str) -> None:
    def command(preset: str = typer.Option("paper", help=_PRESET_HELP),
                set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
                out: Path = typer.Option(Path("attack-results"), "-o", "--out", help="Folder for the outputs."),
                as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
                threads: int = typer.Option(1, min=1, help="Torch threads (timings are per thread count).")) -> None:
        run_and_print(name, preset=preset, sets=set_, out=out, as_json=as_json, threads=threads)

    command.__doc__ = help_text
    app.command(name)(command)


for _name, (_mod, _help) in ATTACKS.items():
    _command(_name, _help)


@app.command("all")
def all_cmd(preset: str = typer.Option("paper", help=_PRESET_HELP),
            only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these attacks (repeatable)."),
            out: Path = typer.Option(Path("docs"), "-o", "--out",
                                     help="Folder for results.md; tables and figures go to <out>/results/."),
            threads: int = typer.Option(1, min=1, help="Torch threads."),
            cache: Path = typer.Option(Path("bench/cache"), help="Trained models are cached here between runs."),
            recompose: bool = typer.Option(False, "--recompose", help="Run nothing: rewrite <out>/results.md from "
                                           "the files the last run left in <out>/results/.")) -> None:
    """Run every attack and write <out>/results.md with the paper's numbers beside ours (`make paper`)."""
    from chiplock.attacks.paper import recompose as recompose_results
    from chiplock.attacks.paper import run_paper

    if recompose:
        console.print(f"wrote {recompose_results(out)}")
        return

    for name in only or []:
        module(name)
    with _progress("paper") as bar:
        run = run_paper(out, preset=preset, only=list(only) if only else None, threads=threads, cache=cache,
                        progress=bar, log=lambda m: console.print(m))
    console.print(f"wrote {run.path} in {run.seconds / 60:.1f} min")
    if run.failed:
        sys.stderr.write(f"error: {len(run.failed)} attack(s) failed: {', '.join(run.failed)}; their tracebacks "
                         f"are in {out / 'results'}/<attack>.error.txt\n")
        raise typer.Exit(2)
