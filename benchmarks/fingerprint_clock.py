"""Clock fingerprint: key reproduction rate in fresh processes (optionally under a busy second core), and what
simulated other machines of the same kind reproduce (the entropy the clock is credited).

Usage::

    .venv/bin/python benchmarks/fingerprint_clock.py [--trials 1000] [--processes 10] [--busy] [--out bench/results]
    .venv/bin/python benchmarks/fingerprint_clock.py --cross [--out bench/results]

Reproduction mode enrolls once in this process, then starts ``--processes`` fresh Python processes that each
reproduce the key ``trials / processes`` times (a real unlock happens in a new process). With ``--busy`` a
process spinning on the last CPU runs for the whole measurement and the children are pinned to the first CPU:
the "busy second core" of issue 8. Children receive the public helper and a SHA-256 of the material, never the
material. Writes ``fingerprint_clock[_busy].json``; the load average is recorded because a busy machine is the
main cause of failures.

``--cross`` enrolls once and runs :func:`chiplock.fingerprint.clock.cross_machine_test` (fresh processes with other
thread counts, one-core affinity, busy loops, instruction-set limits); writes ``fingerprint_clock_cross.json``
with each variant's outcome and the credited entropy, ``log2(distinct keys)``.
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
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, os, sys, time
cpus = json.loads(sys.argv[4])
if cpus:
    os.sched_setaffinity(0, cpus)
from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
helper, want, n = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
src = get_source("clock")
measure, count = src._measure_profiles, [0]
def counted(h):
    count[0] += 1
    return measure(h)
src._measure_profiles = counted  # Count the measurements each reproduction needed (retries).
out = []
for _ in range(n):
    t, count[0] = time.perf_counter(), 0
    try:
        ok = hashlib.sha256(src.reproduce(helper)).hexdigest() == want
        err = None
    except FingerprintError as exc:
        ok, err = False, str(exc)[:80]
    out.append({"ok": ok, "seconds": time.perf_counter() - t, "error": err, "measurements": count[0]})
print(json.dumps(out))
"""


def _machine() -> str:
    return f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores"


def reproduction(args: argparse.Namespace) -> dict:
    from chiplock.fingerprint import get_source
    from chiplock.fingerprint.clock import busy_cpu

    cpus = sorted(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    enrollment = get_source("clock").enroll()
    want = hashlib.sha256(enrollment.material).hexdigest()
    per = args.trials // args.processes
    results = []
    pin = json.dumps([cpus[0]] if args.busy else [])
    with busy_cpu(cpus[-1] if args.busy else None), tempfile.TemporaryDirectory() as tmp:
        helper_path = Path(tmp) / "helper.json"
        helper_path.write_text(json.dumps(enrollment.helper))
        for p in range(args.processes):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(helper_path), want, str(per), pin],
                                  capture_output=True, text=True, check=True)
            results.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
            ok = sum(r["ok"] for r in results)
            print(f"process {p + 1}/{args.processes}: {ok}/{len(results)} reproduced", flush=True)
    secs = sorted(r["seconds"] for r in results)
    tries: dict[int, int] = {}
    for r in results:
        tries[r["measurements"]] = tries.get(r["measurements"], 0) + 1
    return {
        "date": datetime.date.today().isoformat(), "machine": _machine(), "python": platform.python_version(),
        "busy": f"spinning process on cpu {cpus[-1]}, children pinned to cpu {cpus[0]}" if args.busy else None,
        "trials": len(results), "reproduced": sum(r["ok"] for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "measurements_per_reproduction": dict(sorted(tries.items())),
        "seconds_median": secs[len(secs) // 2], "seconds_p99": secs[max(0, int(len(secs) * 0.99) - 1)],
        "seconds_max": secs[-1], "enroll_seconds": enrollment.info["seconds"],
        "entropy_bits": enrollment.entropy_bits, "within_machine_bits": enrollment.info["within_machine_bits"],
        "n_bits": enrollment.info["n_bits"], "credit_bits": enrollment.info["credit_bits"],
        "leakage_bits": enrollment.info["leakage_bits"], "check_bits": enrollment.info["check_bits"],
        "assessment": enrollment.info["assessment"], "load_before": load_before, "load_after": os.getloadavg(),
    }


def cross(args: argparse.Namespace) -> dict:
    from chiplock.fingerprint import get_source
    from chiplock.fingerprint.clock import cross_machine_test

    load_before = os.getloadavg()
    enrollment = get_source("clock").enroll()
    result = cross_machine_test(enrollment.helper, enrollment.material)
    for name, outcome in result.outcomes.items():
        print(f"{name:60s} {outcome}", flush=True)
    return {"date": datetime.date.today().isoformat(), "machine": _machine(), "python": platform.python_version(),
            **result.to_json(), "within_machine_bits": enrollment.info["within_machine_bits"],
            "entropy_bits_default": enrollment.entropy_bits, "load_before": load_before,
            "load_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--busy", action="store_true", help="Keep the last CPU busy; pin the children to the first.")
    ap.add_argument("--cross", action="store_true", help="Measure what simulated same-kind machines reproduce.")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    summary = cross(args) if args.cross else reproduction(args)
    name = "fingerprint_clock" + ("_cross" if args.cross else "_busy" if args.busy else "") + ".json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
