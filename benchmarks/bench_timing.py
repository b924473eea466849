"""Timing helpers: the baseline, interleaved unlock-vs-baseline runs, the fixed key cost and a stage profile.

The machine is shared and noisy (its second core is sometimes taken by a neighbour), so every unlock run is
paired with a baseline run right next to it, the order inside a pair alternates, and ratios are taken per pair
before the median. Results are dropped (and garbage-collected) outside the timed region, so freeing memory is
never billed to the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from blake3 import blake3
from safetensors.torch import load_file

import chiplock
from chiplock._digest import tree_digest
from chiplock.container.reader import open_container
from chiplock.fingerprint import get_source
from chiplock.keys import KdfParams, MasterKDF, assemble_material, subkey
from chiplock.license import License, open_license
from chiplock.transforms import DTYPE_BY_NAME, get_transform
from chiplock.transforms.base import DTYPES, aes_ctr_into, aes_ctr_parallel


def _load_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # Not glibc: nothing to hand back, the runs just share a warmer heap.
        return lambda: None
    return lambda: trim(0)


_malloc_trim = _load_trim()


def fresh_heap() -> None:
    """Free garbage and hand every free heap page back to the kernel (glibc ``malloc_trim``).

    Without it a run inherits pages that the previous run freed and glibc kept: a baseline right after a
    pre-aes unlock was measured 3x faster than after an aes unlock because its copies skipped the page
    faults. After the trim every run faults its memory in, as it would in a fresh process.
    """
    gc.collect()
    _malloc_trim()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes, from a trimmed heap; its result is dropped after the clock stops."""
    fresh_heap()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    fresh_heap()
    return elapsed


def baseline(plain: str) -> dict[str, torch.Tensor]:
    """A plain safetensors load that reads every byte: ``load_file`` maps the file, the clone copies it in."""
    return {k: v.clone() for k, v in load_file(plain).items()}


_CHILD = r"""
import sys, time, warnings
import chiplock
from chiplock.profile import DeviceProfile
from safetensors.torch import load_file
kind, path, profile_path, warm = sys.argv[1:5]
profile = DeviceProfile.load(profile_path)
if kind == "unlock":
    chiplock.unlock(warm, profile=profile)  # loads the compiled kernels once, as any earlier unlock would
    start = time.perf_counter()
    out = chiplock.unlock(path, profile=profile)
else:
    start = time.perf_counter()
    out = {k: v.clone() for k, v in load_file(path).items()}
print(time.perf_counter() - start)
"""


def timed_fresh_process(kind: str, path: str, profile_path: str, warm: str) -> float:
    """Seconds one unlock (or baseline load) takes in a new Python process, timed inside it.

    A fresh process per run is what a device does and keeps runs from sharing allocator state: in one
    long-lived process, memory that one run advised or kept (huge pages, glibc's raised mmap threshold) made
    the next baseline run up to 2x faster.
    """
    res = subprocess.run([sys.executable, "-c", _CHILD, kind, path, profile_path, warm], check=True,
                         capture_output=True, text=True)
    return float(res.stdout.strip().splitlines()[-1])


