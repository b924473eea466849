"""``chiplock attack enumerate``: the precision fingerprint's configurations on this machine, and a file opened by
walking them.

The precision fingerprint identifies a software *configuration* (library kernels, ISA limits, thread counts), and
an attacker on the same kind of machine only has to guess the settings.
:func:`chiplock.fingerprint.configurations.enumerate_configurations` measures how many distinct fingerprints the
settings reach here (fresh processes, counts only): the number of guesses an attacker faces at most.

The end-to-end attack then does it on a real file. The *victim*, in a fresh process under a configuration drawn at
random from the attack space (environment variables and torch's thread count), enrolls a precision-only profile
and locks a small model with ``transform="aes"`` (``allow_weak_key=True``; the device key uses the insecure fast
KDF so that the search finishes, and the default Argon2id time is measured apart). The *attacker* holds only the
file. It walks the space's configurations, defaults first and one representative per class the enumeration found
(then every remaining setting, should the classes mislead), and in a fresh process per configuration reproduces
the precision material from the file's public helper data and tries to open the file: AES-GCM rejects a wrong
guess. Key material never leaves the victim's and the attacker's own child processes; they print timings and
whether the file opened, nothing else.

Example:
    >>> from chiplock.attacks import enumeration
    >>> result = enumeration.run(preset="smoke")  # doctest: +SKIP
    >>> result.data["attack"]["guesses"] <= result.data["attack"]["walk"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chiplock.attacks.result import (
    AttackResult,
    Progress,
    Table,
    new_figure,
    resolve,
    save_figure,
)
from chiplock.errors import UnsupportedConfig
from chiplock.fingerprint.configurations import (
    CLEARED,
    TORCH_THREADS,
    UNSET,
    Space,
    _setting,
    default_space,
)

#: The two-variable space of tests/fingerprint/test_precision_configurations.py (x86 settings): ATen forced to its
#: baseline ISA, OpenBLAS forced to a 2004 core.
SMOKE_SPACE: Space = {
    "ATEN_CPU_CAPABILITY": {UNSET: {}, "default": {"ATEN_CPU_CAPABILITY": "default"}},
    "OPENBLAS_CORETYPE": {UNSET: {}, "Prescott": {"OPENBLAS_CORETYPE": "Prescott"}},
}

#: ``space``: ``"smoke"`` (:data:`SMOKE_SPACE`) or ``"default"`` (:func:`default_space`); ``max_joint``, ``checks``,
#: ``workers``, ``timeout``: passed to ``enumerate_configurations``; ``attack``: run the end-to-end attack;
#: ``attack_variables``: the variables the victim's configuration is drawn from (``None``: all of the space);
#: ``seed``: the victim's draw (``None``: random); ``victim``: the victim's configuration (variable -> label) instead
#: of a draw, e.g. for a test.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"space": "smoke", "max_joint": 24, "checks": 0, "workers": 2, "timeout": 300.0, "attack": True,
              "attack_variables": None, "seed": None, "victim": None},
    "paper": {"space": "default", "max_joint": 96, "checks": 2, "workers": 2, "timeout": 300.0, "attack": True,
              "attack_variables": ["ATEN_CPU_CAPABILITY", TORCH_THREADS, "OPENBLAS_NUM_THREADS"], "seed": None,
              "victim": None},
}
#: The earlier full measurement (docs/fingerprints.md, 2026-12-01, default space with max_joint 96 and 6 checks).
DOCS_DEFAULT = {"configurations": 152, "distinct_observed": 116, "composed": 5760, "bits": 12.49}
#: The issue's first count on an AVX2 machine, and its end-to-end figure.
ISSUE = {"composed": 384, "guesses": 45}

_VICTIM = r"""
import json, sys, time, warnings
threads, src, out = sys.argv[1:4]
import torch
if threads != "-":
    torch.set_num_threads(int(threads))
import chiplock
from chiplock.keys import INSECURE_FAST, KdfParams
t0 = time.perf_counter()
profile = chiplock.enroll(("precision",), kdf=KdfParams(**INSECURE_FAST))
t1 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The weak key is the point of the experiment.
    chiplock.lock(src, out, profile, transform="aes", allow_weak_key=True)
print(json.dumps({"enroll_s": t1 - t0, "lock_s": time.perf_counter() - t1}))
"""

_ATTACKER = r"""
import json, sys, time
threads, path = sys.argv[1:3]
import torch
if threads != "-":
    torch.set_num_threads(int(threads))
