"""Simulated SRAM PUF: key failure rate at 15 % bit-error rate, and distinctness between devices.

Usage::

    .venv/bin/python benchmarks/fingerprint_sram.py [--trials 200000] [--devices 1000] [--out bench/results]

Method (the target is a failure rate <= 1e-6, too rare to observe directly in a few minutes):

1. Design the code for 128 key bits at BER 0.15 and compute its failure probability analytically (binomial
   tail of the errors left after the repetition vote, per BCH block).
2. Full-stack Monte Carlo at BER 0.15: ``--trials`` readings with independent flips against the enrolled bits,
   each decoded by bchlib; report the failures and the 95 % upper bound (3/N when none fail).
3. Validate the analytic model where failures are frequent enough to count (BER 0.20-0.24): empirical vs
   predicted failure rates with their binomial standard errors. Agreement there, plus exact t-error
   correction (tests/keys/test_fuzzy.py), is the argument that the analytic figure holds at 0.15.
4. Devices: enroll ``--devices`` simulated devices; check that all keys differ, that no device reproduces another's
   key, and record the smallest Hamming distance between their readings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
from chiplock.fingerprint.sram import simulated_device_bits
from chiplock.keys.fuzzy import CodeParams, FuzzyExtractor


def _failures(fe: FuzzyExtractor, w: np.ndarray, key: bytes, helper: dict, ber: float, n: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    fails = 0
    for _ in range(n):
        try:
            fails += fe.reproduce(w ^ (rng.random(w.size) < ber).astype(np.uint8), helper) != key
        except FingerprintError:
            fails += 1
    return fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200_000)
    ap.add_argument("--validate-trials", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    # The enrolled source picks its code from the measured entropy per bit; use the same design here.
    enrollment = get_source("sram", simulate="bench-0", noise=0.15).enroll()
    params = CodeParams.from_json(enrollment.info["code"])
    fe = FuzzyExtractor(params=params)
    w = np.random.default_rng(1).integers(0, 2, params.input_bits, dtype=np.uint8)
    key, helper = fe.generate(w)

    t = time.perf_counter()
    fails = _failures(fe, w, key, helper, 0.15, args.trials, 2)
    mc_seconds = time.perf_counter() - t
    validation = []
    for ber in (0.20, 0.22, 0.24):
        p = params.failure_probability(ber)
        f = _failures(fe, w, key, helper, ber, args.validate_trials, int(ber * 1000))
        validation.append({"ber": ber, "analytic": p, "empirical": f / args.validate_trials,
                           "stderr": float(np.sqrt(p * (1 - p) / args.validate_trials))})

    # Full stack through the source: enrollment majority-votes 15 noisy reads, reproduction reads once.
    src = get_source("sram", simulate="bench-0", noise=0.15)
    e = src.enroll()
    source_ok = sum(src.reproduce(e.helper) == e.material for _ in range(2000))

    print(json.dumps({"monte_carlo_failures": fails, "trials": args.trials, "validation": validation,
                      "source_full_stack": source_ok}), flush=True)
    keys, cross_fail, cross_same = set(), 0, 0
    for i in range(args.devices):
        d = get_source("sram", simulate=f"device-{i}", noise=0.15)
        ei = d.enroll()
        keys.add(ei.material)
        other = get_source("sram", simulate=f"device-{(i + 1) % args.devices}", noise=0.15)
        try:
            cross_same += other.reproduce(ei.helper) == ei.material
        except FingerprintError:
            cross_fail += 1
    r = np.vstack([simulated_device_bits(f"device-{i}", 1024) for i in range(200)]).astype(np.int32)
    hd = (r[:, None, :] != r[None, :, :]).mean(axis=2)
    min_hd = float(hd[np.triu_indices(len(r), 1)].min())

    summary = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "code": params.to_json(), "code_bits": params.input_bits, "leakage_bits": params.leakage_bits,
        "entropy_per_bit": enrollment.info["entropy_per_bit"], "key_entropy_bits": enrollment.entropy_bits,
        "analytic_failure_at_0.15": params.failure_probability(0.15),
        "monte_carlo": {"ber": 0.15, "trials": args.trials, "failures": fails,
                        "upper_95": (3.0 / args.trials) if fails == 0 else None, "seconds": mc_seconds},
        "validation": validation,
        "source_full_stack": {"noise": 0.15, "reproduced": source_ok, "trials": 2000},
        "devices": {"n": args.devices, "distinct_keys": len(keys), "cross_reproduced": cross_same,
                    "cross_detected_failures": cross_fail, "min_pairwise_hamming_200_devices_8192_bits": min_hd},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fingerprint_sram.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
