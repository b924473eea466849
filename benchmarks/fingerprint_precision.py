"""Precision fingerprint: stability over many reproductions, distinctness across CPU configurations, time.

Usage::

    .venv/bin/python benchmarks/fingerprint_precision.py [--trials 1000] [--processes 4] [--out bench/results]

1. Stability: ``--processes`` fresh processes each reproduce the material ``trials / processes`` times and
   compare it with the enrolled one (children get its SHA-256, never the material).
2. Configurations: one fresh process per environment variant (ISA, MKL, oneDNN, OpenBLAS core, numpy SIMD,
   thread counts) measures the per-probe digests; the script reports which probes changed against the
   baseline, whether the material differs, and whether every changed probe declared the fact that was varied.
3. Time: seconds per measurement in each child.
4. Enumeration (``--enumerate``): the configuration space software can reach on this machine, composed from
   one-at-a-time and joint runs (:mod:`chiplock.fingerprint.configurations`): configurations tried, distinct
   fingerprints, composed count and its log2, the figure behind ``PRECISION_ENTROPY_BITS``.

Writes ``fingerprint_precision.json`` (and ``fingerprint_precision_enumeration.json``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "OPENBLAS_CORETYPE=Sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge"},
    "OPENBLAS_CORETYPE=Prescott": {"OPENBLAS_CORETYPE": "Prescott"},
    "NPY_DISABLE_CPU_FEATURES=X86_V3": {"NPY_DISABLE_CPU_FEATURES": "X86_V3"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"},
}
#: The fact each variant changes (keys of chiplock.fingerprint.precision.FACTS).
VARIED = {"ATEN_CPU_CAPABILITY": {"cpu.isa"}, "MKL_CBWR": {"mkl"}, "ONEDNN_MAX_CPU_ISA": {"onednn.isa"},
          "OPENBLAS_CORETYPE": {"openblas.core"}, "NPY_DISABLE_CPU_FEATURES": {"numpy.simd"},
          # OpenBLAS also reads OMP_NUM_THREADS, so one variable moves both thread counts.
          "OMP_NUM_THREADS": {"cpu.threads", "openblas.threads"}, "OPENBLAS_NUM_THREADS": {"openblas.threads"}}

DIGESTS = r"""
import json, time
from chiplock.fingerprint.precision import probe_digests, probe_dependencies, _combine
t = time.perf_counter(); d = probe_digests(); s = time.perf_counter() - t
import hashlib
print(json.dumps({"digests": d, "seconds": s, "material_id": hashlib.sha256(_combine(d)).hexdigest()[:16],
                  "depends": probe_dependencies()}))
"""

REPEAT = r"""
import hashlib, json, sys, time
from chiplock.fingerprint import get_source
helper, want, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
src = get_source("precision"); ok = 0; secs = []
for _ in range(n):
    t = time.perf_counter(); ok += hashlib.sha256(src.reproduce(helper)).hexdigest() == want
    secs.append(time.perf_counter() - t)
print(json.dumps({"ok": ok, "n": n, "seconds": secs}))
"""


def _child(code: str, env: dict[str, str], *args: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in {k2 for e in VARIANTS.values() for k2 in e}}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--skip-stability", action="store_true")
    ap.add_argument("--enumerate", action="store_true", help="Also enumerate the configuration space.")
    ap.add_argument("--only-enumerate", action="store_true", help="Enumerate only (skip stability and variants).")
    ap.add_argument("--workers", type=int, default=2, help="Fresh processes at once while enumerating.")
    args = ap.parse_args()
    if args.enumerate or args.only_enumerate:
        _enumerate(args)
        if args.only_enumerate:
            return

    results = {name: _child(DIGESTS, env) for name, env in VARIANTS.items()}
    base = results["baseline"]
    rows = []
    for name, r in results.items():
        changed = sorted(n for n in base["digests"] if r["digests"][n] != base["digests"][n])
        var = next(iter(VARIANTS[name]), None)
        facts = VARIED.get(var, set()) if var else set()
        undeclared = [n for n in changed if facts and not facts & set(base["depends"][n])]
        rows.append({"variant": name, "material_id": r["material_id"], "distinct": r["material_id"] != base["material_id"],
                     "changed": changed, "undeclared": undeclared, "seconds": r["seconds"]})
    distinct_ids = {r["material_id"] for r in rows}

    stability = None
    if not args.skip_stability:
        from chiplock.fingerprint import get_source

        e = get_source("precision").enroll()
        want = hashlib.sha256(e.material).hexdigest()
        per = args.trials // args.processes
        runs = [_child(REPEAT, {}, json.dumps(e.helper), want, str(per)) for _ in range(args.processes)]
        secs = sorted(s for r in runs for s in r["seconds"])
        stability = {"trials": sum(r["n"] for r in runs), "identical": sum(r["ok"] for r in runs),
                     "processes": args.processes, "seconds_median": secs[len(secs) // 2], "seconds_max": secs[-1]}

    summary = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "variants": rows, "distinct_configurations": len(distinct_ids), "stability": stability,
               "load": os.getloadavg()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fingerprint_precision.json").write_text(json.dumps(summary, indent=2))
    print("| variant | material id | distinct from baseline | probes changed | undeclared | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['material_id']} | {'yes' if r['distinct'] else 'no'} | "
              f"{', '.join(r['changed']) or '-'} | {', '.join(r['undeclared']) or '-'} | {r['seconds']:.2f} |")
    print(f"\ndistinct material ids: {len(distinct_ids)}; stability: {stability}")


def _enumerate(args: argparse.Namespace) -> None:
    from chiplock.fingerprint.configurations import enumerate_configurations
    from chiplock.fingerprint.precision import config_facts

    def progress(stage: str, done: int, total: int) -> None:
        print(f"\r{stage}: {done}/{total}   ", end="", file=sys.stderr, flush=True)

    r = enumerate_configurations(workers=args.workers, progress=progress)
    print(file=sys.stderr)
    facts = config_facts()
    summary = {"date": datetime.date.today().isoformat(),
               "machine": {"cpu": facts.get("cpu"), "cpus": os.cpu_count(), "cpu_capability": facts["cpu_capability"],
                           "torch": facts["torch"], "numpy": facts["numpy"], "libc": facts.get("libc")},
               "load": os.getloadavg(), **r.to_json()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fingerprint_precision_enumeration.json").write_text(json.dumps(summary, indent=2))
    print("| variable | settings | classes | probes moved | classes (settings with the same fingerprint) |")
    print("|---|---|---|---|---|")
    for var, st in r.variables.items():
        groups = "; ".join(" = ".join(c) for c in r.classes[var])
        print(f"| {var} | {st['settings']} | {st['classes']} | {st['probes_moved']} | {groups} |")
    print("\n| cluster | probes | combinations | measured | distinct |\n|---|---|---|---|---|")
    for c in r.clusters:
        print(f"| {' x '.join(c.variables)} | {c.probes} | {c.combinations} | {c.measured} | {c.distinct} |")
    print(f"\nconfigurations tried {r.configurations} ({r.failed} failed), distinct observed {r.distinct_observed}, "
          f"composed {r.composed} = {r.bits} bits{' (lower bound)' if r.lower_bound else ''}, upper bound "
          f"{r.upper_bound} = {r.upper_bits} bits; checks {r.checks_matched}/{r.checks}; stable {r.stable}; "
          f"{r.seconds:.0f} s with {r.workers} workers")


if __name__ == "__main__":
    main()