import chiplock
from chiplock.errors import InvalidKey
from chiplock.fingerprint import Enrollment, get_source
t0 = time.perf_counter()
helper = chiplock.inspect(path)["helpers"]["precision"]
material = get_source("precision").reproduce(helper)
t1 = time.perf_counter()
guess = chiplock.DeviceProfile(enrollments=(Enrollment(source="precision", helper=helper, material=material),))
try:
    chiplock.unlock(path, guess)
    opened = True
except InvalidKey:
    opened = False
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)  # The whole guess: interpreter, imports, probes, KDF, decrypt.
print(json.dumps({"opened": opened, "probe_s": t1 - t0, "open_s": time.perf_counter() - t1,
                  "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _space(name: str) -> Space:
    if name == "smoke":
        if not _is_x86():
            raise UnsupportedConfig(f"the smoke space sets x86 options (ATEN_CPU_CAPABILITY, OPENBLAS_CORETYPE); this "
                                    f"machine is {platform.machine()}: use --set space=default")
        return SMOKE_SPACE
    if name == "default":
        return default_space()
    raise UnsupportedConfig(f"unknown space {name!r}; use smoke or default")


def _env(setting: Mapping[str, str]) -> dict[str, str]:
    # As the enumeration's children: the parent's own settings must not leak into a configuration.
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({k: v for k, v in setting.items() if k != TORCH_THREADS})
    return env


def _child(code: str, setting: Mapping[str, str], args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``code`` in a fresh process under ``setting``; its JSON line plus ``wall_s`` (or ``error``)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-c", code, setting.get(TORCH_THREADS, "-"), *args], env=_env(setting),
                             capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        return {"error": last[:300], "wall_s": wall}
    try:
        return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": wall}
    except (ValueError, IndexError):
        return {"error": "no result line", "wall_s": wall}


def walk_order(space: Space, classes: Mapping[str, list[list[str]]] | None = None) -> list[dict[str, str]]:
    """The attacker's order of configurations (variable -> label): defaults first, then by how many variables
    leave their default; one representative per class first (when ``classes`` gives them), then every remaining
    combination of settings.

    Args:
        space: The variables and their settings (first setting: the default).
        classes: Per variable, its settings grouped by fingerprint (:attr:`Enumeration.classes`); a variable
            missing from it has one class per setting.

    Returns:
        Every combination of the space's settings exactly once, in the order an attacker tries them.
    """
    names = list(space)

    def ordered(options: list[list[str]]) -> list[tuple[str, ...]]:
        combos = list(itertools.product(*[range(len(o)) for o in options]))
        combos.sort(key=lambda c: (sum(i > 0 for i in c), c))
        return [tuple(o[i] for o, i in zip(options, c)) for c in combos]

    reps = [[g[0] for g in (classes or {}).get(v, [[label] for label in space[v]])] for v in names]
    first = ordered(reps)
    seen = set(first)
    rest = [c for c in ordered([list(space[v]) for v in names]) if c not in seen]
    return [dict(zip(names, c)) for c in first + rest]


def mean_guesses(space: Space, classes: Mapping[str, list[list[str]]] | None) -> float:
    """Guesses the walk needs on average for a victim drawn uniformly from ``space``, if the classes hold jointly
    (each setting opens where its class representative does)."""
    order = walk_order(space, classes)
    pos = {tuple(o.values()): i + 1 for i, o in enumerate(order)}
    rep = {v: {label: g[0] for g in (classes or {}).get(v, []) for label in g} for v in space}
    names = list(space)
    found = [pos[tuple(rep[v].get(label, label) for v, label in zip(names, c))]
             for c in itertools.product(*[list(space[v]) for v in names])]
    return sum(found) / len(found)


def _small_model(path: Path) -> int:
    """A small random MLP (64-32-10) saved as safetensors: what the victim locks (its values do not matter to an
    AES-GCM key check). Returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"fc1.weight": torch.randn(32, 64, generator=g) * 0.1, "fc1.bias": torch.zeros(32),
          "fc2.weight": torch.randn(10, 32, generator=g) * 0.1, "fc2.bias": torch.zeros(10)}
    save_file(sd, str(path))
    return sum(t.numel() for t in sd.values())


def _argon2_default_s(repeats: int = 3) -> float:
    """Median seconds of one Argon2id run at the default parameters (what each guess would cost a real file):
    :func:`chiplock.attacks.crack.kdf_seconds`."""
    from chiplock.attacks.crack import kdf_seconds

    return statistics.median(kdf_seconds(repeats))


def _check_victim(space: Space, victim: Any) -> None:
    if not isinstance(victim, Mapping) or set(victim) != set(space) or any(victim[v] not in space[v] for v in space):
        example = json.dumps({v: list(s)[-1] for v, s in space.items()})
        raise UnsupportedConfig(f"victim must give one setting of each of {', '.join(space)}, e.g. {example}")


def attack(space: Space, classes: Mapping[str, list[list[str]]] | None, *, workers: int = 2, seed: int | None = None,
           victim: Mapping[str, str] | None = None, timeout: float = 300.0,
           progress: Progress | None = None) -> dict[str, Any]:
    """The end-to-end attack: a victim locks a file under a random configuration of ``space``; the attacker walks
    :func:`walk_order` and tries to open it from each configuration.

    Args:
        space: The attack space (variables and settings).
        classes: The enumeration's classes per variable (the attacker's knowledge), or ``None``.
        workers: Attacker processes run at once.
        seed: The victim's draw (``None``: random).
        victim: The victim's configuration (variable -> label, every variable of ``space``) instead of a draw.
        timeout: Seconds one child may take.
        progress: Optional ``progress(stage, done, total)``.

    Returns:
        Public facts: the victim's configuration (labels), guesses until the file opened, processes run, timings.

    Raises:
        UnsupportedConfig: ``victim`` does not name one setting of every variable of ``space``.
        FingerprintError: The victim cannot enroll or lock in its configuration.
    """
    from chiplock.errors import FingerprintError

    if victim is None:
        rng = random.Random(seed)
        victim = {v: rng.choice(list(settings)) for v, settings in space.items()}
    else:
        _check_victim(space, victim)
    victim = {v: victim[v] for v in space}
    order = walk_order(space, classes)
    n_reps = math.prod(len((classes or {}).get(v, space[v])) for v in space)
    with tempfile.TemporaryDirectory(prefix="chiplock-enumerate-") as tmp:
        src, locked = Path(tmp) / "model.safetensors", Path(tmp) / "model.chiplock"
        params = _small_model(src)
        if progress:
            progress("victim enrolls and locks", 0, 1)
        v = _child(_VICTIM, _setting(space, victim), [str(src), str(locked)], timeout)
        if "error" in v or not locked.is_file():
            raise FingerprintError(f"the victim could not enroll and lock under {victim}: {v.get('error')}; run "
                                   "`chiplock fingerprint --source precision` to see why")
        tries: list[dict[str, Any]] = []
        opened_at = None
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i in range(0, len(order), workers):
                batch = order[i:i + workers]
                outs = list(pool.map(lambda a: _child(_ATTACKER, _setting(space, a), [str(locked)], timeout), batch))
                for j, (a, r) in enumerate(zip(batch, outs)):
                    tries.append({"configuration": a, **r})
                    if r.get("opened") and opened_at is None:
                        opened_at = i + j + 1
                if progress:
                    progress("attacker walks the space", len(tries), len(order))
                if opened_at is not None:
                    break
        search_s = time.perf_counter() - start
    walls = [t["wall_s"] for t in tries]
    cpus = [t["cpu_s"] for t in tries if "cpu_s" in t]
    probes = [t["probe_s"] for t in tries if "probe_s" in t]
    opens = [t["open_s"] for t in tries if "open_s" in t]
    return {"victim": victim, "victim_times": v, "parameters": params,
            "settings": math.prod(len(s) for s in space.values()), "walk": n_reps,
            "mean_guesses": mean_guesses(space, classes), "guesses": opened_at, "opened": opened_at is not None,
            "processes": len(tries),
            "failed": sum("error" in t for t in tries), "search_s": search_s,
            "process_s": statistics.median(walls), "cpu_s": statistics.median(cpus) if cpus else None,
            "probe_s": statistics.median(probes) if probes else None,
            "open_fast_kdf_s": statistics.median(opens) if opens else None,
            "tries": [{"configuration": t["configuration"], "opened": bool(t.get("opened")), "wall_s": t["wall_s"],
                       **({"error": t["error"]} if "error" in t else {})} for t in tries]}


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides: Any) -> AttackResult:
    """Enumerate the precision fingerprint's configurations here and open a precision-locked file by walking them.

    Args:
        preset: ``"paper"`` (:func:`~chiplock.fingerprint.configurations.default_space`, minutes) or ``"smoke"``
            (two x86 variables, about half a minute: it runs about ten fresh processes).
        progress: Optional ``progress(stage, done, total)``.
        **overrides: Settings of the preset to change (see :data:`PRESETS`).

    Returns:
        The :class:`~chiplock.attacks.result.AttackResult` (``name="enumerate"``): the count, classes per
        variable, the jointly measured clusters, the end-to-end attack, and a bar plot of classes per variable.

    Raises:
        UnsupportedConfig: Unknown preset, setting, space or attack variable; the smoke space on a non-x86 machine.
        FingerprintError: The probe suite cannot run in a fresh process here.
    """
    from chiplock.fingerprint.configurations import enumerate_configurations

    params = resolve(PRESETS, preset, overrides)
    space = _space(params["space"])
    names = params["attack_variables"]
    if names is not None:
        unknown = [n for n in names if n not in space]
        if unknown or not names:
            raise UnsupportedConfig(f"attack_variables {', '.join(unknown) or '[]'} not in the {params['space']} "
                                    f"space; choose from {', '.join(space)}")
    if int(params["workers"]) < 1:
        raise UnsupportedConfig("workers must be >= 1")
    sub = {n: space[n] for n in (names or space)}
    if params["attack"] and params["victim"] is not None:
        _check_victim(sub, params["victim"])  # Before the minutes of enumeration, not after.
    start = time.perf_counter()
    enum = enumerate_configurations(space, workers=int(params["workers"]), max_joint=int(params["max_joint"]),
                                    checks=int(params["checks"]), timeout=float(params["timeout"]),
                                    progress=progress)
    result = {"enumeration": enum.to_json()}
    if params["attack"]:
        result["attack"] = attack(sub, enum.classes, workers=int(params["workers"]), seed=params["seed"],
                                  victim=params["victim"], timeout=float(params["timeout"]), progress=progress)
        result["attack"]["argon2_default_s"] = _argon2_default_s()
    return _result(params, result, time.perf_counter() - start)


def _labels(groups: list[list[str]]) -> str:
    return "; ".join(" = ".join(g) for g in groups)


def _result(params: dict[str, Any], data: dict[str, Any], seconds: float) -> AttackResult:
    e = data["enumeration"]
    default = params["space"] == "default"
    docs = DOCS_DEFAULT if default else {}
    sampled = [c for c in e["clusters"] if c["sampled"]]
    # A sampled cluster whose measured combinations were all distinct most likely is all distinct in full.
    likely = math.prod(c["combinations"] if c["sampled"] else c["distinct"] for c in e["clusters"]) \
        if sampled and all(c["distinct"] == c["measured"] for c in sampled) else None
    head = Table(f"Precision-fingerprint configurations on this machine ({params['space']} space)",
                 ["measure", "value", "docs/fingerprints.md (2026-12-01)"],
                 [["fresh processes run", e["configurations"], docs.get("configurations")],
                  ["failed (setting kills the process)", e["failed"], None],
                  ["distinct fingerprints among them", e["distinct_observed"], docs.get("distinct_observed")],
                  ["distinct over the whole product (composed)" + (" — lower bound" if e["lower_bound"] else ""),
                   e["composed"], docs.get("composed")],
                  ["bits (log2 composed)", e["bits"], docs.get("bits")],
                  *([["composed if every sampled cluster is all distinct, as every combination measured was",
                      likely, None]] if likely is not None else []),
                  ["upper bound (product of classes), bits", e["upper_bits"], None],
                  ["random full configurations checked / matched", f"{e['checks']} / {e['checks_matched']}", "6 / 6"
                   if default else None],
                  ["baseline stable", e["stable"], True if default else None],
                  ["enumeration seconds (workers)", f"{e['seconds']} ({e['workers']})", None]],
                 caption=f"The issue's first count, on an AVX2 machine: about {ISSUE['composed']} "
                         f"({math.log2(ISSUE['composed']):.1f} bits). "
                         + (f"A cluster larger than max_joint={params['max_joint']} was sampled, so the composed "
                            "count is a lower bound." if e["lower_bound"] else
                            f"Every cluster was measured in full (max_joint={params['max_joint']}): the composed "
                            "count is exact for this space."))
    per_var = Table("Classes per variable (settings giving the same fingerprint)",
                    ["variable", "settings", "classes", "probes moved alone", "failed", "classes (labels)"],
                    [[v, s["settings"], s["classes"], s["probes_moved"], s["failed"], _labels(e["classes"][v])]
                     for v, s in e["variables"].items()])
    clusters = Table("Measured jointly (variables that may interact)",
                     ["variables", "probes", "combinations", "measured", "distinct", "sampled"],
                     [[" × ".join(c["variables"]), c["probes"], c["combinations"], c["measured"], c["distinct"],
                       c["sampled"]] for c in e["clusters"]])
    tables = [head, per_var, clusters]
    notes = [f"Software settings reach {'at least ' if e['lower_bound'] else ''}{e['composed']:,} distinct precision "
             f"fingerprints on this machine ({e['bits']} bits); an attacker who knows this kind of machine needs one "
             f"guess per distinct configuration at most (never more than the product of classes, "
             f"{e['upper_bound']:,}), and real machines mostly run the defaults, which the attacker tries first."
             + (" Some clusters were sampled, so the count is a lower bound" + (
                 f"; every combination measured in them was distinct, so the full count is most likely {likely:,} "
                 f"({math.log2(likely):.2f} bits)." if likely is not None else ".") if e["lower_bound"] else "")]
    a = data.get("attack")
    if a:
        # CPU seconds of the child (one core's worth of work, whatever the load) plus the default Argon2id.
        per_guess = (a["cpu_s"] or a["process_s"]) + a["argon2_default_s"]
        cost = None if a["guesses"] is None else a["guesses"] * per_guess
        tables.append(Table(
            "End-to-end: opening a precision-locked file (aes) by walking the configurations",
            ["measure", "value", "issue 11"],
            [["attack space", " × ".join(a["victim"]), None],
             ["settings in the space / class combinations walked first", f"{a['settings']} / {a['walk']}", None],
             ["victim's configuration (drawn at random)",
              ", ".join(f"{k}={lab}" for k, lab in a["victim"].items()), None],
             ["opened", a["opened"], None],
             ["guesses until opened", a["guesses"], ISSUE["guesses"]],
             ["mean guesses for a victim drawn uniformly (if the classes hold jointly)", a.get("mean_guesses"), None],
             ["processes run (workers)", f"{a['processes']} ({params['workers']})", None],
             ["search seconds (fast KDF)", a["search_s"], None],
             ["per guess: CPU s of the fresh process (its wall s; probe suite s)",
              f"{a['cpu_s'] or 0:.2f} ({a['process_s']:.2f}; {a['probe_s'] or 0:.2f})", None],
             ["default Argon2id, s", a["argon2_default_s"], None],
             ["cost at default Argon2id, s (guesses × per guess)", cost, None],
             ["worst case over the walk, s", a["walk"] * per_guess, None],
             ["whole composed space, s", e["composed"] * per_guess, None]],
            caption="The victim enrolls (precision only) and locks in a fresh process under its configuration; "
                    "the attacker reproduces the material from the file's public helper in a fresh process per "
                    "configuration and lets AES-GCM reject wrong guesses. Cost per guess: the child's CPU "
                    "seconds plus one default Argon2id (median of 3, wall)."))
        notes.append(
            f"A precision-only aes file locked under {', '.join(f'{k}={lab}' for k, lab in a['victim'].items())} "
            + (f"opened after {a['guesses']} guesses ({a['search_s']:.0f} s here with the fast KDF; "
               f"{cost:.0f} s of one core at the default Argon2id, {per_guess:.1f} s per guess)"
               if a["opened"] else f"did NOT open within the {a['processes']} configurations tried")
            + ": the precision source identifies a configuration, not a device, and lock refuses it without a "
              "vendor secret for this reason.")
    return AttackResult(name="enumerate", title="Precision-fingerprint configurations and the enumeration attack",
                        tables=tables, data=data, notes=notes, params=params, seconds=seconds, plot=_plot)


def _plot(result: AttackResult, path) -> None:
    import numpy as np

    var = result.data["enumeration"]["variables"]
    names = list(var)
    fig, axes = new_figure(1, width=max(5.0, 0.7 * len(names) + 2), height=3.8)
    ax = axes[0]
    x = np.arange(len(names))
    ax.bar(x, [var[n]["settings"] for n in names], color="0.85", label="settings tried")
    ax.bar(x, [var[n]["classes"] for n in names], color="tab:blue", label="classes (distinct fingerprints)")
    ax.set_xticks(x, [n.replace("torch.set_num_threads", "torch threads") for n in names], rotation=40, ha="right",
                  fontsize=7)
    ax.set_ylabel("count")
    e = result.data["enumeration"]
    ax.set_title(f"{'at least ' if e['lower_bound'] else ''}{e['composed']:,} composed configurations "
                 f"({e['bits']} bits)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":  # pragma: no cover - a manual run: python -m chiplock.attacks.enumeration [preset] [out]
    r = run(preset=sys.argv[1] if len(sys.argv) > 1 else "smoke",
            progress=lambda s, d, t: print(f"{s} {d}/{t}", file=sys.stderr, flush=True))
    print(r.to_markdown())
    if len(sys.argv) > 2:
        print(r.save(sys.argv[2]), file=sys.stderr)
