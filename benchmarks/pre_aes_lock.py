"""pre-aes lock cost: MB/s and peak resident memory of ``encode``, and of the model alone against the
sample-based model it replaced (``_build_model_reference``, kept in tests/transforms/test_pre_aes_model.py).

Usage::

    .venv/bin/python benchmarks/pre_aes_lock.py [--sizes 8000000,32000000] [--dtypes fp32,bf16,fp16]
        [--out bench/results/pre_aes_lock]

Every case runs in a fresh subprocess: it builds the tensor (``randn * 0.02`` in the dtype), warms the compiled
kernels on a small slice, resets the peak-RSS counter (``/proc/self/clear_refs``), runs the operation once and
reads ``VmHWM``. ``extra_mb`` is that peak minus the resident memory just before the operation (the tensor and
the interpreter), i.e. what the operation itself needed. Writes ``pre_aes_lock.json`` and ``pre_aes_lock.md``
to ``--out`` and prints the Markdown. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OPS = ("encode", "model", "model-reference")

_CHILD = r"""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.join({root!r}, "tests", "transforms"))
from chiplock.transforms import get_transform
from chiplock.transforms.pre_aes import build_model
from test_pre_aes_model import _build_model_reference

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(field)

op, dtype, n = {op!r}, getattr(torch, {dtype!r}), {n}
torch.set_num_threads(1)
t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)
tf = get_transform("pre-aes")
fn = {{"encode": lambda x: tf.encode(x, os.urandom(32)),
      "model": lambda x: build_model(x, np.random.default_rng(1)),
      "model-reference": lambda x: _build_model_reference(x, np.random.default_rng(1))}}[op]
fn(t[:5000].clone())  # compile and warm the kernels outside the measurement
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
fn(t)
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({{"seconds": seconds, "peak_mb": peak, "extra_mb": peak - before,
                  "tensor_mb": t.numel() * t.element_size() / 2**20}}))
"""


def run_case(op: str, dtype: str, n: int) -> dict:
    code = _CHILD.format(root=str(ROOT), op=op, dtype=DTYPES[dtype], n=n)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{op} {dtype} {n}: child failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update(op=op, dtype=dtype, n=n, mb_per_s=out["tensor_mb"] * 2**20 / 1e6 / out["seconds"])
    return out


def render(results: list[dict]) -> str:
    lines = ["| dtype | elements | op | s | MB/s | peak RSS MB | extra MB | tensor MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['n']:,} | {r['op']} | {r['seconds']:.2f} | {r['mb_per_s']:.1f} | "
                     f"{r['peak_mb']:.0f} | {r['extra_mb']:.0f} | {r['tensor_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8000000,32000000", help="comma-separated element counts")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16", help=f"comma-separated, from {sorted(DTYPES)}")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {list(OPS)}")
    ap.add_argument("--out", default="bench/results/pre_aes_lock", help="folder for the .json and .md results")
    args = ap.parse_args()
    results = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for dtype in args.dtypes.split(","):
            for op in args.ops.split(","):
                results.append(run_case(op, dtype, n))
                print(render(results[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "machine": platform.machine(), "threads": "torch 1, encode pool"}
    (out / "pre_aes_lock.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = render(results)
    (out / "pre_aes_lock.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
