"""How many precision fingerprints one machine can produce by software settings alone (measured).

The precision fingerprint identifies a *configuration*: the CPU, the library builds, and every setting that picks
a kernel or splits a reduction. An attacker who knows (or owns) the same kind of machine only has to guess the
settings, and each guess costs one run of the probe suite. This module measures that space on the machine it runs
on, by running the probe suite in a fresh process per configuration (the libraries read their settings when they
load), two processes at a time by default.

The variables (:func:`default_space`): ``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``, ``ONEDNN_DEFAULT_FPMATH_MODE``, ``OPENBLAS_CORETYPE``, ``NPY_DISABLE_CPU_FEATURES``,
``GLIBC_TUNABLES`` (glibc's libm picks FMA/AVX2 variants by CPU feature), torch's thread count
(``torch.set_num_threads``) and OpenBLAS's (``OPENBLAS_NUM_THREADS``). ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``
are left out on purpose: they only set those two thread counts (torch reads either, OpenBLAS reads
``OMP_NUM_THREADS``), so they add no configuration that the two thread-count variables do not already reach.

The full product is far too large to run (hundreds of thousands of processes at about 2.5 s each), so the count
is composed from measurements:

1. **One at a time.** Every setting of every variable against the baseline (nothing set). A variable's
   *classes* are its settings that give different fingerprints (settings the machine ignores, such as an ISA it
   lacks, fall into the baseline's class); the *probes it moves* are those whose digest any setting changed.
2. **Joint, where variables may interact.** Variables that move a common probe, or whose facts a common probe
   declares it depends on (:data:`VARIABLE_FACTS`, :func:`~chiplock.fingerprint.precision.probe_dependencies`:
   ``sum_1m`` depends on the ISA *and* the thread count even where one of them alone changes nothing), form a
   cluster; each cluster's product of classes is run in full (or a random sample of ``max_joint`` combinations
   when larger, then the count is a lower bound and the result says so).
3. **Compose.** Clusters move disjoint probes, so the number of distinct fingerprints is the product over
   clusters of their distinct counts; ``bits`` is its log2. ``upper_bits`` is log2 of the product of every
   variable's classes, which no interaction can exceed.
4. **Check.** ``checks`` random full configurations (one setting of every variable) are measured and compared
   with the fingerprint the composition predicts for them.

What ``bits`` means: the log2 of how many configurations an attacker who knows the machine must try at most,
i.e. the entropy if configurations were uniform. Real ones are not (most machines run the defaults, which the
attacker tries first), so it is an upper bound on what the precision source is worth. Nothing here returns
digests or key material: runs are compared inside this module and only counts leave it.

Example:
    >>> result = enumerate_configurations()  # doctest: +SKIP
    >>> result.composed, result.bits  # doctest: +SKIP
    (5760, 12.49)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

from chiplock.errors import FingerprintError

#: A variable's settings: label -> environment changes. The first label is the default (nothing set). The key
#: :data:`TORCH_THREADS` is not an environment variable: the child calls ``torch.set_num_threads`` with it.
Space = dict[str, dict[str, dict[str, str]]]
TORCH_THREADS = "torch.set_num_threads"
UNSET = "(unset)"
#: Environment variables cleared in every child, so that the parent's settings do not leak into the baseline.
CLEARED = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
           "ONEDNN_DEFAULT_FPMATH_MODE", "OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES", "GLIBC_TUNABLES",
           "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_DYNAMIC")

#: The configuration facts (keys of :data:`chiplock.fingerprint.precision.FACTS`) each variable sets.
VARIABLE_FACTS: dict[str, frozenset[str]] = {
    "ATEN_CPU_CAPABILITY": frozenset({"cpu.isa"}), "MKL_CBWR": frozenset({"mkl"}),
    "MKL_ENABLE_INSTRUCTIONS": frozenset({"mkl"}), "ONEDNN_MAX_CPU_ISA": frozenset({"onednn.isa"}),
    "ONEDNN_DEFAULT_FPMATH_MODE": frozenset({"onednn.isa"}), "OPENBLAS_CORETYPE": frozenset({"openblas.core"}),
    "NPY_DISABLE_CPU_FEATURES": frozenset({"numpy.simd"}), "GLIBC_TUNABLES": frozenset({"libm"}),
    TORCH_THREADS: frozenset({"cpu.threads"}), "OPENBLAS_NUM_THREADS": frozenset({"openblas.threads"}),
}

_CHILD = r"""
import json, sys
threads, device, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
if threads != "-":
    torch.set_num_threads(int(threads))
