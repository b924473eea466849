"""Key-distinguishing attacks against pre-aes on the pretrained DigitCNN: the AUC table behind docs/attacks.md.

For every statistic in :mod:`chiplock.attacks` it locks the trained weights several times (right-key instances)
and decodes them under random wrong keys, then reports the AUC (``max(AUC, 1 - AUC)``: 0.5 = no separation) and
the time one evaluation takes. Oracles 1 and 2 run on fp32, fp16, bf16 and int8 (per-tensor symmetric) copies;
the KS-fit statistic and the structural panel on fp32. One thread throughout (the timings are per core).

Usage::

    .venv/bin/python benchmarks/attack_distinguish.py --out bench/results [--wrong-keys 256] [--quick]

Writes ``attack_distinguish.json`` and ``attack_distinguish.md`` to ``--out`` and prints the Markdown.
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
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import chiplock.transforms.pre_aes as pre_aes_module
from chiplock.attacks import auc, lock_pre_aes, null_sigma, quantize_int8, samples_needed
from chiplock.attacks.hardlock import (canonical_code_fraction, ks_per_key, oracle1_per_key, oracle1b_per_key,
                                       oracle2_per_key, right_wrong_samples)
from chiplock.attacks.structure import measure_panel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
ORACLE_TENSORS = ("conv_layers.3.weight", "conv_layers.6.weight", "fc_layers.0.weight")
KS_TENSORS = ("fc_layers.2.weight", "conv_layers.3.weight", "conv_layers.6.weight", "fc_layers.0.weight")
ORACLE2_WINDOW = 512


def _weights() -> dict[str, torch.Tensor]:
    from chiplock_demo.models.digit_cnn import load_pretrained

    model = load_pretrained()
    if model is None:
        raise SystemExit("the pretrained DigitCNN is missing: pip install --no-deps digit-recognizer-py")
    return {n: p.detach().clone() for n, p in model.state_dict().items() if p.dim() >= 2}


def _machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "threads": 1, "load_avg": os.getloadavg()}


def _pre_aes_version() -> dict:
    path = Path(pre_aes_module.__file__)
    root = path.parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    doc = (pre_aes_module.__doc__ or "").strip().splitlines()
    return {"docstring": doc[0] if doc else "", "v2": "v2" in (pre_aes_module.__doc__ or ""),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            "last_commit": git("log", "-1", "--format=%h %s", "--", str(path)),
            "modified_vs_head": bool(git("status", "--porcelain", "--", str(path)))}


def _as(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quantize_int8(w) if dtype == torch.int8 else w.to(dtype)


def _row(pos: np.ndarray, neg: np.ndarray, **extra) -> dict:
    return {"auc": auc(pos, neg), "null_sd": null_sigma(pos.size, neg.size), "right_mean": float(pos.mean()),
            "wrong_mean": float(neg.mean()), "wrong_sd": float(neg.std()), "n_pos": int(pos.size),
            "n_neg": int(neg.size), **extra}


def oracles(weights: dict, wrong_keys: int, n: int) -> list[dict]:
    rows = []
    for dname, dtype in DTYPES.items():
        for name in ORACLE_TENSORS:
            w = _as(weights[name], dtype)
            per_lock = min(128, w.numel() // ORACLE2_WINDOW)
            locks = [(lock_pre_aes(w, k := os.urandom(32)), k) for _ in range(-(-n // per_lock))]
            locked, key = locks[0]
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                canonical_code_fraction(locked, os.urandom(32))
                times.append(time.perf_counter() - t0)
            us = min(times) * 1e6  # the fastest check: the machine is shared
            pos, neg = right_wrong_samples(locks, oracle1_per_key(), n_pos=n, n_wrong_keys=wrong_keys, n_neg=n)
            rows.append(_row(pos, neg, attack="oracle1 canonical codes (16 codes)", dtype=dname, tensor=name,
                             us_per_check=us))
            try:  # oracle 1b needs pre-aes v2's preimage search
                locked.code_ranks(locked.codes(key, 0, 16))
                ranks = True
            except NotImplementedError:
                ranks = False
            if ranks:
                pos, neg = right_wrong_samples(locks, oracle1b_per_key(32), n_pos=n, n_wrong_keys=wrong_keys,
                                               n_neg=n)
                rows.append(_row(pos, neg, attack="oracle1b code ranks (32 codes)", dtype=dname, tensor=name))
            pos, neg = right_wrong_samples(locks, oracle2_per_key(ORACLE2_WINDOW), n_pos=n, n_wrong_keys=wrong_keys,
                                           n_neg=n)
            rows.append(_row(pos, neg, attack=f"oracle2 breakpoint hits ({ORACLE2_WINDOW} values)", dtype=dname,
                             tensor=name))
            print(f"  {dname} {name}: " + ", ".join(f"{r['attack'].split(' ')[0]} {r['auc']:.3f}" for r in rows
                                                      if r["dtype"] == dname and r["tensor"] == name), flush=True)
    return rows


def ks_fit(weights: dict, n: int, n_large: int) -> list[dict]:
    rows = []
    for name in KS_TENSORS:
        w = weights[name]
        m = n if w.numel() <= 25_000 else n_large
        locks = [(lock_pre_aes(w, k := os.urandom(32)), k) for _ in range(m)]
        pos, neg = right_wrong_samples(locks, ks_per_key, n_pos=m, n_wrong_keys=m)
        rows.append(_row(pos, neg, attack="KS fit p-value", dtype="fp32", tensor=name))
        print(f"  KS {name}: {rows[-1]['auc']:.3f}", flush=True)
    return rows


def structure(weights: dict, wrong_keys: int) -> list[dict]:
    result = measure_panel(weights, list(weights), n_locks=4, n_wrong_keys=wrong_keys)
    rows = []
    for label, r in result.items():
        stat, tensor = label.split(" ", 1)
        rows.append(_row(r["pos"], r["neg"], attack=stat, dtype="fp32", tensor=tensor, ms=r["ms"]))
    return rows


def markdown(res: dict) -> str:
    m, v = res["machine"], res["pre_aes"]
    out = ["# Key-distinguishing attacks on pre-aes (pretrained DigitCNN)", "",
           f"{res['date']}; {m['cpu']}, {m['cores']} cores, one thread; torch {m['torch']}; load average "
           f"{m['load_avg'][0]:.1f} at the start, {m['load_avg_end'][0]:.1f} at the end (timings: fastest of 200). "
           f"pre-aes: \"{v['docstring']}\" (v2: {v['v2']}, file sha256 {v['sha256']}, "
           f"last commit {v['last_commit'] or '?'}, modified vs HEAD: {v['modified_vs_head']}).",
           f"AUC is max(AUC, 1 - AUC) over right-key instances vs {res['wrong_keys']} wrong keys; 0.5 = no "
           "separation.", "", "## Oracles (right-key instances: disjoint random element sets of several locks)", "",
           "| attack | dtype | tensor | AUC | fair-statistic sd | right mean | wrong mean | n+/n- | µs/check |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["oracles"] + res["ks_fit"]:
        us = f"{r['us_per_check']:.0f}" if "us_per_check" in r else ""
        out.append(f"| {r['attack']} | {r['dtype']} | {r['tensor']} | {r['auc']:.3f} | {r['null_sd']:.3f} | "
                   f"{r['right_mean']:.4g} | "
                   f"{r['wrong_mean']:.4g} | {r['n_pos']}/{r['n_neg']} | {us} |")
    out += ["", "## Structural panel (fp32; the right key gives the trained weights exactly)", "",
            "| statistic | tensor | AUC | right key | wrong keys (mean ± sd) | ms |", "|---|---|---|---|---|---|"]
    for r in res["structure"]:
        out.append(f"| {r['attack']} | {r['tensor']} | {r['auc']:.3f} | {r['right_mean']:.3f} | "
                   f"{r['wrong_mean']:.3f} ± {r['wrong_sd']:.3f} | {r['ms']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--wrong-keys", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="fewer instances (a smoke run; AUC noise ~0.03)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    weights = _weights()
    n = 256 if args.quick else samples_needed(0.55)
    n_ks = 64 if args.quick else samples_needed(0.6)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": _machine(), "pre_aes": _pre_aes_version(), "wrong_keys": args.wrong_keys}
    with threadpool_limits(1):
        print("oracles", flush=True)
        res["oracles"] = oracles(weights, args.wrong_keys, n)
        print("KS fit", flush=True)
        res["ks_fit"] = ks_fit(weights, n_ks, min(n_ks, 32))
        print("structural panel", flush=True)
        res["structure"] = structure(weights, max(args.wrong_keys, 200))
    res["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_distinguish.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "attack_distinguish.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
