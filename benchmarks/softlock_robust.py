"""Soft locks against the standard deployment pipeline (issue #10): lock, attack with every deployment recipe,
retrain, report.

For each (authorized -> unauthorized) pair: lock-train a copy of the original with the chosen mechanism, then
measure the unauthorized accuracy under every recipe of :mod:`chiplock.softlock.deploy` (standard tools and
bespoke, mechanism-aware ones, with 256 unlabelled calibration images), the best of them, and the retraining attack
(1 %, 10 %, 100 % of the labels, starting from the best standard recipe) against training from scratch. The same
recipes run on the *original* model show what an honest deployment of the unlocked model reaches.

Writes ``<out>/softlock_robust.json``, ``softlock_robust.md`` and ``softlock_robust.png``. Not collected by pytest.
Example (about 40 min on a 2-core CPU at width 16, most of it the retraining attack):

    .venv/bin/python benchmarks/softlock_robust.py --out bench/results/softlock-robust --width 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from chiplock.softlock import parse_config
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.deploy import attack_table, recipes_for
from chiplock.softlock.model_io import build_architecture, load_model, save_model
from chiplock.softlock.retrain import retrain_attack
from chiplock.softlock.train import evaluate_configs, lock_train
from chiplock_demo.data import load_mnist5000
from chiplock_demo.training import accuracy, train_classifier

PAIRS = [("fp32", "e4m3fn", "FP32 -> E4M3FN"), ("fp16", "int8", "FP16 -> Int8"), ("int8", "e4m3fn", "Int8 -> E4M3FN"),
         ("fp32", "prune0.5", "dense -> prune 0.5"), ("fp32", "2:4", "dense -> 2:4")]


#: ``--short-attacks``: the recipes that came closest in the width-16 tables (plus the bespoke dedupe).
SHORT = {(), ("amax-channel",), ("mx-block",), ("amax-channel", "bn-reestimate"), ("gptq", "bn-reestimate"),
         ("gptq-lowdamp", "bn-reestimate"), ("fold-bn", "cle", "amax-channel", "bias-correction"),
         ("cle-stream", "bias-correction"), ("int8-mse-clip", "bn-reestimate"), ("bn-reestimate",),
         ("const-fold", "high-bias-absorb", "cle-stream", "int8-mse-clip", "bias-correction"),
         ("wanda", "bn-reestimate"), ("sparsegpt", "bn-reestimate"), ("sparsegpt-lowdamp", "bn-reestimate"),
         ("magnitude", "bn-reestimate"), ("const-fold", "sparsegpt", "bn-reestimate"),
         ("dedupe", "amax-channel", "bn-reestimate"), ("dedupe", "cle-stream", "bias-correction"),
         ("dedupe", "const-fold", "sparsegpt", "bn-reestimate")}


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def original_model(out: Path, width: int, epochs: int, data, seed: int = 0):
    """The fp32 original: Adam 2e-3 for ``epochs``, then one epoch each at 5e-4 and 2e-4 (cached in ``out``)."""
    path = out / f"original_w{width}_e{epochs}.safetensors"
    if path.exists():
        return load_model(path)[0], 0.0
    torch.manual_seed(seed)
    model = build_architecture("resnet18", width=width)
    t = time.perf_counter()
    train_classifier(model, data.x_train, data.y_train, epochs=epochs, batch_size=64, seed=seed)
    for lr in (5e-4, 2e-4):
        train_classifier(model, data.x_train, data.y_train, epochs=1, lr=lr, batch_size=64, seed=seed + 1)
    seconds = time.perf_counter() - t
    save_model(model, path, {"arch": {"name": "resnet18", "num_classes": 10, "image_size": 28, "width": width},
                             "data": "mnist5000"})
    return model, seconds


def run_pair(original, data, auth: str, unauth: str, label: str, args, index: int = 0) -> dict:
    calib = data.x_train[:256]
    cfg = SoftLockConfig(authorized=auth, unauthorized=(unauth,), epochs=args.epochs, lr=args.lr,
                         levers=args.mechanism, seed=args.seed)
    before = evaluate_configs(original, data.x_test, data.y_test, [auth, unauth])
    model = copy.deepcopy(original)
    res = lock_train(model, data.x_train, data.y_train, cfg)
    a, u = parse_config(auth).name, parse_config(unauth).name
    save_model(model, Path(args.out) / f"locked_{index}.safetensors",
               {"arch": {"name": "resnet18", "num_classes": 10, "image_size": 28, "width": args.width},
                "data": "mnist5000", "lock": json.loads(cfg.to_json())})
    after = evaluate_configs(model, data.x_test, data.y_test, [auth, unauth])
    print(f"[{label}] locked in {res.seconds:.0f}s: {a} {after[a]:.3f}, naive {u} {after[u]:.3f}", flush=True)
    row = {"label": label, "authorized": a, "unauthorized": u, "mechanism": res.levers,
           "lock_seconds": res.seconds, "orig_authorized": before[a], "orig_unauthorized_naive": before[u],
           "locked_authorized": after[a], "locked_unauthorized_naive": after[u]}
    t = time.perf_counter()
    recipes = None
    if args.short_attacks:  # the strongest recipes of the width-16 tables, for wide models
        recipes = [c for c in recipes_for(unauth, model=model) if c in SHORT]
    table = attack_table(model, unauth, calib, data.x_test, data.y_test, recipes=recipes,
                         on_row=lambda r: print(f"    {r.recipe:45s} {r.config:24s} {r.accuracy:.3f} "
                                                f"({r.seconds:.1f}s){'' if r.standard else '  [bespoke]'}",
                                                flush=True))
    row["attack_seconds"] = time.perf_counter() - t
    row["attacks"] = table.to_dict()["rows"]
    row["attacks_failed"] = table.to_dict()["failed"]
    best, best_any = table.best(), table.best(standard_only=False)
    row["best_standard"] = {"recipe": best.recipe, "chain": list(best.chain), "accuracy": best.accuracy}
    row["best_any"] = {"recipe": best_any.recipe, "accuracy": best_any.accuracy}
    if args.original_attacks:
        orig_table = attack_table(original, unauth, calib, data.x_test, data.y_test, standard_only=True)
        row["original_best_standard"] = {"recipe": orig_table.best().recipe, "accuracy": orig_table.best().accuracy}
    row["delta_orig"] = before[a] - after[a]
    row["delta_lock_naive"] = after[a] - after[u]
    row["delta_lock"] = after[a] - best.accuracy
    row["delta_lock_any"] = after[a] - best_any.accuracy
    row["meets_target"] = row["delta_orig"] <= 0.02 and row["delta_lock"] >= 0.7
    if args.retrain:
        row["retrain"] = run_retrain(model, data, auth, unauth, best.chain, args)
    print(f"[{label}] d_orig {row['delta_orig']:+.3f}  d_lock naive {row['delta_lock_naive']:.3f}  "
          f"best standard {row['delta_lock']:.3f} ({best.recipe})  any {row['delta_lock_any']:.3f} "
          f"({best_any.recipe})", flush=True)
    return row


def run_retrain(model, data, auth: str, unauth: str, chain, args) -> dict:
    fr = tuple(float(f) for f in args.retrain.split(","))
    rr = retrain_attack(model, unauth, data.x_train, data.y_train, data.x_test, data.y_test, fractions=fr,
                        epochs=args.retrain_epochs, seed=args.seed, pre_steps=tuple(chain), authorized=auth,
                        calib_x=data.x_train[:256],
                        on_row=lambda r: print(f"    retrain {r.fraction:.2f}: unauth {r.unauthorized_accuracy:.3f} "
                                               f"vs scratch {r.scratch_accuracy:.3f} (auth "
                                               f"{r.authorized_accuracy:.3f})", flush=True))
    return rr.to_dict()


def retrain_saved(data, args, out: Path, only: set) -> None:
    """The retraining attack on locks saved by an earlier (or concurrent) run: waits for each pair's locked file
    and attack row, then writes ``softlock_retrain.json`` (merged into the Markdown)."""
    path = out / "softlock_retrain.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for i, (auth, unauth, label) in enumerate(PAIRS):
        if (only and i not in only) or label in done:
            continue
        rows_path = out / "softlock_robust.json"
        while True:
            rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else {}
            if label in rows and (out / f"locked_{i}.safetensors").exists():
                break
            time.sleep(20)
        model = load_model(out / f"locked_{i}.safetensors")[0]
        chain = rows[label]["best_standard"]["chain"]
        print(f"[{label}] retraining from {' + '.join(chain) or 'naive cast'}", flush=True)
        done[label] = run_retrain(model, data, auth, unauth, chain, args)
        path.write_text(json.dumps(done, indent=2))


def write_markdown(results: dict, path: Path) -> None:
    retrain_path = path.parent / "softlock_retrain.json"
    if retrain_path.exists():
        for label, rr in json.loads(retrain_path.read_text()).items():
            if label in results["rows"]:
                results["rows"][label].setdefault("retrain", rr)
    s = results["setup"]
    lines = ["# Soft locks vs the standard deployment pipeline (measured)", "",
             "Setup: " + ", ".join(f"{k}={v}" for k, v in s.items()), "",
             "Δlock is authorized accuracy minus the unauthorized accuracy of the **best standard recipe**; the "
             "bespoke column adds mechanism-aware attacks.", "",
             "| pair | mechanism | auth (Δorig) | naive unauth | best standard recipe | Δlock | best any (bespoke) "
             "| target |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        mech = ", ".join(n for n, _ in r["mechanism"]) or "none"
        lines.append(f"| {r['label']} | {mech} | {r['locked_authorized']:.3f} ({r['delta_orig']:+.3f}) | "
                     f"{r['locked_unauthorized_naive']:.3f} | {r['best_standard']['recipe']}: "
                     f"{r['best_standard']['accuracy']:.3f} | {r['delta_lock']:.3f} | "
                     f"{r['best_any']['recipe']}: {r['best_any']['accuracy']:.3f} | "
                     f"{'met' if r['meets_target'] else 'missed'} |")
    for r in results["rows"].values():
        lines += ["", f"## {r['label']}: every recipe", "", "| recipe | runs on | unauthorized accuracy | seconds | "
                  "standard |", "|---|---|---|---|---|"]
        for a in r["attacks"]:
            lines.append(f"| {a['recipe']} | {a['config']} | {a['accuracy']:.3f} | {a['seconds']:.1f} | "
                         f"{'yes' if a['standard'] else 'bespoke'} |")
        for f in r.get("attacks_failed", []):
            lines.append(f"| {f['recipe']} | failed: {f['error'][:80]} | | | |")
        if "retrain" in r:
            lines += ["", f"Retraining attack (from: {r['best_standard']['recipe']}), "
                      f"{r['retrain'].get('epochs', '')} epochs:", "",
                      "| data | retrained unauth | from scratch | retrained auth | retrain s | scratch s |",
                      "|---|---|---|---|---|---|"]
            for x in r["retrain"]["rows"]:
                lines.append(f"| {x['fraction']:.0%} ({x['samples']}) | {x['unauthorized_accuracy']:.3f} | "
                             f"{x['scratch_accuracy']:.3f} | {x['authorized_accuracy']:.3f} | "
                             f"{x['retrain_seconds']:.0f} | {x['scratch_seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"].values())
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 4.2), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rows):
        accs = [a["accuracy"] for a in r["attacks"]]
        colors = ["tab:blue" if a["standard"] else "tab:red" for a in r["attacks"]]
        ax.bar(range(len(accs)), accs, color=colors)
        ax.axhline(r["locked_authorized"], color="tab:green", ls="--", label="authorized")
        ax.axhline(r["locked_authorized"] - 0.7, color="gray", ls=":", label="target ceiling")
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("recipe #")
    axes[0][0].set_ylabel("unauthorized accuracy after the recipe")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Every deployment recipe against each lock (blue: standard, red: bespoke)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/softlock-robust")
    p.add_argument("--original", default="", help="a saved original (softlock model file); trained if absent")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1, help="lock-training epochs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--mechanism", default="auto", choices=("auto", "decoys", "levers", "none"))
    p.add_argument("--retrain", default="0.01,0.1,1.0", help="data fractions for the retraining attack ('' skips)")
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--original-attacks", action="store_true", help="also attack the unlocked original")
    p.add_argument("--short-attacks", action="store_true", help="only the strongest recipes (wide models)")
    p.add_argument("--only", default="", help="comma-separated pair indices (0-4)")
    p.add_argument("--retrain-saved", action="store_true",
                   help="only run the retraining attack on the locked files of a (concurrent) run in --out")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist5000(seed=0)
    if args.original:
        original, pre_s = load_model(args.original)[0], 0.0
    else:
        original, pre_s = original_model(out, args.width, args.pretrain_epochs, data, args.seed)
    only = {int(i) for i in args.only.split(",") if i.strip()}
    results_path = out / "softlock_robust.json"
    if args.retrain_saved:
        retrain_saved(data, args, out, only)
        if results_path.exists():
            results = json.loads(results_path.read_text())
            write_markdown(results, out / "softlock_robust.md")
        return 0
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    results["setup"] = {"model": f"ResNet-18 (width {args.width})", "data": "MNIST-5000 (4000 train / 1000 test)",
                        "original_accuracy": accuracy(original, data.x_test, data.y_test),
                        "lock_epochs": args.epochs, "lr": args.lr, "mechanism": args.mechanism,
                        "calibration": "256 unlabelled training images", "retrain_epochs": args.retrain_epochs,
                        "machine": _machine(), "date": time.strftime("%Y-%m-%d")}
    if pre_s:
        results["setup"]["pretrain_seconds"] = round(pre_s)
    t0 = time.perf_counter()
    for i, (auth, unauth, label) in enumerate(PAIRS):
        if only and i not in only:
            continue
        results["rows"][label] = run_pair(original, data, auth, unauth, label, args, i)
        results_path.write_text(json.dumps(results, indent=2))
    results["setup"]["run_seconds"] = round(time.perf_counter() - t0)
    results_path.write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "softlock_robust.md")
    plot(results, out / "softlock_robust.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
