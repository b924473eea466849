"""Soft-lock target table (issue #4): ResNet-18 on MNIST-5000, four quantisation pairs and four sparsity locks.

Writes ``<out>/softlock_targets.json`` and ``<out>/softlock_targets.md`` (and the pretrained original model).
Not collected by pytest. Example (about an hour on a 2-core CPU at width 16):

    .venv/bin/python benchmarks/softlock_targets.py --out bench/results/softlock --width 16 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from chiplock_demo.data import load_mnist5000
from chiplock.softlock import parse_config
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.model_io import build_architecture, load_model, save_model
from chiplock.softlock.train import evaluate_configs, lock_train
from chiplock_demo.training import train_classifier

PAIRS = [  # (authorized, unauthorized, mode, label)
    ("fp32", "e4m3fn", "quantization", "FP32 -> 8-bit MiniFloat (E4M3FN)"),
    ("fp16", "int8", "quantization", "FP16 -> Int8"),
    ("e6m9", "int8", "quantization", "16-bit MiniFloat (E6M9) -> Int8"),
    ("int8", "e4m3fn", "quantization", "Int8 -> 8-bit MiniFloat (E4M3FN)"),
    ("fp32", "prune0.05", "sparsity", "dense -> pruning 0.05"),
    ("fp32", "prune0.25", "sparsity", "dense -> pruning 0.25"),
    ("fp32", "prune0.5", "sparsity", "dense -> pruning 0.50"),
    ("fp32", "2:4", "sparsity", "dense -> 2:4"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/softlock")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--unauth-fraction", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated pair indices (0-7) to run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist5000(seed=0)
    orig_path = out / f"original_w{args.width}_e{args.pretrain_epochs}.safetensors"
    arch = {"name": "resnet18", "num_classes": 10, "image_size": 28, "width": args.width}
    if orig_path.exists():
        original, _ = load_model(orig_path)
    else:
        torch.manual_seed(args.seed)
        original = build_architecture("resnet18", width=args.width)
        t = time.perf_counter()
        train_classifier(original, data.x_train, data.y_train, epochs=args.pretrain_epochs, batch_size=64,
                         seed=args.seed)
        print(f"pretrained in {time.perf_counter() - t:.0f}s", flush=True)
        save_model(original, orig_path, {"arch": arch, "data": "mnist5000"})
    results_path = out / "softlock_targets.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    results["setup"] = {"model": f"ResNet-18 (width {args.width})", "data": "MNIST-5000 (4000 train / 1000 test)",
                        "pretrain_epochs": args.pretrain_epochs, "lock_epochs": args.epochs, "lam": args.lam,
                        "epsilon": "ln(10)", "lr": args.lr, "batch_size": args.batch_size,
                        "unauth_fraction": args.unauth_fraction, "optimizer": "Adam", "freeze_bn": True,
                        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"torch {torch.__version__}"}
    only = {int(i) for i in args.only.split(",") if i.strip()}
    for i, (auth, unauth, mode, label) in enumerate(PAIRS):
        if only and i not in only:
            continue
        model = copy.deepcopy(original)
        cfg = SoftLockConfig(authorized=auth, unauthorized=(unauth,), lam=args.lam, epochs=args.epochs,
                             lr=args.lr, batch_size=args.batch_size, unauth_fraction=args.unauth_fraction,
                             seed=args.seed)
        before = evaluate_configs(original, data.x_test, data.y_test, [auth, unauth])
        res = lock_train(model, data.x_train, data.y_train, cfg,
                         on_epoch=lambda e, r: print(f"  [{label}] epoch {e}: {r}", flush=True))
        after = evaluate_configs(model, data.x_test, data.y_test, [auth, unauth])
        a, u = parse_config(auth).name, parse_config(unauth).name
        row = {"label": label, "mode": mode, "authorized": a, "unauthorized": u,
               "orig_acc_authorized": before[a], "orig_acc_unauthorized": before[u],
               "locked_acc_authorized": after[a], "locked_acc_unauthorized": after[u],
               "delta_orig": before[a] - after[a], "delta_lock": after[a] - after[u],
               "train_seconds": res.seconds, "history": res.history}
        row["meets_target"] = row["delta_orig"] <= 0.02 and row["delta_lock"] >= 0.7
        results["rows"][label] = row
        print(f"{label}: {after[a]:.3f} (d_orig {row['delta_orig']:+.3f}, d_lock {row['delta_lock']:.3f}) "
              f"in {res.seconds:.0f}s", flush=True)
        results_path.write_text(json.dumps(results, indent=2))
        save_model(model, out / f"locked_{i}.safetensors", {"arch": arch, "data": "mnist5000",
                                                           "lock": json.loads(cfg.to_json())})
    write_markdown(results, out / "softlock_targets.md")
    return 0


def write_markdown(results: dict, path: Path) -> None:
    s = results["setup"]
    lines = ["# Soft-lock targets (measured)", "",
             "Setup: " + ", ".join(f"{k}={v}" for k, v in s.items()), "",
             "| Authorized -> Unauthorized | Acc_auth^locked (Δorig, Δlock) | orig auth / unauth | "
             "locked unauth | target met | train s |", "|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        lines.append(f"| {r['label']} | {r['locked_acc_authorized']:.3f} ({r['delta_orig']:+.3f}, "
                     f"{r['delta_lock']:.3f}) | {r['orig_acc_authorized']:.3f} / {r['orig_acc_unauthorized']:.3f} | "
                     f"{r['locked_acc_unauthorized']:.3f} | {'yes' if r['meets_target'] else 'NO'} | "
                     f"{r['train_seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
