"""What a partition costs: latency and throughput of each strategy through the real executor vs the plain model.

For every strategy the same network (random weights: timing does not depend on them) is split, packaged into a
container (:func:`chiplock.enclave.package.package`), and served by a hardened executor process
(:class:`chiplock.enclave.executor.Enclave`); the host runs its part (:class:`~chiplock.enclave.partition.HostModel`)
and calls the executor for every secure step. In the same process and run the plain, unpartitioned model is
timed on the same inputs, the two interleaved call by call so that the load of a shared machine hits both alike.

Reported per strategy: latency at batch 1 (median of ``latency_runs`` calls), throughput at batch
``throughput_batch`` (images/s, median of ``throughput_runs`` batches), each as a ratio to the plain model, and
the world switches and bytes crossing the channel per batch. ``executor="local"`` measures the in-process
stand-in (:class:`~chiplock.enclave.partition.LocalCall`) instead: the partition's own cost without the process
boundary.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chiplock.attacks.result import (
    AttackResult,
    Progress,
    Table,
    new_figure,
    resolve,
    save_figure,
)
from chiplock.enclave.partition import STRATEGIES
from chiplock.errors import UnsupportedConfig

EXECUTORS = ("enclave", "local", "auto")
#: The issue's target for the TEESlice-style partition (its overhead against the plain model on the CPU).
TARGET = 1.3

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"strategies": list(STRATEGIES), "image": 8, "widths": [8, 16], "fc": 32, "k": 2, "ratio": 0.25,
              "fake_ratio": 0.25, "latency_runs": 10, "throughput_batch": 32, "throughput_runs": 3, "warmup": 2,
              "executor": "auto", "harden": True, "threads": 1, "seed": 0},
    "paper": {"strategies": list(STRATEGIES), "image": 28, "widths": [16, 32, 32, 64], "fc": 64, "k": 2,
              "ratio": 0.25, "fake_ratio": 0.25, "latency_runs": 200, "throughput_batch": 256,
              "throughput_runs": 15, "warmup": 5, "executor": "enclave", "harden": True, "threads": 1, "seed": 0},
}


def _model(strategy: str, params: dict[str, Any]) -> nn.Module:
    from chiplock.enclave.models import NetSpec, TeeSliceNet, build

    spec = NetSpec(image=int(params["image"]), widths=tuple(int(w) for w in params["widths"]), fc=int(params["fc"]))
    net = build(spec, seed=params["seed"])
    if strategy == "teeslice":
        net = TeeSliceNet(net, ratio=params["ratio"], seed=params["seed"] + 1)
    return net.eval()


def _split(model: nn.Module, strategy: str, params: dict[str, Any]):
    from chiplock.enclave.partition import split

    kw: dict[str, Any] = {}
    if strategy in ("last-k", "first-k"):
        kw["k"] = params["k"]
    if strategy == "shadownet":
        kw["fake_ratio"] = params["fake_ratio"]
    return split(model, strategy, seed=params["seed"], **kw)


def _test_device():
    """A synthetic device profile (80 estimated bits, fast KDF) for one measurement: the overhead of serving does
    not depend on where the key comes from, and a real enrolment would cost an Argon2id run per licence."""
    from chiplock.fingerprint import Enrollment
    from chiplock.keys import INSECURE_FAST, KdfParams
    from chiplock.profile import DeviceProfile

    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


@contextlib.contextmanager
def serve(partition, *, harden: bool = True, folder: str | os.PathLike | None = None):
    """Package ``partition`` into a container, issue both licences for synthetic devices and start the executor.

    Yields ``(spec, public, enclave)``: the host's part as :func:`~chiplock.enclave.package.load_host` opened it
    and the running :class:`~chiplock.enclave.executor.Enclave` (``None`` for an all-out partition, which has no
    secure part). The executor is closed and the files removed on exit.
    """
    from chiplock.enclave.executor import Enclave
    from chiplock.enclave.package import issue, load_host, package
    from chiplock.keys import INSECURE_FAST, KdfParams
    from chiplock.license import ContentKeys

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        d = Path(tmp)
        package(partition, d / "m.chiplock", content_keys_path=d / "m.keys")
        host_dev, enclave_dev = _test_device(), _test_device()
        keys = ContentKeys.load(d / "m.keys")
        host_lic, enclave_lic = issue(keys, host_profile=host_dev,
                                      enclave_profile=enclave_dev if partition.secure else None,
                                      kdf=KdfParams(**INSECURE_FAST))
        host_lic.save(d / "host.license")
        spec, public = load_host(d / "m.chiplock", d / "host.license", profile=host_dev)
        if enclave_lic is None:
            yield spec, public, None
            return
        enclave_lic.save(d / "enclave.license")
        enclave_dev.save(d / "enclave.profile")
        enclave = Enclave.start(d / "m.chiplock", d / "enclave.license", profile=d / "enclave.profile",
                                harden=harden)
        try:
            yield spec, public, enclave
        finally:
            enclave.close()


class _NoCall:
    """The call of an all-out partition: it never crosses (a call would be a bug in the partition)."""

    switches = bytes_in = bytes_out = 0

    def __call__(self, op: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise UnsupportedConfig(f"an all-out partition has no secure op {op!r}")


@contextlib.contextmanager
def _deployment(partition, executor: str, harden: bool):
    from chiplock.enclave.partition import HostModel, LocalCall, build_secure

    if executor == "local":
        call = LocalCall(build_secure(partition.spec, partition.secure)) if partition.secure else _NoCall()
        yield HostModel(partition.spec, partition.public, call).eval(), call, {"executor": "local"}
        return
    with serve(partition, harden=harden) as (spec, public, enclave):
        call = enclave if enclave is not None else _NoCall()
        info = {"executor": "enclave"}
        if enclave is not None:
            info["status"] = enclave.status()
        yield HostModel(spec, public, call).eval(), call, info


@contextlib.contextmanager
def _threads(n: int):
    """Run the host and (through ``OMP_NUM_THREADS``, which a new executor process inherits) the executor with
    ``n`` torch threads each, restoring both afterwards: on a shared machine more threads than idle cores make
    every timing a measure of the neighbours."""
    old, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def _counters(call) -> tuple[int, int, int]:
    return int(call.switches), int(call.bytes_in), int(call.bytes_out)


@torch.no_grad()
def _interleaved(a: Callable[[], Any], b: Callable[[], Any], runs: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(runs):
        # Alternate which goes first so neither always follows the other's cache state.
        for f, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return ta, tb


def measure(strategy: str, params: dict[str, Any], executor: str) -> dict[str, Any]:
    """One strategy: latency, throughput, switches and bytes per batch, partitioned vs plain."""
    model = _model(strategy, params)
    p = _split(model, strategy, params)
    g = torch.Generator().manual_seed(params["seed"])
    side = int(params["image"])
    x1 = torch.rand(1, 1, side, side, generator=g)
    xb = torch.rand(int(params["throughput_batch"]), 1, side, side, generator=g)
    with _deployment(p, executor, params["harden"]) as (host, call, info):
        with torch.no_grad():
            same = torch.allclose(host(xb), model(xb), rtol=1e-4, atol=1e-4)
            before = _counters(call)
            host(xb)
            after = _counters(call)
        per_batch = [y - x for x, y in zip(before, after)]
        lp, lh = _interleaved(lambda: model(x1), lambda: host(x1), params["latency_runs"], params["warmup"])
        tp, th = _interleaved(lambda: model(xb), lambda: host(xb), params["throughput_runs"], 1)
        if info.get("executor") == "enclave" and hasattr(call, "status"):
            info["status_after"] = call.status()
    lat_plain, lat_part = statistics.median(lp), statistics.median(lh)
    n = len(xb)
    thr_plain, thr_part = n / statistics.median(tp), n / statistics.median(th)
    return {"strategy": strategy, "matches_plain": bool(same), "latency_plain_ms": lat_plain * 1e3,
            "latency_min_ratio": min(lh) / min(lp), "throughput_min_ratio": min(th) / min(tp),
            "latency_ms": lat_part * 1e3, "latency_ratio": lat_part / lat_plain,
            "throughput_plain": thr_plain, "throughput": thr_part, "throughput_ratio": thr_plain / thr_part,
            "switches_per_batch": per_batch[0], "bytes_in_per_batch": per_batch[1],
            "bytes_out_per_batch": per_batch[2], "secure_params": sum(t.numel() for t in p.secure.values()),
            "public_params": sum(t.numel() for t in p.public.values()), **info}


def _executor(choice: str) -> str:
    if choice not in EXECUTORS:
        raise UnsupportedConfig(f"overhead: executor {choice!r}: choose from {', '.join(EXECUTORS)}")
    if choice != "auto":
        return choice
    import importlib.util

    return "enclave" if importlib.util.find_spec("chiplock.enclave.executor") is not None else "local"


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides) -> AttackResult:
    """Latency and throughput of every partition strategy against the plain model, in one run.

    Args:
        preset: ``"smoke"`` (8x8 images, a tiny net, a few calls) or ``"paper"`` (28x28, the stealing net,
            200 latency calls, batch 256).
        progress: ``progress(stage, done, total)``.
        **overrides: Any preset key: ``strategies``, ``image``, ``widths``, ``fc``, ``k``, ``ratio``,
            ``fake_ratio``, ``latency_runs``, ``throughput_batch``, ``throughput_runs``, ``warmup``, ``executor``
            (``enclave``: the hardened executor process; ``local``: the in-process stand-in; ``auto``: the
            executor when it is installed), ``harden`` (harden the executor; off only to measure what hardening
            costs), ``threads`` (torch threads in the host and in the executor), ``seed``.

    Returns:
        An :class:`~chiplock.attacks.result.AttackResult` named ``overhead``.

    Raises:
        UnsupportedConfig: Unknown preset, setting, strategy or executor; counts below 1.

    Example:
        >>> run(preset="smoke", executor="local").tables[0].rows
    """
    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    bad = [s for s in params["strategies"] if s not in STRATEGIES]
    if bad or not params["strategies"]:
        raise UnsupportedConfig(f"overhead: strategies {bad or '[]'}: choose from {', '.join(STRATEGIES)}")
    if min(params["latency_runs"], params["throughput_batch"], params["throughput_runs"], params["threads"]) < 1 \
            or params["warmup"] < 0:
        raise UnsupportedConfig("overhead: latency_runs, throughput_batch, throughput_runs and threads must be "
                                ">= 1 and warmup >= 0")
    executor = _executor(params["executor"])
    rows = []
    with _threads(params["threads"]):
        for i, s in enumerate(params["strategies"]):
            rows.append(measure(s, params, executor))
            if progress is not None:
                progress("overhead", i + 1, len(params["strategies"]))
    result = AttackResult(name="overhead", title="Partition overhead: latency and throughput vs the plain model",
                          tables=_tables(rows, params), data={"rows": rows, "executor": executor},
                          notes=_notes(rows, params, executor), params=params, plot=_plot)
    result.seconds = time.perf_counter() - t0
    return result


def _tables(rows: list[dict[str, Any]], params: dict[str, Any]) -> list[Table]:
    b = params["throughput_batch"]
    return [Table("Overhead per strategy (partitioned / plain, same run)",
                  ["strategy", "latency ms (plain)", "latency ms", "latency ×", "latency × (fastest)",
                   f"img/s @{b} (plain)", f"img/s @{b}", "throughput ×", "switches/batch", "bytes in/batch",
                   "bytes out/batch", "secure params", "output = plain"],
                  [[r["strategy"], r["latency_plain_ms"], r["latency_ms"], r["latency_ratio"],
                    r["latency_min_ratio"], r["throughput_plain"],
                    r["throughput"], r["throughput_ratio"], r["switches_per_batch"], r["bytes_in_per_batch"],
                    r["bytes_out_per_batch"], r["secure_params"], r["matches_plain"]] for r in rows],
                  caption=f"Latency: median of {params['latency_runs']} calls at batch 1; throughput: median of "
                          f"{params['throughput_runs']} batches of {b}. × = partitioned time / plain time (1 = free); "
                          "fastest = the fastest partitioned call over the fastest plain one (less moved by the "
                          "machine's load). "
                          "Switches and bytes: one batch of the throughput size, host → executor (in) and back "
                          "(out).")]


def _notes(rows: list[dict[str, Any]], params: dict[str, Any], executor: str) -> list[str]:
    where = ("through the hardened executor process (package → licence → Enclave; a socketpair per call)"
             if executor == "enclave" else "through the in-process stand-in LocalCall (no process boundary: "
                                           "a lower bound on the executor's overhead)")
    notes = [(f"Measured {where}; the plain model runs in the host process on the same inputs, interleaved call "
              f"by call; {params['threads']} torch thread(s) in the host and in the executor. Timings on a shared "
              "machine move with its load (see the machine line); the ratios, measured interleaved, move less.")]
    for r in rows:
        if r["strategy"] != "teeslice":
            continue

        def verdict(x: float) -> str:
            return "meets" if x <= TARGET else f"misses by {x - TARGET:.2f}×"

        kib = r["bytes_in_per_batch"] / max(params["throughput_batch"], 1) / 1024
        notes.append(f"teeslice: throughput {r['throughput_ratio']:.2f}× the plain model "
                     f"({verdict(r['throughput_ratio'])} the {TARGET}× target), latency at batch 1 "
                     f"{r['latency_ratio']:.2f}× "
                     f"({verdict(r['latency_ratio'])}: {r['latency_ms'] - r['latency_plain_ms']:.2f} ms more per "
                     f"image, one world switch); {kib:.1f} KiB of backbone features per image cross into the "
                     "executor, once per batch.")
        if max(r["throughput_ratio"], r["latency_ratio"]) > TARGET:
            notes.append("Where teeslice misses: at batch 1 the cost is the fixed price of one switch (two socket "
                         "messages, framing, a context switch to the executor and back), comparable to the whole "
                         "forward pass of a net this small; at large batches it is the slices' own work plus copying "
                         "the features. Batching requests, or sending each unit's features as soon as the host has "
                         "them (the executor running slice j while the host runs unit j + 1), would hide most of it.")
    bad = [r["strategy"] for r in rows if not r["matches_plain"]]
    if bad:
        notes.append(f"Partitioned outputs differ from the plain model for {', '.join(bad)} (beyond 1e-4).")
    return notes


def _plot(result: AttackResult, path: Path) -> None:
    rows = result.data["rows"]
    fig, axes = new_figure(1, width=6.0)
    ax = axes[0]
    xs = range(len(rows))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["latency_ratio"] for r in rows], w, label="latency (batch 1)")
    ax.bar([x + w / 2 for x in xs], [r["throughput_ratio"] for r in rows], w,
           label=f"time per image (batch {result.params['throughput_batch']})")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.axhline(TARGET, color="tab:red", ls="--", lw=1, label=f"target for teeslice ({TARGET}×)")
    ax.set_xticks(list(xs), [r["strategy"] for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel("partitioned / plain")
    ax.legend(fontsize=7)
    save_figure(fig, path)


__all__ = ["EXECUTORS", "PRESETS", "STRATEGIES", "TARGET", "measure", "run", "serve"]
