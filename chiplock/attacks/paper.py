"""`make paper`: run every attack of the harness and write docs/results.md, the reference work's tables beside ours.

The reference work is Clifford et al., "Locking Machine Learning Models into Hardware" (SaTML 2025): Table 1
(cracking cost), Tables 2-3 (soft locks), Table 4 (emulation), Figures 3-4 (retraining) and 5 (noise), and the
scalability section. Each attack module puts the paper's numbers in its own tables where the paper has one;
this module runs them in order, saves each (``<out>/results/<attack>.{json,md,png}``), and writes
``<out>/results.md``: how it was made, the claims of the README with the row behind each, then one section per
attack. An attack that fails is reported in its section and in the return value, and the others still run.

Usage: ``chiplock attack all [--preset paper|smoke] [-o docs]`` (``make paper``).
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chiplock.attacks.crack import PAPER_C
from chiplock.attacks.result import AttackResult, Progress, describe_machine, machine

#: What ``make paper`` was asked to reproduce, by attack: shown in the report's map.
PAPER_ITEMS = {
    "crack": "Table 1 (cracking cost per guess, c × 2^b)",
    "enumerate": "fingerprint entropy b (the paper: precision fingerprint entropy needs a large-scale experiment)",
    "distinguish": "indistinguishability (Figure 1: wrong-key pre-transformed AES output looks like weights)",
    "emulate": "Table 4 (emulation attack)",
    "retrain": "Figures 3-4 (retraining attack)",
    "noise": "Figure 5 (noise attack)",
    "scale": "Scalability (lock/unlock O(n) once at load; cracking ≫ O(n))",
}


@dataclass
class PaperRun:
    """What :func:`run_paper` did: the results by attack, failures with their error, total seconds."""

    results: dict[str, AttackResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    path: Path | None = None


def run_paper(out: str | Path, *, preset: str = "paper", only: list[str] | None = None, threads: int = 1,
              cache: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
              progress: Progress | None = None, log: Callable[[str], None] | None = None) -> PaperRun:
    """Run the attacks (all, or ``only``) with ``preset`` and write ``<out>/results.md``.

    Args:
        out: Folder of results.md; each attack's files go to ``<out>/results/``.
        preset: ``paper`` or ``smoke``.
        only: Attack names (sub-commands of ``chiplock attack``) to run; default all.
        threads: Torch threads for every attack.
        cache: Folder where attacks that train models keep them between runs (passed as their ``cache``).
        overrides: Per attack, settings that replace the preset's (``{"enumerate": {"attack": False}}``).
        progress: ``progress(stage, done, total)``.
        log: Called with one line per attack started and finished.

    Returns:
        A :class:`PaperRun`.

    Raises:
        UnsupportedConfig: An unknown attack name or preset.
    """
    from chiplock.attacks.cli import ATTACKS, module, run_attack

    names = list(only) if only else list(ATTACKS)
    mods = {n: module(n) for n in names}
    for n, m in mods.items():
        if preset not in m.PRESETS:
            from chiplock.errors import UnsupportedConfig

            raise UnsupportedConfig(f"attack {n} has no preset {preset!r}; use paper or smoke")
    out = Path(out)
    folder = out / "results"
    folder.mkdir(parents=True, exist_ok=True)
    run = PaperRun()
    start = time.perf_counter()
    for i, name in enumerate(names):
        settings: dict[str, Any] = {}
        if cache is not None and "cache" in mods[name].PRESETS[preset]:
            settings["cache"] = str(cache)
        settings.update((overrides or {}).get(name, {}))
        if log:
            log(f"[{i + 1}/{len(names)}] {name} ({preset}) ...")
        t = time.perf_counter()
        try:
            run.results[name] = run_attack(name, preset=preset, overrides=settings, out=folder, threads=threads,
                                           progress=progress)
        except Exception as exc:  # noqa: BLE001 - one failed attack is reported; the others still run.
            run.failed[name] = f"{type(exc).__name__}: {exc}"
            (folder / f"{name}.error.txt").write_text(traceback.format_exc())
        if log:
            log(f"[{i + 1}/{len(names)}] {name}: {'FAILED ' + run.failed[name] if name in run.failed else 'done'}"
                f" in {time.perf_counter() - t:.0f} s")
    run.seconds = time.perf_counter() - start
    meta = {"preset": preset, "names": names, "seconds": run.seconds, "threads": threads, "failed": run.failed,
            "machine": machine()}
    (folder / "paper-run.json").write_text(json.dumps(meta, indent=1))
    run.path = out / "results.md"
    run.path.write_text(compose(run, names, preset=preset, machine_info=meta["machine"], threads=threads))
    return run


def recompose(out: str | Path) -> Path:
    """Write ``<out>/results.md`` again from the files a :func:`run_paper` left in ``<out>/results/`` (after a
    change to the report's wording or claims; no attack runs).

    Raises:
        ContainerError: The folder holds no ``paper-run.json`` (run ``make paper`` first).
    """
    from chiplock.errors import ContainerError

    out = Path(out)
    folder = out / "results"
    try:
        meta = json.loads((folder / "paper-run.json").read_text())
    except (OSError, ValueError):
        raise ContainerError(f"{folder / 'paper-run.json'} is missing or unreadable; run `make paper` first") from None
    run = PaperRun(failed=meta.get("failed", {}), seconds=meta["seconds"], path=out / "results.md")
    for name in meta["names"]:
        try:
            d = json.loads((folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue
        run.results[name] = AttackResult.from_json(d)
    run.path.write_text(compose(run, meta["names"], preset=meta["preset"], machine_info=meta.get("machine"),
                                threads=meta.get("threads", 1)))
    return run.path


def compose(run: PaperRun, names: list[str], *, preset: str, machine_info: dict[str, Any] | None = None,
            threads: int = 1) -> str:
    """The text of results.md."""
    m = dict(machine_info or machine())
    m["torch_threads"] = threads
    lines = [
        "# Results: what each lock costs an attacker",
        "",
        "Generated by `make paper` (`chiplock attack all --preset " + preset + "`); do not edit by hand. Every "
        "number below was measured by that run, on the machine and at the time its section states; the reference "
        "work's numbers (Clifford et al., SaTML 2025, measured on GPUs with ResNet-18/50, BERT and GPT models) "
        "stand beside ours where it has one.",
        "",
        f"Machine: {describe_machine(m)}, every attack on that many torch threads. Total run time "
        f"{run.seconds / 60:.1f} min (preset `{preset}`), including training the soft-locked models once (cached "
        "in `bench/cache/` for later runs).",
        "",
    ]
    if run.failed:
        lines += ["**Failed attacks** (see `results/<attack>.error.txt`): "
                  + "; ".join(f"`{k}`: {v}" for k, v in run.failed.items()), ""]
    lines += ["| attack | reproduces | run time | section |", "|---|---|---|---|"]
    for n in names:
        r = run.results.get(n)
        took = f"{r.seconds:.0f} s" if r else "failed"
        lines.append(f"| `chiplock attack {n}` | {PAPER_ITEMS.get(n, '')} | {took} | [{n}](#{_anchor(r, n)}) |")
    lines.append("")
    claims = claim_rows(run.results)
    if claims:
        lines += ["## The claims of README.md and docs/, with the measurement behind each", "",
                  "| claim | measured | section |", "|---|---|---|"]
        lines += [f"| {c} | {v} | {s} |" for c, v, s in claims]
        lines.append("")
    for n in names:
        r = run.results.get(n)
        if r is None:
            lines += [f"## {n}", "", f"Failed: {run.failed.get(n, 'not run')}", ""]
            continue
        fig = f"results/{n}.png" if run.path is not None and (run.path.parent / "results" / f"{n}.png").exists() \
            else None
        lines.append(r.to_markdown(level=2, figure=fig))
    return "\n".join(lines).rstrip() + "\n"


def _anchor(r: AttackResult | None, name: str) -> str:
    title = r.title if r else name
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def claim_rows(results: dict[str, AttackResult]) -> list[tuple[str, str, str]]:
    """(claim, measured value, section) rows for the claims section, from whatever attacks ran.

    The claims are the README's and docs' statements; the measured value comes from this run's data (an
    extractor per attack, below), so a regression shows in the table instead of hiding behind an old number.
    An extractor that finds its data missing reports that rather than failing the report.
    """
    rows = []
    for name, r in results.items():
        extract = _CLAIMS.get(name)
        try:
            claims = extract(r.data) if extract else []
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            claims = [(f"claims of `{name}`", f"not extracted ({type(exc).__name__}: {exc})")]
        claims += [(str(c.get("claim", "")), str(c.get("measured", ""))) for c in r.data.get("claims", []) or []]
        rows += [(c, v, f"[{name}](#{_anchor(r, name)})") for c, v in claims]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The claims of README.md and docs/, each with the number of this run that backs (or refutes) it.

def _crack_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    kdf = statistics.median(d["kdf_default_s"])
    out = [("Every key guess costs one Argon2id run (default parameters)", f"{kdf:.2f} s per guess on one core")]
    for t, strategy in (("aes", "tag"), ("shuffle", "tag"), ("pre-aes", "distinguisher")):
        rows = [s for s in d["searches"] if s["transform"] == t and s["strategy"] == strategy]
        cost = next((c for c in d["costs"] if c["transform"] == t and c["strategy"] == strategy), None)
        if rows and cost:
            found = sum(bool(s["found"]) for s in rows)
            bits = ", ".join(str(b) for b in sorted({s["bits"] for s in rows}))
            out.append((f"`{t}`: a guess is checked by its {'licence tag' if strategy == 'tag' else 'structure'}, "
                        "not by running the model",
                        f"right key found {found}/{len(rows)} (b = {bits}); "
                        f"check {cost['check_s'] * 1e3:.3g} ms on FP16 ResNet-18; c = {kdf + cost['check_s']:.2f} s "
                        f"vs paper {PAPER_C.get(t, '—')} s"))
    return out


def _distinguish_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for t, rows in d["trained"].items():
        aucs = [r["auc"] for r in rows.values()]
        fast = min(r["ms"] for r in rows.values() if r["auc"] >= 0.99) if any(a >= 0.99 for a in aucs) else None
        out.append((f"`{t}` wrong-key weights are told from the right ones by structure, without data",
                    f"{sum(a >= 0.99 for a in aucs)}/{len(aucs)} (statistic, tensor) pairs at AUC ≥ 0.99; "
                    f"cheapest such check {fast:.3g} ms" if fast is not None else "no statistic reached AUC 0.99"))
    return out


def _enumerate_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    e = d["enumeration"]
    bound = "at least " if e.get("lower_bound") else ""
    out = [("Software settings reach about 12.5 bits of precision fingerprints on one machine",
            f"{bound}{e['composed']:,} configurations = {e['bits']} bits (upper bound {e['upper_bits']} bits); "
            f"{e['distinct_observed']} distinct among {e['configurations']} run")]
    a = d.get("attack") or {}
    if a:
        out.append(("A precision-only file opens to an attacker who walks the configurations",
                    f"opened: {a['opened']} after {a['guesses']} guesses ({a['search_s']:.0f} s); mean "
                    f"{a['mean_guesses']} guesses over {a['walk']} configurations"))
    return out


def _emulate_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for cfg in ("int8", "bf16", "fp16", "e4m3fn"):
        g, m = d["cpu"]["gpt"].get(cfg, {}), d["cpu"]["matmul"].get(cfg, {})
        if g.get("slowdown") is not None:
            out.append((f"Emulating an authorized {cfg} configuration costs the attacker speed",
                        f"{m.get('slowdown', float('nan')):.2f}x on a matmul, {g['slowdown']:.2f}x on GPT inference "
                        f"(CPU; paper GPU int8 3.52x / 1.88x)"))
    return out


def _scale_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for f in d["fits"]:
        if f["op"] == "unlock":
            out.append((f"`{f['transform']}` unlock time is linear in the parameter count, paid once at load",
                        f"{f['slope'] * 1e9:.3g} ns/parameter, R² {f['r2']:.3f}"))
    return out


def _retrain_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for pair, v in d["pairs"].items():
        m = v["model"]
        out.append((f"Soft lock `{pair}`: works authorized, fails unauthorized (Δorig ≤ 0.02)",
                    f"authorized {m['locked_authorized']:.3f} (original {m['original_authorized']:.3f}), "
                    f"unauthorized {m['locked_unauthorized']:.3f}"))
        rows = ", ".join(f"{r['fraction']:.0%}: {r['unauthorized_accuracy']:.3f} vs {r['scratch_accuracy']:.3f}"
                         for r in v["retrain"]["rows"])
        out.append((f"Retraining `{pair}` recovers no more than training from scratch with the same data",
                    f"retrained vs scratch: {rows}"))
    return out


def _noise_claims(d: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for pair, v in d["pairs"].items():
        rows = v["rows"]
        best = max(rows, key=lambda r: max(r["unauthorized"], r.get("deployed") or 0.0))
        locked = next(r["authorized"] for r in rows if r["scale"] == 0)
        what = (f"The paper's plain lock `{pair}` against weight noise (paper: partially effective)" if "[none]" in pair
                else f"Weight noise does not unlock `{pair}`")
        out.append((what,
                    f"best unauthorized {max(best['unauthorized'], best.get('deployed') or 0.0):.3f} (s = "
                    f"{best['scale']}, authorized then {best['authorized']:.3f}); locked authorized {locked:.3f}"))
    return out


_CLAIMS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {
    "crack": _crack_claims, "distinguish": _distinguish_claims, "enumerate": _enumerate_claims,
    "emulate": _emulate_claims, "scale": _scale_claims, "retrain": _retrain_claims, "noise": _noise_claims,
}