def interleaved_fresh(plain: str, containers: dict[str, str], warm: dict[str, str], profile_path: str,
                      repeat: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Like :func:`interleaved`, but every run in its own process (see :func:`timed_fresh_process`)."""
    out = {name: {"unlock": [], "baseline": []} for name in containers}
    for rep in range(warmup + repeat):
        for name, path in containers.items():
            runs = [("baseline", plain), ("unlock", path)]
            if rep % 2:
                runs.reverse()
            for kind, target in runs:
                t = timed_fresh_process(kind, target, profile_path, warm[name])
                if rep >= warmup:
                    out[name][kind].append(t)
    return out


def interleaved(plain: str, containers: dict[str, str], profile: chiplock.DeviceProfile, repeat: int,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Alternate baseline and unlock runs: per repetition, per transform, one pair (order flips each time).

    Returns ``{transform: {"unlock": [...], "baseline": [...]}}`` with ``repeat`` samples each; the first
    ``warmup`` repetitions warm the page cache and the allocator and are discarded.
    """
    out = {name: {"unlock": [], "baseline": []} for name in containers}
    for rep in range(warmup + repeat):
        for name, path in containers.items():
            runs = [("baseline", lambda: baseline(plain)),
                    ("unlock", lambda p=path: chiplock.unlock(p, profile=profile))]
            if rep % 2:
                runs.reverse()
            for kind, fn in runs:
                t = timed(fn)
                if rep >= warmup:
                    out[name][kind].append(t)
    return out


def summarize(samples: dict[str, list[float]], plain_bytes: int) -> dict[str, Any]:
    """Medians, the paired ratio (median of per-pair ratios), throughput and time per GB."""
    u, b = samples["unlock"], samples["baseline"]
    mu, mb = statistics.median(u), statistics.median(b)
    return {
        "unlock_s": mu, "baseline_s": mb,
        "unlock_samples_s": u, "baseline_samples_s": b,
        "ratio": statistics.median(x / y for x, y in zip(u, b)),
        "ratio_of_medians": mu / mb,
        "unlock_gb_s": plain_bytes / mu / 1e9, "baseline_gb_s": plain_bytes / mb / 1e9,
        "unlock_s_per_gb": mu / (plain_bytes / 1e9), "baseline_s_per_gb": mb / (plain_bytes / 1e9),
    }


def fixed_costs(profile: chiplock.DeviceProfile, repeat: int) -> dict[str, Any]:
    """The per-unlock cost that does not depend on the model's size, with the default KDF parameters.

    An unlock on the device reproduces every fingerprint source (here the precision probe) and then runs
    Argon2id once; the benchmark's containers use the fast, insecure KDF so these stay out of the per-byte
    timings and are added back here.
    """
    material = assemble_material(profile.materials())
    params = KdfParams()
    argon = [timed(lambda: MasterKDF(params=KdfParams()).derive(material)) for _ in range(repeat)]
    helper = profile.helpers()["precision"]
    source = get_source("precision")
    reproduce = [timed(lambda: source.reproduce(helper)) for _ in range(repeat)]
    fast = [timed(lambda: MasterKDF(params=KdfParams(**chiplock.keys.INSECURE_FAST)).derive(material))
            for _ in range(repeat)]
    a, r = statistics.median(argon), statistics.median(reproduce)
    return {
        "argon2id_default": {"iterations": params.iterations, "lanes": params.lanes,
                             "memory_kib": params.memory_kib, "median_s": a, "samples_s": argon},
        "precision_reproduce": {"median_s": r, "samples_s": reproduce},
        "argon2id_insecure_fast_s": statistics.median(fast),
        "total_s": a + r,
    }


class _Stored:
    """One tensor's stored bytes, mapped for the whole run (a diagnostic: unlock maps one tensor at a time)."""

    def __init__(self, name: str, data: np.ndarray) -> None:
        self.name, self.data = name, data


def map_tensors(path: str) -> tuple[dict[str, Any], list[_Stored]]:
    """The container's metadata (as JSON) and every tensor's stored bytes, mapped read-only."""
    c = open_container(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    meta = c.meta.to_json()
    meta["transform"] = next(iter(c.meta.groups.values())).transform
    return meta, [_Stored(e.name, mm[c.data_start + e.begin:c.data_start + e.end]) for e in c.entries]


def _keys(meta: dict[str, Any], profile: chiplock.DeviceProfile, tf_name: str) -> dict[str, bytes]:
    # The same derivation as chiplock.unlock: open the embedded licence, then per-tensor sub-keys.
    groups = open_license(License.from_json(meta["license"]), content_id=bytes.fromhex(meta["content_id"]),
                          transforms={k: g["transform"] for k, g in meta["groups"].items()}, profile=profile)
    return {name: subkey(groups[t["group"]], f"tensor/{tf_name}", name) for name, t in meta["tensors"].items()}


def _touch(stored: list) -> int:
    # A read-only pass over every stored byte (vectorised OR over 8-byte words, memory-bound).
    acc = 0
    for st in stored:
        d = st.data
        n8 = d.nbytes // 8 * 8
        if n8:
            acc ^= int(np.bitwise_or.reduce(d[:n8].view(np.uint64)))
        acc ^= int(d[n8:].sum())
    return acc


def stages(path: str, profile: chiplock.DeviceProfile, repeat: int) -> dict[str, float]:
    """Median seconds of each unlock stage run alone, over the whole container.

    ``map`` parses the header and maps the file; ``read`` touches every stored byte; ``digest`` is the
    integrity check (tree BLAKE3 of every stored tensor); ``keys`` derives the master and per-tensor keys
    (insecure-fast KDF); ``decode`` runs the transform's decode on every tensor, output allocation included.
    For aes-based transforms ``aes`` is AES-256-CTR over the stored bytes alone (into a reused buffer), so
    ``decode - aes`` is what the transform adds on top of decryption; for shuffle ``plan`` builds the keyed
    permutations alone (a private helper, timed for diagnosis only).
    """
    meta, stored = map_tensors(path)
    tf = get_transform(meta["transform"])
    keys = _keys(meta, profile, tf.name)

    def decode_all() -> dict[str, torch.Tensor]:
        out = {}
        for st in stored:
            info = meta["tensors"][st.name]
            out[st.name] = tf.decode(st.data, info["params"], keys[st.name], DTYPE_BY_NAME[info["dtype"]],
                                     tuple(info["shape"]))
        return out

    scratch = np.empty(max((st.data.nbytes for st in stored), default=0), dtype=np.uint8)

    def aes_all() -> None:
        for st in stored:
            nonce = bytes.fromhex(meta["tensors"][st.name]["params"]["nonce"]).ljust(16, b"\0")  # aes: 8-byte prefix
            aes_ctr_parallel(keys[st.name], nonce, st.data, scratch[:st.data.nbytes])

    work: dict[str, Callable[[], Any]] = {
        "map": lambda: map_tensors(path),
        "read": lambda: _touch(stored),
        "digest": lambda: [tree_digest(st.data) for st in stored],
        "keys": lambda: _keys(meta, profile, tf.name),
        "decode": decode_all,
    }
    if tf.name in ("aes", "pre-aes"):
        work["aes"] = aes_all
    plan = getattr(sys.modules.get("chiplock.transforms.shuffle"), "_Plan", None)
    if tf.name == "shuffle" and plan is not None:
        sizes = {st.name: st.data.nbytes // np.dtype(DTYPES[DTYPE_BY_NAME[meta["tensors"][st.name]["dtype"]]][0])
                 .itemsize for st in stored}
        work["plan"] = lambda: [plan(keys[name], n) for name, n in sizes.items()]
    return {name: statistics.median(timed(fn) for _ in range(repeat)) for name, fn in work.items()}


def primitives(nbytes: int = 256 << 20, repeat: int = 3) -> dict[str, float]:
    """Throughput (GB/s) of the building blocks on this machine, on one ``nbytes`` buffer in memory.

    One core vs the chiplock thread pool for AES-256-CTR and the tree digest (SHA-256 for comparison); ``copy_fresh`` copies into newly
    allocated memory (page faults included, as every unlock and the baseline must), ``copy_warm`` into memory
    already mapped.
    """
    src = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)
    key, nonce = bytes(32), bytes(16)
    work: dict[str, Callable[[], Any]] = {
        "aes_ctr_1core": lambda: aes_ctr_into(key, nonce, src, dst),
        "aes_ctr_pool": lambda: aes_ctr_parallel(key, nonce, src, dst),
        "sha256_1core": lambda: hashlib.sha256(src).digest(),
        "blake3_1core": lambda: blake3(src).digest(),
        "tree_digest_pool": lambda: tree_digest(src),
        "copy_warm": lambda: np.copyto(dst, src),
        "copy_fresh": lambda: torch.from_numpy(dst).clone(),
    }
    out = {}
    for name, fn in work.items():
        fn()
        out[name] = nbytes / min(timed(fn) for _ in range(repeat)) / 1e9
    return out


def small_op_latency(repeat: int = 9) -> dict[str, float]:
    """Milliseconds of one 256 K-element float64 -> float32 conversion: torch (default threads) vs numpy.

    pre-aes decode calls such torch conversions from inside chiplock's worker threads; torch then starts an
    OpenMP team per calling thread. On a busy 2-vCPU VM the spinning OpenMP workers were seen to turn a
    0.1 ms conversion into 12-16 ms (multiples of the 4 ms scheduler tick).
    """
    x = torch.randn(1 << 18, dtype=torch.float64)
    xn = x.numpy()
    work = {"torch_to_float32_ms": lambda: x.to(torch.float32),
            "numpy_astype_float32_ms": lambda: xn.astype(np.float32)}
    out = {}
    for name, fn in work.items():
        fn()
        out[name] = 1e3 * statistics.median(timed(fn) for _ in range(repeat))
    return out