from chiplock.fingerprint.precision import probe_digests
print(json.dumps(probe_digests(device, suite_version=version)))
"""


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (from ``/proc/cpuinfo``; empty where that is unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def _filtered(options: Sequence[tuple[str, str]], flags: set[str]) -> list[str]:
    # Settings that need a feature the CPU lacks either fall back silently (a repeat of another class) or kill
    # the process; leaving them out saves a run each. Without flags (not Linux) every setting is tried.
    return [value for value, needs in options if not flags or not needs or needs in flags]


def default_space(flags: set[str] | None = None, cpus: int | None = None) -> Space:
    """The variables and settings :func:`enumerate_configurations` tries by default, for this CPU.

    Args:
        flags: CPU feature flags (default: :func:`cpu_flags`); settings needing a missing feature are skipped.
        cpus: Logical CPUs (default: ``os.cpu_count()``); thread counts tried are 1-4, ``cpus`` and ``2*cpus``.
    """
    flags = cpu_flags() if flags is None else flags
    cpus = cpus or os.cpu_count() or 1
    threads = sorted({1, 2, 3, 4, cpus, 2 * cpus})

    def var(name: str, values: Sequence[str]) -> dict[str, dict[str, str]]:
        return {UNSET: {}, **{v: {name: v} for v in values}}

    avx512 = "avx512bw"
    return {
        "ATEN_CPU_CAPABILITY": var("ATEN_CPU_CAPABILITY", _filtered(
            [("default", ""), ("avx2", "avx2"), ("avx512", avx512)], flags)),
        "MKL_CBWR": var("MKL_CBWR", _filtered(
            [("COMPATIBLE", ""), ("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512", avx512),
             ("AUTO,STRICT", "")], flags)),
        "MKL_ENABLE_INSTRUCTIONS": var("MKL_ENABLE_INSTRUCTIONS", _filtered(
            [("SSE4_2", "sse4_2"), ("AVX2", "avx2")], flags)),
        "ONEDNN_MAX_CPU_ISA": var("ONEDNN_MAX_CPU_ISA", _filtered(
            [("SSE41", "sse4_1"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX2_VNNI", "avx_vnni"),
             ("AVX512_CORE", avx512), ("AVX512_CORE_VNNI", "avx512_vnni"), ("AVX512_CORE_BF16", "avx512_bf16"),
             ("AVX512_CORE_AMX", "amx_tile")], flags)),
        "ONEDNN_DEFAULT_FPMATH_MODE": var("ONEDNN_DEFAULT_FPMATH_MODE", ["BF16", "TF32", "ANY"]),
        "OPENBLAS_CORETYPE": var("OPENBLAS_CORETYPE", _filtered(
            [("Prescott", "pni"), ("Core2", "ssse3"), ("Penryn", "sse4_1"), ("Dunnington", "sse4_1"),
             ("Nehalem", "sse4_2"), ("Atom", "ssse3"), ("Opteron", "sse2"), ("Barcelona", "sse4a"),
             ("Bulldozer", "avx"), ("Piledriver", "fma"), ("Steamroller", "fma"), ("Excavator", "avx2"),
             ("Sandybridge", "avx"), ("Haswell", "avx2"), ("Zen", "avx2"), ("SkylakeX", avx512),
             ("Cooperlake", "avx512_bf16"), ("SapphireRapids", "avx512_fp16")], flags)),
        "NPY_DISABLE_CPU_FEATURES": var("NPY_DISABLE_CPU_FEATURES", _filtered(
            [("X86_V3", "avx2"), ("X86_V4", avx512), ("AVX512_ICL", "avx512_vbmi2"), ("AVX512_SPR", "avx512_fp16")],
            flags)),
        "GLIBC_TUNABLES": {UNSET: {}, **{f"hwcaps=-{v}": {"GLIBC_TUNABLES": f"glibc.cpu.hwcaps=-{v}"}
                                         for v in _filtered([("FMA", "fma"), ("AVX2", "avx2"),
                                                             ("AVX512F", "avx512f"), ("AVX2,-FMA", "fma")], flags)}},
        TORCH_THREADS: {UNSET: {}, **{str(n): {TORCH_THREADS: str(n)} for n in threads}},
        "OPENBLAS_NUM_THREADS": var("OPENBLAS_NUM_THREADS", [str(n) for n in threads]),
    }


@dataclass
class Cluster:
    """Variables that move a common probe, measured jointly."""

    variables: list[str]
    probes: int
    combinations: int
    measured: int
    distinct: int
    sampled: bool


@dataclass
class Enumeration:
    """The measured configuration space of the precision fingerprint on one machine (counts only, public).

    Attributes:
        configurations: Fresh processes run (every configuration tried, failed ones included).
        failed: Configurations whose process failed (e.g. a kernel the CPU cannot run); not counted as distinct.
        distinct_observed: Distinct fingerprints among the configurations actually run.
        composed: Distinct fingerprints over the whole product of settings, composed as the module explains.
        bits: ``log2(composed)``.
        upper_bound, upper_bits: Product of every variable's classes, and its log2.
        lower_bound: Whether a cluster was sampled, so ``composed`` is a lower bound.
        stable: The baseline measured twice gave the same fingerprint.
        checks, checks_matched: Random full configurations measured, and how many the composition predicted.
        variables: Per variable: settings tried, classes, probes moved, failures.
        clusters: The jointly measured groups of variables.
        classes: Per variable, its settings grouped by fingerprint (labels only).
        seconds: Wall time; workers: processes run at once.
    """

    configurations: int
    failed: int
    distinct_observed: int
    composed: int
    bits: float
    upper_bound: int
    upper_bits: float
    lower_bound: bool
    stable: bool
    checks: int
    checks_matched: int
    variables: dict[str, dict[str, int]]
    clusters: list[Cluster]
    classes: dict[str, list[list[str]]] = field(repr=False)
    seconds: float
    workers: int
    device: str = "cpu"

    def to_json(self) -> dict:
        return asdict(self)


class _Runner:
    def __init__(self, device: str, workers: int, timeout: float, suite: int,
                 progress: Callable[[int, int], None] | None) -> None:
        self.device, self.workers, self.timeout, self.suite, self.progress = device, workers, timeout, suite, progress
        self.runs = self.failed = 0
        self.seen: set[tuple[str, ...]] = set()
        self.memo: dict[frozenset, dict[str, str] | None] = {}

    def _one(self, setting: Mapping[str, str]) -> dict[str, str] | None:
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        env.update({k: v for k, v in setting.items() if k != TORCH_THREADS})
        args = [sys.executable, "-c", _CHILD, setting.get(TORCH_THREADS, "-"), self.device, str(self.suite)]
        for _ in range(2):  # One retry: a transient failure (an import racing an edit) is not the setting's.
            try:
                res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                continue
            if res.returncode == 0:
                try:
                    return json.loads(res.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    continue
            if res.returncode < 0:  # Killed by a signal (SIGILL: an instruction this CPU lacks); no retry.
                break
        return None

    def run(self, settings: list[dict[str, str]], *, reuse: bool = True) -> list[dict[str, str] | None]:
        """Run each setting in a fresh process; a setting already run is not run again when ``reuse``."""
        keys = [frozenset(s.items()) for s in settings]
        todo = [s for k, s in dict(zip(keys, settings)).items() if k not in self.memo] if reuse else list(settings)
        done = [0]

        def one(s: dict[str, str]) -> dict[str, str] | None:
            r = self._one(s)
            done[0] += 1
            if self.progress:
                self.progress(done[0], len(todo))
            return r

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(one, todo))
        self.runs += len(results)
        self.failed += sum(r is None for r in results)
        self.seen.update(tuple(r[k] for k in sorted(r)) for r in results if r is not None)
        self.memo.update(zip((frozenset(s.items()) for s in todo), results))
        return [self.memo[k] for k in keys] if reuse else results


def _setting(space: Space, assignment: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for var, label in assignment.items():
        out.update(space[var][label])
    return out


def _clusters(moves: dict[str, set[str]]) -> list[list[str]]:
    clusters: list[tuple[list[str], set[str]]] = []
    for var, probes in moves.items():
        merged = [c for c in clusters if c[1] & probes]
        names, union = [var], set(probes)
        for c in merged:
            names, union = c[0] + names, union | c[1]
            clusters.remove(c)
        clusters.append((names, union))
    return [sorted(c[0]) for c in clusters]


def enumerate_configurations(space: Space | None = None, *, device: str = "cpu", workers: int = 2,
                             max_joint: int = 96, checks: int = 6, seed: int = 0, timeout: float = 300.0,
                             progress: Callable[[str, int, int], None] | None = None) -> Enumeration:
    """Measure how many distinct precision fingerprints software settings reach on this machine.

    Args:
        space: Variables and settings (default :func:`default_space`); the first setting of each is its default.
        device: ``"cpu"`` or ``"cuda"``: which probe suite the children run.
        workers: Fresh processes run at once.
        max_joint: Most combinations run for one cluster; larger clusters are sampled (then a lower bound).
        checks: Random full configurations measured to check the composition.
        seed: Seed for the sampling and the checks.
        timeout: Seconds one child may take.
        progress: Optional ``progress(stage, done, total)`` callback.

    Returns:
        An :class:`Enumeration`; counts only.

    Raises:
        FingerprintError: The baseline configuration cannot be measured.
        ValueError: A variable without settings, or ``workers`` < 1.

    Example:
        >>> r = enumerate_configurations({"ATEN_CPU_CAPABILITY": {"(unset)": {}, "default": {  # doctest: +SKIP
        ...     "ATEN_CPU_CAPABILITY": "default"}}})
        >>> r.composed  # doctest: +SKIP
        2
    """
    # Imported here: precision imports torch, which the module's users (the CLI's help) need not load.
    from chiplock.fingerprint.precision import SUITE_VERSION, probe_dependencies

    space = default_space() if space is None else space
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for var, settings in space.items():
        if not settings:
            raise ValueError(f"variable {var!r} has no settings; give at least its default, e.g. {{'(unset)': {{}}}}")
    start = time.perf_counter()

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda d, t: progress(name, d, t)) if progress else None

    runner = _Runner(device, workers, timeout, SUITE_VERSION, stage("one at a time"))
    default = {var: next(iter(settings)) for var, settings in space.items()}
    single = [(var, label) for var, settings in space.items() for label in list(settings)[1:]]
    results = runner.run([{}] + [_setting(space, {v: label}) for v, label in single])
    # The baseline runs a second time, past the memo, to check that one configuration gives one fingerprint.
    again = runner.run([{}], reuse=False)[0]
    base = results[0]
    if base is None:
        raise FingerprintError("the precision probe suite failed in a fresh process with no settings changed; "
                               "run `chiplock fingerprint --source precision` to see the error")
    probes = sorted(base)
    classes: dict[str, list[list[str]]] = {}
    moves: dict[str, set[str]] = {}
    stats: dict[str, dict[str, int]] = {}
    table: dict[str, dict[str, dict[str, str]]] = {}  # var -> class representative -> digests
    for var, settings in space.items():
        groups: dict[tuple[str, ...], list[str]] = {tuple(base[p] for p in probes): [default[var]]}
        table[var] = {default[var]: base}
        moved: set[str] = set()
        failed = 0
        for (v, label), r in zip(single, results[1:]):
            if v != var:
                continue
            if r is None:
                failed += 1
                continue
            key = tuple(r[p] for p in probes)
            if key not in groups:
                table[var][label] = r
            groups.setdefault(key, []).append(label)
            moved |= {p for p in probes if r[p] != base[p]}
        classes[var] = list(groups.values())
        moves[var] = moved
        stats[var] = {"settings": len(settings), "classes": len(groups), "probes_moved": len(moved),
                      "failed": failed}

    rng = random.Random(seed)
    clusters: list[Cluster] = []
    joint: list[tuple[list[str], list[str], dict[tuple[str, ...], dict[str, str]]]] = []
    runner.progress = stage("joint")
    deps = probe_dependencies(device)
    reach = {v: m | {p for p in probes if VARIABLE_FACTS.get(v, frozenset()) & set(deps.get(p, ()))}
             for v, m in moves.items() if m}
    for names in _clusters(reach):
        cprobes = sorted(set().union(*(reach[v] for v in names)))
        reps = [[cls[0] for cls in classes[v]] for v in names]
        combos = list(itertools.product(*reps))
        if len(names) == 1:
            measured = {c: table[names[0]][c[0]] for c in combos}
        else:
            chosen = combos if len(combos) <= max_joint else rng.sample(combos, max_joint)
            res = runner.run([_setting(space, dict(zip(names, c))) for c in chosen])
            measured = {c: r for c, r in zip(chosen, res) if r is not None}
        distinct = len({tuple(r[p] for p in cprobes) for r in measured.values()})
        clusters.append(Cluster(variables=names, probes=len(cprobes), combinations=len(combos),
                                measured=len(measured), distinct=distinct, sampled=len(measured) < len(combos)))
        joint.append((names, cprobes, measured))

    matched = 0
    if checks and joint:
        runner.progress = stage("checks")
        picks = [[rng.choice(sorted(measured)) for _, _, measured in joint] for _ in range(checks)]
        settings = [_setting(space, {v: l for (names, _, _), c in zip(joint, pick) for v, l in zip(names, c)})
                    for pick in picks]
        for pick, got in zip(picks, runner.run(settings, reuse=False)):
            want = dict(base)
            for (names, cprobes, measured), c in zip(joint, pick):
                want.update({p: measured[c][p] for p in cprobes})
            matched += got == want
    composed = math.prod(c.distinct for c in clusters)
    upper = math.prod(len(c) for c in classes.values())
    return Enumeration(
        configurations=runner.runs, failed=runner.failed, distinct_observed=len(runner.seen), composed=composed,
        bits=round(math.log2(composed), 2), upper_bound=upper, upper_bits=round(math.log2(upper), 2),
        lower_bound=any(c.sampled for c in clusters), stable=again == base, checks=checks if joint else 0,
        checks_matched=matched, variables=stats, clusters=clusters, classes=classes,
        seconds=round(time.perf_counter() - start, 1), workers=workers, device=device)
