"""Soft-lock cost (issue #4): lock-training step vs plain fine-tuning step, and locked vs original inference.

Steps are timed interleaved (plain, lock, plain, lock, ...) on the same batch so machine load affects both
alike; medians are reported. Writes ``<out>/softlock_cost.json`` and ``.md``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chiplock_demo.models import resnet18
from chiplock.softlock import apply_config
from chiplock.softlock.levers import apply_levers, plan_levers
from chiplock.softlock.train import LockPair, lock_loss

PAIRS = [("fp32", "e4m3fn"), ("fp16", "int8"), ("e6m9", "int8"), ("int8", "e4m3fn"), ("fp32", "prune0.05"),
         ("fp32", "prune0.25"), ("fp32", "prune0.5"), ("fp32", "2:4")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/softlock")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--unauth-fraction", type=float, default=1.0)
    p.add_argument("--only", default="", help="comma-separated pair indices")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    only = {int(i) for i in args.only.split(",") if i.strip()}
    for i, (auth, unauth) in enumerate(PAIRS):
        if only and i not in only:
            continue
        base = resnet18(width=args.width)
        plain = apply_config(base, auth)
        opt_p = torch.optim.Adam(plain.parameters(), lr=1e-4)
        locked = copy.deepcopy(base)
        apply_levers(locked, plan_levers(auth, [unauth]))
        pair = LockPair(locked, auth, (unauth,))
        opt_l = torch.optim.Adam(locked.parameters(), lr=1e-4)

        def plain_step():
            opt_p.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            opt_p.step()

        def lock_step():
            opt_l.zero_grad()
            out_a, outs_u = pair(x, max(1, round(len(x) * args.unauth_fraction)))
            lock_loss(out_a, y, outs_u, y[:len(outs_u[0])], lam=1.0, epsilon=2.3, hinge=True)[0].backward()
            opt_l.step()

        tp, tl = [], []
        plain_step(), lock_step()
        for _ in range(args.repeats):
            for fn, acc in ((plain_step, tp), (lock_step, tl)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        # Inference in the authorized configuration: the original and the locked (primed) weights.
        inf_o, inf_l = apply_config(base, auth).eval(), apply_config(locked, auth).eval()
        xi = torch.rand(256, 1, 28, 28)
        to, tlk = [], []
        with torch.no_grad():
            inf_o(xi), inf_l(xi)
            for _ in range(args.repeats):
                for m, acc in ((inf_o, to), (inf_l, tlk)):
                    t = time.perf_counter()
                    m(xi)
                    acc.append(time.perf_counter() - t)
        row = {"authorized": auth, "unauthorized": unauth, "plain_step_s": statistics.median(tp),
               "lock_step_s": statistics.median(tl), "infer_original_s": statistics.median(to),
               "infer_locked_s": statistics.median(tlk)}
        row["lock_over_plain"] = row["lock_step_s"] / row["plain_step_s"]
        row["infer_ratio"] = row["infer_locked_s"] / row["infer_original_s"]
        rows.append(row)
        print(f"{auth} -> {unauth}: lock/plain {row['lock_over_plain']:.2f}, inference {row['infer_ratio']:.2f}",
              flush=True)
    setup = {"model": f"ResNet-18 width {args.width}, 28x28", "batch_size": args.batch_size,
             "repeats": args.repeats, "unauth_fraction": args.unauth_fraction, "threads": torch.get_num_threads(),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             "plain_step": "fine-tuning step in the authorized configuration (same emulation, same batch)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"softlock_cost{args.tag}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    lines = ["| Authorized -> Unauthorized | plain step (ms) | lock step (ms) | lock / plain | inference locked / "
             "original |", "|---|---|---|---|---|"]
    lines += [f"| {r['authorized']} -> {r['unauthorized']} | {1e3 * r['plain_step_s']:.0f} | "
              f"{1e3 * r['lock_step_s']:.0f} | {r['lock_over_plain']:.2f} | {r['infer_ratio']:.2f} |" for r in rows]
    (out / f"softlock_cost{args.tag}.md").write_text("Setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()) + "\n\n"
                                          + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
