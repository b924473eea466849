"""Clock fingerprint: key reproduction rate over many re-measurements, in fresh processes, and time to measure.

Usage::

    .venv/bin/python benchmarks/fingerprint_clock.py [--trials 1000] [--processes 10] [--out bench/results]

Enrolls once in this process, then starts ``--processes`` fresh Python processes that each reproduce the key
``trials / processes`` times (a real unlock happens in a new process). Children receive the public helper and
a SHA-256 of the material, never the material. Writes ``fingerprint_clock.json`` and prints a summary; the load
average is recorded because a busy machine is the main cause of failures.
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
import time
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
helper, want, n = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
src = get_source("clock")
out = []
for _ in range(n):
    t = time.perf_counter()
    try:
        ok = hashlib.sha256(src.reproduce(helper)).hexdigest() == want
        err = None
    except FingerprintError as exc:
        ok, err = False, str(exc)[:80]
    out.append({"ok": ok, "seconds": time.perf_counter() - t, "error": err})
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from chiplock.fingerprint import get_source

    load_before = os.getloadavg()
    enrollment = get_source("clock").enroll()
    want = hashlib.sha256(enrollment.material).hexdigest()
    per = args.trials // args.processes
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        helper_path = Path(tmp) / "helper.json"
        helper_path.write_text(json.dumps(enrollment.helper))
        for p in range(args.processes):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(helper_path), want, str(per)],
                                  capture_output=True, text=True, check=True)
            results.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
            ok = sum(r["ok"] for r in results)
            print(f"process {p + 1}/{args.processes}: {ok}/{len(results)} reproduced", flush=True)
    secs = sorted(r["seconds"] for r in results)
    summary = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()} "
        f"{os.cpu_count()} cores", "python": platform.python_version(),
        "trials": len(results), "reproduced": sum(r["ok"] for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "seconds_median": secs[len(secs) // 2], "seconds_p99": secs[int(len(secs) * 0.99) - 1],
        "seconds_max": secs[-1], "enroll_seconds": enrollment.info["seconds"],
        "entropy_bits": enrollment.entropy_bits, "n_bits": enrollment.info["n_bits"],
        "credit_bits": enrollment.info["credit_bits"], "leakage_bits": enrollment.info["leakage_bits"],
        "assessment": enrollment.info["assessment"], "load_before": load_before, "load_after": os.getloadavg(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fingerprint_clock.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
