"""Split pipeline training on CPU ranks against one process: accuracy, step time, boundary-rotation cost.

For one architecture it draws the initial weights once, then trains them (same data order, optimiser and
hyper-parameters) three ways:

1. ``single``: the whole model in one process (:func:`chiplock.split.pipeline.train_single`), one forward pass
   per batch, and ``single_micro``: the same accumulating each batch's gradient over the pipeline's microbatches
   (batch norm then sees what it sees in the pipeline: the like-for-like reference);
2. ``plain``: ``--ranks`` torchrun ranks, one stage each, no boundary maps;
3. ``rotated``: the same with random boundary maps (scales in [1/2, 2]) folded in and redrawn every
   ``--rotate-every`` steps, the optimiser state transformed with the weights.

It reports each run's test accuracy, median step time, what each rank held (parameter bytes, peak RSS), and the
rotation cost two ways: inside the ``rotated`` run (time in rotations / time in steps, free of the noise between
runs on a shared machine: the largest over the ranks, which counts waiting for the slowest rank; rank 0's, which
is the critical path under GPipe; and folding alone) and across runs (median step time of ``rotated`` /
``plain``, which also counts how the folded maps slow the steps themselves: nothing should, but on a shared
machine this ratio is mostly noise).

Usage::

    .venv/bin/python benchmarks/split_train.py --arch mlp --out bench/results/split
    .venv/bin/python benchmarks/split_train.py --arch resnet18 --width 16 --epochs 2 --out bench/results/split

Writes ``split_train_<arch>.json`` and ``.md`` to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.profile import DeviceProfile
from chiplock.split.pipeline import SplitTrainSpec, train_single
from chiplock.split.shards import lock_split
from chiplock.split.units import ArchSpec, build_units, make_layout


def _device() -> DeviceProfile:
    # A synthetic device: the benchmark measures training, not fingerprints (every rank unlocks as it).
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


def _run_ranks(spec: SplitTrainSpec, ranks: int, work: Path, name: str) -> dict:
    out = work / name
    out.mkdir()
    spec_path = out / "spec.json"
    spec_path.write_text(spec.__class__(**{**spec.__dict__, "out": str(out)}).to_json())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                    "-m", "chiplock.split.train", "--spec", str(spec_path)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(spec.threads)}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    # A step ends when the slowest rank's does: take each step's maximum over the ranks.
    steps = [max(r["step_s"][i] for r in reports) for i in range(reports[0]["steps"])]
    rot = max(sum(r["rotation_s"]) for r in reports)
    # Rank 0 finishes each GPipe step last (the backward pass ends there), so the others wait for it in the map
    # exchange as they would at the next step's start: rank 0's rotation time is what rotation adds to a step.
    rot0 = sum(reports[0]["rotation_s"])
    fold_s = max(sum(r["fold_s"]) for r in reports)
    return {"accuracy": reports[-1]["accuracy"], "steps": len(steps), "median_step_s": statistics.median(steps),
            "train_s": sum(steps), "rotation_s": rot, "rotations": len(reports[0]["rotation_s"]),
            "rotation_overhead": rot / sum(steps), "rotation_overhead_rank0": rot0 / sum(steps),
            "fold_overhead": fold_s / sum(steps), "wall_s": wall, "final_loss": reports[-1]["losses"][-1],
            "param_bytes": [r["held_after_load"]["param_bytes"] for r in reports],
            "foreign_params": [r["held_after_train"]["foreign_params"] for r in reports],
            "maxrss_mib": [round(r["maxrss_kib"] / 1024, 1) for r in reports]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="mlp", choices=["mlp", "resnet18"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rotate-every", type=int, default=20)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/split"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from chiplock.softlock.pipeline import load_dataset

    ds = load_dataset("mnist5000")
    arch = ArchSpec(args.arch, width=args.width, depth=args.depth, num_classes=ds.num_classes,
                    image_size=ds.image_size)
    layout = make_layout(arch, args.ranks)
    torch.manual_seed(args.seed)
    init, _ = build_units(arch)
    results: dict = {"arch": arch.__dict__, "stages": [list(s) for s in layout.stages], "args": {
        k: str(v) for k, v in vars(args).items()}, "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}
        if args.max_train:
            data["x_train"], data["y_train"] = data["x_train"][:args.max_train], data["y_train"][:args.max_train]
        save_file({k: v.contiguous() for k, v in data.items()}, work / "data.safetensors")
        device = _device()
        device.save(work / "dev.json")
        (work / "split").mkdir()
        lock_split(init, layout, work / "split", keys_path=work / "split.keys", profiles=[device])
        spec = SplitTrainSpec(split_dir=str(work / "split"), out="-", profile=str(work / "dev.json"),
                              data=str(work / "data.safetensors"), epochs=args.epochs, batch_size=args.batch_size,
                              microbatches=args.microbatches, lr=args.lr, seed=args.seed)
        arrays = (data["x_train"], data["y_train"], data["x_test"], data["y_test"])
        for name, micro in (("single", False), ("single_micro", True)):
            model = copy.deepcopy(init)
            single = train_single(model, spec, arrays, microbatched=micro)
            results[name] = {"accuracy": single["accuracy"], "steps": len(single["step_s"]),
                             "median_step_s": statistics.median(single["step_s"]),
                             "train_s": sum(single["step_s"]), "final_loss": single["losses"][-1],
                             "param_bytes": sum(t.numel() * t.element_size() for t in init.parameters())}
        results["plain"] = _run_ranks(spec.__class__(**{**spec.__dict__, "boundary": False}), args.ranks, work,
                                      "plain")
        results["rotated"] = _run_ranks(spec.__class__(**{**spec.__dict__, "boundary": True,
                                                          "rotate_every": args.rotate_every}), args.ranks, work,
                                        "rotated")
    results["step_ratio_rotated_vs_plain"] = results["rotated"]["median_step_s"] / results["plain"]["median_step_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"split_train_{args.arch}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = _markdown(results, args)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _markdown(r: dict, args: argparse.Namespace) -> str:
    rows = ["| run | test acc. | Δ vs single_micro | median step (ms) | rotations | rotation / step time: any rank, "
            "rank 0, folding alone | param bytes per rank |", "|---|---|---|---|---|---|---|"]
    for name in ("single", "single_micro", "plain", "rotated"):
        x = r[name]
        rows.append(f"| {name} | {x['accuracy']:.4f} | {x['accuracy'] - r['single_micro']['accuracy']:+.4f} | "
                    f"{1000 * x['median_step_s']:.1f} | {x.get('rotations', '-')} | "
                    f"{100 * x.get('rotation_overhead', 0):.2f} %, {100 * x.get('rotation_overhead_rank0', 0):.2f} %, "
                    f"{100 * x.get('fold_overhead', 0):.2f} % | {x['param_bytes']} |")
    return (f"## Split training: {r['arch']['name']} (width {r['arch']['width']}), {args.ranks} CPU ranks, "
            f"MNIST-5000\n\nStages: {r['stages']}. {args.epochs} epochs, batch {args.batch_size} "
            f"({args.microbatches} microbatches, GPipe), Adam lr {args.lr}; rotation every {args.rotate_every} "
            f"steps.\n\n" + "\n".join(rows) +
            f"\n\nMedian step time rotated / plain: {r['step_ratio_rotated_vs_plain']:.3f}. "
            f"Peak RSS per rank (MiB): plain {r['plain']['maxrss_mib']}, rotated {r['rotated']['maxrss_mib']}. "
            f"{r['machine']}, {r['date']}.\n")


if __name__ == "__main__":
    sys.exit(main())
