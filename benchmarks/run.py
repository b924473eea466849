"""Unlock benchmark: chiplock.unlock time per transform, divided by a plain safetensors load of the same weights.

Usage::

    .venv/bin/python benchmarks/run.py --out bench/results [--sizes 10,100,1000] [--repeat 5]

For each size (MB of fp32 plaintext) it generates a realistic state dict in memory, writes the plaintext once as
``.safetensors`` in a temporary folder, locks it once per transform with the fast, insecure KDF (so Argon2id
does not pollute the per-byte timings), then times ``chiplock.unlock(path, profile=profile)`` against the
baseline ``load_file`` + clone, interleaved. The fixed key-derivation cost (default Argon2id + reproducing the
precision fingerprint) is measured apart. Writes ``unlock.json`` and ``unlock.md`` to ``--out`` and prints the
Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import chiplock
from chiplock.keys import INSECURE_FAST, KdfParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_timing  # noqa: E402
import bench_weights  # noqa: E402

TRANSFORMS = ("aes", "shuffle", "pre-aes")
#: Ratio targets from issue 2, item 11.
TARGETS = {"aes": 1.5, "shuffle": 3.0, "pre-aes": 3.0}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="folder for unlock.json and unlock.md")
    ap.add_argument("--sizes", default="10,100,1000",
                    help="comma-separated plaintext sizes in MB (10^6 bytes), e.g. 10,100")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed repetitions per size after one warm-up (default: 5, or 3 from 500 MB up)")
    ap.add_argument("--transforms", default=",".join(TRANSFORMS), help="comma-separated subset of transforms")
    ap.add_argument("--stage-repeat", type=int, default=3, help="repetitions of each stage in the profile")
    ap.add_argument("--profile-sizes", default="100",
                    help="sizes (MB) that also get the stage profile; the largest size run when none of them is")
    ap.add_argument("--same-process", action="store_true",
                    help="time every run in this process (faster, but runs share allocator state)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    args = ap.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes takes numbers of MB separated by commas, e.g. --sizes 10,100")
    if not args.sizes or any(s <= 0 for s in args.sizes):
        ap.error("--sizes needs at least one positive size, e.g. --sizes 10,100")
    args.transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    unknown = [t for t in args.transforms if t not in TRANSFORMS]
    if unknown:
        ap.error(f"unknown transform(s) {', '.join(unknown)}; choose from {', '.join(TRANSFORMS)}")
    try:
        args.profile_sizes = [float(s) for s in args.profile_sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--profile-sizes takes numbers of MB separated by commas, e.g. --profile-sizes 100")
    if not set(args.profile_sizes) & set(args.sizes):
        args.profile_sizes = [max(args.sizes)]
    if (args.repeat is not None and args.repeat < 1) or args.stage_repeat < 1:
        ap.error("--repeat and --stage-repeat must be >= 1")
    return args


def _machine() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import cryptography
    import numpy
    import safetensors
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "aes", "vaes", "sha_ni", "vpclmulqdq"}),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "safetensors": safetensors.__version__, "cryptography": cryptography.__version__,
        "chiplock": chiplock.__version__,
    }


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_size(mb: float, transforms: list[str], profile: chiplock.DeviceProfile, args: argparse.Namespace,
               tmp: Path) -> tuple[list[dict], dict]:
    """Generate, lock and time one size; returns (result rows, stage profile per transform)."""
    label = f"{mb:g} MB" if mb < 1000 else f"{mb / 1000:g} GB"
    weights = bench_weights.make_weights(int(mb * 1e6))
    info = bench_weights.describe(weights)
    plain = tmp / "plain.safetensors"
    save_file(weights, str(plain))
    containers, lock_s, sizes, warm = {}, {}, {}, {}
    profile_path = tmp / "device.json"
    profile.save(profile_path)
    for name in transforms:
        warm[name] = str(tmp / f"warm.{name}.chiplock")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", chiplock.LowEntropyWarning)
            chiplock.lock({"w": torch.randn(4096)}, warm[name], profile, transform=name,
                          kdf=KdfParams(**INSECURE_FAST), allow_weak_key=True)
        path = tmp / f"model.{name}.chiplock"
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", chiplock.LowEntropyWarning)
            # A speed benchmark: the precision-only key is weak on purpose (no secret to thread through).
            chiplock.lock(weights, path, profile, transform=name, kdf=KdfParams(**INSECURE_FAST), allow_weak_key=True)
        lock_s[name] = time.perf_counter() - start
        containers[name] = str(path)
        sizes[name] = path.stat().st_size
        _log(f"{label}: locked {name} in {lock_s[name]:.1f} s ({sizes[name] / 1e6:.0f} MB)")
    del weights
    gc.collect()
    repeat = args.repeat or (5 if mb < 500 else 3)
    if args.same_process:
        samples = bench_timing.interleaved(str(plain), containers, profile, repeat)
    else:
        samples = bench_timing.interleaved_fresh(str(plain), containers, warm, str(profile_path), repeat)
    rows = []
    for name in transforms:
        s = bench_timing.summarize(samples[name], info["bytes"])
        rows.append({"size": label, "size_mb": mb, "transform": name, "weights": info, "repeat": repeat,
                     "container_bytes": sizes[name], "lock_s": lock_s[name], "target_ratio": TARGETS[name],
                     "pass": s["ratio"] <= TARGETS[name], **s})
        _log(f"{label}: {name} unlock {s['unlock_s']:.3f} s, baseline {s['baseline_s']:.3f} s, "
             f"ratio {s['ratio']:.2f}")
    profile_stages = {}
    if mb in args.profile_sizes:
        for name in transforms:
            profile_stages[name] = bench_timing.stages(containers[name], profile, args.stage_repeat)
        _log(f"{label}: stage profile done")
    for p in [plain, profile_path, *map(Path, containers.values()), *map(Path, warm.values())]:
        p.unlink(missing_ok=True)
    return rows, profile_stages


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log("enrolling this machine (precision fingerprint)")
    profile = chiplock.enroll()
    _log("measuring the fixed key-derivation cost")
    fixed = bench_timing.fixed_costs(profile, repeat=3)
    _log("measuring primitive throughput")
    prims = bench_timing.primitives()
    latency = bench_timing.small_op_latency()
    load_start = os.getloadavg()
    rows, stage_rows = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="chiplock-bench-", dir=args.tmp))
    try:
        for mb in sorted(args.sizes):
            r, st = bench_size(mb, args.transforms, profile, args, tmp)
            rows += r
            if st:
                stage_rows[r[0]["size"]] = st
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["device_total_s"] = row["unlock_s"] + fixed["total_s"]
    result = {
        "benchmark": "chiplock unlock vs safetensors load_file + clone",
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "config": {"sizes_mb": sorted(args.sizes), "repeat": args.repeat or "5 (<500 MB) / 3",
                   "stage_repeat": args.stage_repeat, "profile_sizes_mb": args.profile_sizes,
                   "transforms": args.transforms, "kdf_for_timings": INSECURE_FAST, "targets": TARGETS},
        "fixed": fixed,
        "primitives_gb_s": prims,
        "small_op_latency_ms": latency,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "results": rows,
        "stages_s": stage_rows,
        "linearity": bench_report.linearity(rows),
        "runtime_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out_dir / "unlock.json").write_text(json.dumps(result, indent=2) + "\n")
    md = bench_report.markdown(result)
    (out_dir / "unlock.md").write_text(md)
    print(md)
    _log(f"wrote {out_dir / 'unlock.json'} and {out_dir / 'unlock.md'} in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
