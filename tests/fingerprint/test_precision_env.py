"""The precision fingerprint in fresh processes: stable for one configuration, different when the CPU path
(ISA dispatch, MKL/oneDNN code path, thread count) changes."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from chiplock.fingerprint.configurations import CLEARED


PROBE = ("import torch\n"
         "from chiplock.fingerprint.precision import PrecisionSource\n"
         "print(PrecisionSource().enroll().material.hex(), torch.get_num_threads())\n")
VARIANTS = {
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def _measure(extra: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env["OMP_NUM_THREADS"] = "2"  # the default configuration of the 2-core target
    env.update(extra)
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    material, threads = res.stdout.split()
    return material, int(threads)


def test_fresh_processes_same_config_same_material_changed_cpu_path_different():
    # One test, so pytest-xdist runs these six interpreter start-ups on one worker, two at a time.
    configs = {"baseline-1": {}, "baseline-2": {}, **VARIANTS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(configs, pool.map(_measure, configs.values())))

    (m1, t1), (m2, t2) = results["baseline-1"], results["baseline-2"]
    assert t1 == t2 == 2
    assert len(m1) == 64 and m1 == m2, "the same configuration gave two different fingerprints"
    assert results["OMP_NUM_THREADS=1"][1] == 1
    unchanged = [v for v in VARIANTS if results[v][0] == m1]
    assert not unchanged, f"these CPU-path changes did not change the precision fingerprint: {unchanged}"
