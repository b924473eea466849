"""The emulation attack on soft locks (the reference work's Table 4): run the authorized configuration in software.

A soft-locked model works well only in its authorized number format or sparsity pattern. An attacker without that
hardware can still *emulate* it: compute in fp32 and round the weights and activations to the format (or mask the
weights 2:4) in software, which gives the authorized outputs at some cost in speed. This attack measures that cost,
native kernel against emulation, side by side in one run (interleaved repeats, medians), for every configuration:

* ``fp32`` (the baseline), ``bf16``, ``fp16``, ``int8``, ``e4m3fn`` (fp8) and ``2:4`` sparsity;
* two workloads: one square matmul (TOPS, latency) and a small GPT-style model from ``transformers``
  (``LlamaForCausalLM`` from a random ``LlamaConfig``, never pretrained weights) in tokens/s over a batch;
* two emulations: the layer's handler rounds weights and activations on every call (as
  :func:`chiplock.softlock.apply_config` does), and the stronger attacker's version that rounds the constant weights
  once and only the activations per call.

Native paths: fp16/bf16 matmul, ``torch._int_mm`` (int8), ``torch._scaled_mm`` (fp8 e4m3fn, per-tensor scales) and,
on CUDA only, ``torch.sparse.to_sparse_semi_structured`` (2:4). A path this machine lacks is reported with the
reason instead of a number. The GPU measurement runs when ``torch.cuda.is_available()``; it was written for an
H100/H200-class GPU and has not been run on one (the machine it was developed on has none).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.attacks.result import (
    AttackResult,
    Progress,
    Table,
    new_figure,
    resolve,
    save_figure,
)
from chiplock.errors import UnsupportedConfig

#: The configurations measured by default: the fp32 baseline, then each authorized configuration.
CONFIGS = ("fp32", "bf16", "fp16", "int8", "e4m3fn", "2:4")

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"configs": CONFIGS, "quant_config": "int8", "sparse_config": "2:4", "matmul_n": 128,
              "gpt_hidden": 64, "gpt_layers": 2, "gpt_vocab": 512, "batch": 2, "seq": 32, "repeats": 3,
              "slow_s": 1.0, "gpu": "auto", "gpu_matmul_n": 1024, "gpu_gpt_hidden": 256, "gpu_gpt_layers": 2,
              "gpu_inner": 5, "seed": 0},
    "paper": {"configs": CONFIGS, "quant_config": "int8", "sparse_config": "2:4", "matmul_n": 2048,
              "gpt_hidden": 256, "gpt_layers": 4, "gpt_vocab": 4096, "batch": 8, "seq": 256, "repeats": 5,
              "slow_s": 2.0, "gpu": "auto", "gpu_matmul_n": 2048, "gpu_gpt_hidden": 1024, "gpu_gpt_layers": 8,
              "gpu_inner": 20, "seed": 0},
}

#: The reference work's Table 4 (an H100-class GPU): (workload, metric) -> (sparsity real, emulated, quantisation
#: real, emulated).
PAPER_TABLE4 = {("matmul", "throughput"): (49.97, 18.85, 79.22, 22.72),
                ("matmul", "latency_ms"): (0.43, 1.14, 0.27, 0.95),
                ("gpt", "throughput"): (4692.20, 2468.31, 3505.22, 1865.41),
                ("gpt", "latency_ms"): (436.47, 829.72, 584.27, 1097.88)}

_E4M3_MAX = 448.0
_TINY = torch.finfo(torch.float32).tiny
_MODES = ("native", "emulated", "cached")


# ---------------------------------------------------------------------------------------------- configurations

def _config(name: str) -> Any:
    from chiplock.softlock import parse_config

    return parse_config(name)


def handler_for(name: str):
    """The soft-lock handler of configuration ``name`` (what emulation applies to weights, inputs and outputs).

    Raises:
        UnsupportedConfig: ``name`` is not a registered soft-lock configuration.
    """
    from chiplock.softlock import get_handler

    return get_handler(_config(name))


def native_kind(name: str) -> str | None:
    """Which native kernel family runs configuration ``name``: ``fp32``, ``bf16``, ``fp16``, ``int8``, ``fp8``,
    ``2:4``, or ``None`` when torch has no kernel for it (it can then only be emulated)."""
    from chiplock.softlock import FP32, Int8, MiniFloat, NMSparsity, Variant

    cfg = _config(name)
    if isinstance(cfg, FP32):
        return "fp32"
    if isinstance(cfg, Int8):
        return "int8" if cfg.bits == 8 else None
    if isinstance(cfg, NMSparsity):
        return "2:4" if (cfg.n, cfg.m) == (2, 4) else None
    if isinstance(cfg, MiniFloat):
        return {(8, 7, 127, Variant.IEEE): "bf16", (5, 10, 15, Variant.IEEE): "fp16",
                (4, 3, 7, Variant.FN): "fp8"}.get((cfg.exp_bits, cfg.man_bits, cfg.bias, cfg.variant))
    return None


_PATHS = {"fp32": "fp32 matmul", "bf16": "bf16 matmul", "fp16": "fp16 matmul",
          "int8": "torch._int_mm int8×int8→int32", "fp8": "torch._scaled_mm fp8 e4m3fn, per-tensor scales",
          "2:4": "to_sparse_semi_structured fp16 (2:4 sparse tensor cores)"}


def _mask_2_4(w: torch.Tensor) -> torch.Tensor:
    from chiplock.softlock.nm_sparsity import nm_mask

    return w * nm_mask(w, 2, 4)


# ---------------------------------------------------------------------------------------------- emulated layers

class EmulatedLinear(nn.Module):
    """A linear layer computed in fp32 with the configuration's rounding: ``output(linear(activation(x),
    weight(W)))``, the soft-lock handler's definition of running on that configuration.

    Args:
        linear: The layer to emulate (its weight and bias are shared, not copied, unless ``cache_weights``).
        handler: The configuration's handler (:func:`handler_for`).
        cache_weights: Round (or mask) the weight once now instead of on every call: what an attacker does, since
            weights are constant.
    """

    def __init__(self, linear: nn.Linear, handler, *, cache_weights: bool) -> None:
        super().__init__()
        self.handler = handler
        self.cache_weights = cache_weights
        w = linear.weight.detach().float()
        self.register_buffer("weight", handler.weight(w) if cache_weights else w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.handler
        w = self.weight if self.cache_weights else h.weight(self.weight)
        return h.output(F.linear(h.activation(x.float()), w, self.bias))


def _rows(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """``x`` as a 2-D matrix, its rows padded with zeros to a multiple of ``multiple`` (a kernel's shape rule)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = (-m) % multiple if multiple > 1 else 0
    if x2.is_cuda and m + pad <= 16:
        pad += 32 - (m + pad)  # cuBLAS's int8 GEMM needs more than 16 rows.
    return (F.pad(x2, (0, 0, 0, pad)) if pad else x2), m


class _Int8Linear(nn.Module):
    """Native int8: per-channel int8 weights (quantised once), dynamic per-token int8 activations, ``_int_mm``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        sw = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / 127
        self.register_buffer("qw", torch.round(w / sw).clamp(-127, 127).to(torch.int8))
        self.register_buffer("sw", sw.reshape(1, -1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, m = _rows(x, 8 if x.is_cuda else 1)
        x2 = x2.float()
        sx = x2.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / 127
        qx = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
        # ``qw.t()`` is a column-major view, the layout cuBLAS's int8 GEMM wants (a contiguous copy is far slower).
        y = torch._int_mm(qx, self.qw.t())[:m].float() * sx[:m] * self.sw
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class _FP8Linear(nn.Module):
    """Native fp8: e4m3fn weights with a per-tensor scale (once), dynamic per-tensor e4m3fn activations,
    ``_scaled_mm`` (which needs a row-major first and a column-major second operand, shapes multiples of 16)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        sw = (w.abs().amax().clamp_min(_TINY) / _E4M3_MAX).reshape(())
        self.register_buffer("qw", (w / sw).to(torch.float8_e4m3fn))
        self.register_buffer("sw", sw)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, m = _rows(x, 16 if x.is_cuda else 1)
        x2 = x2.float()
        sx = (x2.abs().amax().clamp_min(_TINY) / _E4M3_MAX).reshape(())
        qx = (x2 / sx).to(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        y = torch._scaled_mm(qx, self.qw.t(), scale_a=sx, scale_b=self.sw, out_dtype=out_dtype)[:m]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class _Sparse24Linear(nn.Module):
    """Native 2:4 (CUDA only): the 2:4-masked fp16 weight compressed by ``to_sparse_semi_structured``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        w = _mask_2_4(linear.weight.detach().float()).half()
        self.ws = to_sparse_semi_structured(w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, m = _rows(x.half(), 64)
        y = F.linear(x2, self.ws)[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by ``make(linear)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
    return model


def emulated_model(model: nn.Module, name: str, *, cache_weights: bool = False) -> nn.Module:
    """A copy of ``model`` whose linear layers emulate configuration ``name`` in fp32 (see :class:`EmulatedLinear`).

    Raises:
        UnsupportedConfig: ``name`` is not a registered soft-lock configuration.

    Example:
        >>> slow = emulated_model(gpt, "int8")                      # rounds weights and inputs on every call
        >>> fast = emulated_model(gpt, "int8", cache_weights=True)  # weights rounded once
    """
    h = handler_for(name)
    return _swap_linears(copy.deepcopy(model).float(), lambda lin: EmulatedLinear(lin, h, cache_weights=cache_weights))


def native_model(model: nn.Module, name: str, device: torch.device) -> tuple[nn.Module | None, str]:
    """A copy of ``model`` running configuration ``name`` on native kernels, and a description of the path (or
    ``(None, reason)`` where ``device`` has no kernel for it). On CUDA the non-linear parts of int8/fp8 models run
    in bf16, as a deployment would; on the CPU in fp32."""
    kind = native_kind(name)
    host = torch.bfloat16 if device.type == "cuda" else torch.float32
    if kind is None:
        return None, f"no native kernel for {name} in torch"
    if kind == "2:4" and device.type != "cuda":
        return None, "no 2:4 kernel on CPU (to_sparse_semi_structured needs CUDA, sm_80+)"
    m = copy.deepcopy(model)
    if kind in ("fp32", "bf16", "fp16"):
        return m.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]), _PATHS[kind]
    if kind == "2:4":
        return _swap_linears(m.half(), _Sparse24Linear), _PATHS[kind] + ", rest fp16"
    layer = _Int8Linear if kind == "int8" else _FP8Linear
    rest = "bf16" if host == torch.bfloat16 else "fp32"
    return _swap_linears(m.to(host), layer), _PATHS[kind] + f", dynamic activation scales, rest {rest}"


# ---------------------------------------------------------------------------------------------- matmul workload

def matmul_fns(name: str, a: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    """The three ways of computing ``linear(a, w) = a @ w.T`` on configuration ``name``.

    Returns:
        ``{"native": fn or None, "path": str, "emulated": fn, "cached": fn}``. ``native`` times the low-precision
        kernel alone, operands already converted (as TOPS figures do); ``emulated`` rounds both operands and the
        output in fp32 on every call; ``cached`` has the weight rounded once.
    """
    h = handler_for(name)
    kind = native_kind(name)
    wr = h.weight(w)
    out: dict[str, Any] = {"emulated": lambda: h.output(F.linear(h.activation(a), h.weight(w))),
                           "cached": lambda: h.output(F.linear(h.activation(a), wr)),
                           "native": None, "path": f"no native kernel for {name} in torch"}
    if kind in ("fp32", "bf16", "fp16"):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
        an, wn = a.to(dt), w.to(dt)
        out["native"] = lambda: F.linear(an, wn)
    elif kind == "int8":
        qa = torch.round(a / (a.abs().amax() / 127)).clamp(-127, 127).to(torch.int8)
        qw = torch.round(w / (w.abs().amax() / 127)).clamp(-127, 127).to(torch.int8)
        out["native"] = lambda: torch._int_mm(qa, qw.t())
    elif kind == "fp8":
        sa = (a.abs().amax() / _E4M3_MAX).reshape(())
        sw = (w.abs().amax() / _E4M3_MAX).reshape(())
        qa, qw = (a / sa).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
        out["native"] = lambda: torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw, out_dtype=torch.float32)
    elif kind == "2:4":
        if a.is_cuda:
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(_mask_2_4(w).half())
            ah = a.half()
            out["native"] = lambda: F.linear(ah, ws)
        else:
            out["path"] = "no 2:4 kernel on CPU (to_sparse_semi_structured needs CUDA, sm_80+)"
    if out["native"] is not None:
        out["path"] = _PATHS[kind]
    return out


# ---------------------------------------------------------------------------------------------- timing

def _clock(fn: Callable[[], Any], device: torch.device, inner: int, cpu_clock: bool) -> tuple[float, float]:
    """Seconds per call: ``(measured, wall)``; ``measured`` is the process's CPU time when ``cpu_clock``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - w0) / inner
    return ((time.process_time() - c0) / inner if cpu_clock else wall), wall


def uses_cpu_clock(device: torch.device) -> bool:
    """Whether :func:`time_side_by_side` times ``device`` by process CPU time: on the CPU with one torch thread,
    where CPU time equals the wall time of an idle machine but is not inflated by other processes sharing it."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def time_side_by_side(fns: dict[str, Callable[[], Any]], *, device: torch.device, repeats: int, slow_s: float,
                      inner: int = 1) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Median seconds per call of each function, measured interleaved (each repeat calls every function once, in a
    rotating order) so that a change of machine load hits all of them alike.

    On the CPU with one torch thread the seconds are the process's CPU time (see :func:`uses_cpu_clock`); the
    wall-clock median is reported beside it. A function whose first (warm-up) call takes more than ``slow_s`` is not
    repeated: that call is its one sample. A function that raises on its first call is reported in the second dict
    with the reason.

    Returns:
        ``({name: {"s": median, "wall_s": wall median, "samples": n, "spread": (max - min) / median}},
        {name: failure reason})``.
    """
    cpu_clock = uses_cpu_clock(device)
    samples: dict[str, list[tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    live = []
    for k, fn in fns.items():
        try:
            t = _clock(fn, device, 1, cpu_clock)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            failed[k] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            continue
        samples[k] = [t] if t[0] > slow_s else []
        if t[0] <= slow_s:
            live.append(k)
    for r in range(repeats):
        for k in live[r % len(live):] + live[:r % len(live)] if live else []:
            samples[k].append(_clock(fns[k], device, inner, cpu_clock))
    out = {}
    for k, ts in samples.items():
        measured = [t[0] for t in ts]
        med = statistics.median(measured)
        out[k] = {"s": med, "wall_s": statistics.median(t[1] for t in ts), "samples": len(ts),
                  "spread": (max(measured) - min(measured)) / med if med > 0 else 0.0}
    return out, failed


# ---------------------------------------------------------------------------------------------- the workloads

def gpt_model(hidden: int, layers: int, vocab: int, *, seed: int = 0) -> nn.Module:
    """A random-weight Llama-style causal LM (``transformers``' ``LlamaForCausalLM``; nothing is downloaded).

    Heads of 64 dimensions (at least one), an MLP of ``8/3 × hidden`` rounded up to a multiple of 64.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UnsupportedConfig("the emulate attack's GPT workload needs `transformers`: pip install transformers") \
            from None
    heads = max(1, hidden // 64)
    inter = 64 * math.ceil(8 * hidden / 3 / 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits
    return run


def _measure(device: torch.device, p: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
    """Both workloads on ``device`` for every configuration of ``p["configs"]``."""
    cuda = device.type == "cuda"
    n = p["gpu_matmul_n"] if cuda else p["matmul_n"]
    hidden = p["gpu_gpt_hidden"] if cuda else p["gpt_hidden"]
    layers = p["gpu_gpt_layers"] if cuda else p["gpt_layers"]
    inner = p["gpu_inner"] if cuda else 1
    g = torch.Generator().manual_seed(p["seed"])
    a = torch.randn(n, n, generator=g).to(device)
    w = (torch.randn(n, n, generator=g) / math.sqrt(n)).to(device)
    base = gpt_model(hidden, layers, p["gpt_vocab"], seed=p["seed"]).to(device)
    ids = torch.randint(0, p["gpt_vocab"], (p["batch"], p["seq"]), generator=g).to(device)
    tokens = p["batch"] * p["seq"]
    spec = {"matmul_n": n, "matmul_ops": 2 * n ** 3, "gpt_hidden": hidden, "gpt_layers": layers,
            "gpt_vocab": p["gpt_vocab"], "gpt_params": sum(x.numel() for x in base.parameters()),
            "batch": p["batch"], "seq": p["seq"], "tokens": tokens, "repeats": p["repeats"], "inner": inner,
            "clock": "process CPU time" if uses_cpu_clock(device) else "wall clock"}
    out: dict[str, Any] = {"spec": spec, "matmul": {}, "gpt": {}}
    total, done = 2 * len(p["configs"]), 0
    for name in p["configs"]:
        fns = matmul_fns(name, a, w)
        path = fns.pop("path")
        timed, failed = time_side_by_side({k: f for k, f in fns.items() if f is not None}, device=device,
                                          repeats=p["repeats"], slow_s=p["slow_s"], inner=inner)
        out["matmul"][name] = _row(timed, failed, path, work=2 * n ** 3, per=1e12)
        done += 1
        if progress:
            progress(f"emulate {device.type} matmul {name}", done, total)
    for name in p["configs"]:
        native, path = native_model(base, name, device)
        fns = {"native": _forward(native, ids) if native is not None else None,
               "emulated": _forward(emulated_model(base, name), ids),
               "cached": _forward(emulated_model(base, name, cache_weights=True), ids)}
        timed, failed = time_side_by_side({k: f for k, f in fns.items() if f is not None}, device=device,
                                          repeats=p["repeats"], slow_s=p["slow_s"], inner=1)
        out["gpt"][name] = _row(timed, failed, path, work=tokens, per=1.0)
        del native, fns
        done += 1
        if progress:
            progress(f"emulate {device.type} gpt {name}", done, total)
    return out


def _row(timed: dict, failed: dict, path: str, *, work: float, per: float) -> dict[str, Any]:
    if "emulated" in failed or "cached" in failed:
        raise RuntimeError(f"emulation failed: {failed}")  # A bug in this module, not a missing kernel.
    row: dict[str, Any] = {"path": path if "native" not in failed else f"{path}: unavailable ({failed['native']})",
                           "native_available": "native" in timed}
    for mode in _MODES:
        t = timed.get(mode)
        row[f"{mode}_s"] = t["s"] if t else None
        row[f"{mode}_wall_s"] = t["wall_s"] if t else None
        row[f"{mode}_spread"] = t["spread"] if t else None
        row[f"{mode}_samples"] = t["samples"] if t else 0
        row[f"{mode}_throughput"] = work / t["s"] / per if t and t["s"] > 0 else None
    nat = row["native_s"]
    row["slowdown"] = row["emulated_s"] / nat if nat else None
    row["slowdown_cached"] = row["cached_s"] / nat if nat else None
    return row


# ---------------------------------------------------------------------------------------------- tables

def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _config_table(meas: dict, workload: str, device: str) -> Table:
    unit = "TOPS" if workload == "matmul" else "tokens/s"
    spec = meas["spec"]
    what = (f"one {spec['matmul_n']}×{spec['matmul_n']} matmul" if workload == "matmul" else
            f"a random Llama ({spec['gpt_params']:,} parameters, {spec['gpt_layers']} layers, hidden "
            f"{spec['gpt_hidden']}), forward over {spec['batch']}×{spec['seq']} tokens")
    rows = []
    for name, r in meas[workload].items():
        rows.append([name, r["native_available"], r["path"], r["native_throughput"], _ms(r["native_s"]),
                     r["emulated_throughput"], _ms(r["emulated_s"]), _ms(r["cached_s"]), r["slowdown"],
                     r["slowdown_cached"]])
    return Table(
        title=f"{'Single matmul' if workload == 'matmul' else 'GPT inference'} per configuration ({device})",
        columns=["config", "native?", "native path", f"native {unit}", "native ms", f"emulated {unit}",
                 "emulated ms", "emulated, weights pre-rounded ms", "slowdown emulated/native",
                 "slowdown pre-rounded/native"],
        rows=rows,
        caption=(f"{what}; median {spec['clock']} of up to {spec['repeats']} interleaved repeats"
                 + (f" of {spec['inner']} calls" if spec["inner"] > 1 else "")
                 + ". Emulated: fp32 compute, the configuration's rounding of weights, inputs and outputs on every "
                   "call; pre-rounded: the constant weights rounded once."
                 + (" Native matmul times the kernel alone (operands converted beforehand)."
                    if workload == "matmul" else
                    " Native int8/fp8 quantise activations on every call.")))


def _table4(meas: dict, p: dict, device: str) -> Table:
    sp, qu = p["sparse_config"], p["quant_config"]
    rows = []
    for workload, label, unit in (("matmul", "Single matmul", "TOPS"), ("gpt", "GPT inference", "tokens/s")):
        s, q = meas[workload].get(sp, {}), meas[workload].get(qu, {})
        for metric, key, conv in ((f"Throughput ({unit})", "throughput", None), ("Latency (ms)", "latency_ms", _ms)):
            paper = PAPER_TABLE4[(workload, key)]

            def cell(r, mode, key=key, conv=conv):
                return r.get(f"{mode}_throughput") if conv is None else conv(r.get(f"{mode}_s"))
            rows.append([label, metric, cell(s, "native"), cell(s, "emulated"), paper[0], paper[1],
                         cell(q, "native"), cell(q, "emulated"), paper[2], paper[3]])
        lat = PAPER_TABLE4[(workload, "latency_ms")]
        rows.append([label, "Slowdown (emulated/real latency)", None, s.get("slowdown"), None, lat[1] / lat[0],
                     None, q.get("slowdown"), None, lat[3] / lat[2]])
        rows.append([label, "Latency, weights pre-rounded (ms)", None, _ms(s.get("cached_s")), None, None,
                     None, _ms(q.get("cached_s")), None, None])
        rows.append([label, "Slowdown, weights pre-rounded", None, s.get("slowdown_cached"), None, None,
                     None, q.get("slowdown_cached"), None, None])
    return Table(
        title=f"Emulation costs for soft locking, shaped like the paper's Table 4 ({device})",
        columns=["Workload", "Metric", f"Sparsity real ({sp})", "Sparsity emulated", "Sparsity real (paper)",
                 "Sparsity emulated (paper)", f"Quantisation real ({qu})", "Quantisation emulated",
                 "Quantisation real (paper)", "Quantisation emulated (paper)"],
        rows=rows,
        caption=(f"Ours: this machine ({meas['spec']['clock']}); emulated = fp32 compute rounding weights and "
                 "activations on every call (the 'pre-rounded' rows: the constant weights rounded or masked once, "
                 "the stronger attacker); '—' where this device has no native kernel or the paper has no number. "
                 "Paper: an H100-class GPU, a larger GPT."))


# ---------------------------------------------------------------------------------------------- the attack

def _check(p: dict[str, Any]) -> dict[str, Any]:
    p = dict(p)
    if isinstance(p["configs"], str):
        p["configs"] = [c.strip() for c in p["configs"].split(",") if c.strip()]
    p["configs"] = list(p["configs"])
    if not p["configs"]:
        raise UnsupportedConfig("emulate: configs is empty; give e.g. fp32,bf16,fp16,int8,e4m3fn,2:4")
    for name in p["configs"] + [p["quant_config"], p["sparse_config"]]:
        _config(name)  # UnsupportedConfig names the known formats.
    for key in ("matmul_n", "gpt_hidden", "gpt_layers", "gpt_vocab", "batch", "seq", "repeats", "gpu_matmul_n",
                "gpu_gpt_hidden", "gpu_gpt_layers", "gpu_inner"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise UnsupportedConfig(f"emulate: {key}={p[key]!r} must be a positive integer")
    for key in ("matmul_n", "gpt_hidden", "gpt_vocab", "gpu_matmul_n", "gpu_gpt_hidden"):
        if p[key] % 64:
            raise UnsupportedConfig(f"emulate: {key}={p[key]} must be a multiple of 64 (the 2:4, int8 and fp8 "
                                    f"kernels' shape rules)")
    if p["gpu"] not in ("auto", "off"):
        raise UnsupportedConfig(f"emulate: gpu={p['gpu']!r}; use auto (measure a CUDA GPU when present) or off")
    return p


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides: Any) -> AttackResult:
    """Measure native against emulated throughput and latency for each configuration (the paper's Table 4).

    Args:
        preset: ``"smoke"`` (seconds) or ``"paper"`` (about 2-4 min on a 2-core CPU).
        progress: Called as ``progress(stage, done, total)`` after each configuration.
        **overrides: Any preset setting (``configs``, ``matmul_n``, ``gpt_hidden``, ``repeats``, ``gpu``, ...).

    Returns:
        The :class:`AttackResult` (name ``emulate``): Table 4 first, then the per-configuration tables.

    Raises:
        UnsupportedConfig: Unknown preset, setting or configuration name; a size that is not a multiple of 64;
            ``transformers`` missing.

    Example:
        >>> res = run(preset="smoke"); print(res.tables[0].to_markdown())
    """
    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    p = _check(params)
    data: dict[str, Any] = {"paper_table4": {f"{w}/{m}": v for (w, m), v in PAPER_TABLE4.items()},
                            "cpu": _measure(torch.device("cpu"), p, progress)}
    tables = [_table4(data["cpu"], p, "CPU")]
    gpu_reason = None
    if p["gpu"] == "off":
        gpu_reason = "GPU measurement turned off (gpu=off)"
    elif not torch.cuda.is_available():
        gpu_reason = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    if gpu_reason is None:
        dev = torch.device("cuda")
        data["gpu"] = _measure(dev, p, progress)
        data["gpu"]["device"] = torch.cuda.get_device_name(dev)
        tables.insert(0, _table4(data["gpu"], p, data["gpu"]["device"]))
    else:
        data["gpu"] = {"skipped": gpu_reason}
    tables += [_config_table(data["cpu"], "matmul", "CPU"), _config_table(data["cpu"], "gpt", "CPU")]
    if "skipped" not in data["gpu"]:
        name = data["gpu"]["device"]
        tables += [_config_table(data["gpu"], "matmul", name), _config_table(data["gpu"], "gpt", name)]
    return AttackResult(name="emulate", title="Emulation attack on soft locks: native vs emulated speed",
                        tables=tables, data=data, notes=_notes(data, p, gpu_reason), params=params,
                        seconds=time.perf_counter() - t0, plot=_plot)


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _notes(data: dict, p: dict, gpu_reason: str | None) -> list[str]:
    cpu = data["cpu"]
    mm, gpt, spec = cpu["matmul"], cpu["gpt"], cpu["spec"]
    qu, sp = p["quant_config"], p["sparse_config"]
    lat = {w: PAPER_TABLE4[(w, "latency_ms")] for w in ("matmul", "gpt")}
    others = [n for n in mm if n != "fp32"]
    notes = [
        "What emulation costs an attacker on this CPU (emulated time / native time; matmul, then GPT; weights "
        "rounded every call / pre-rounded once): "
        + "; ".join(f"{n} {_x(mm[n]['slowdown'])}/{_x(mm[n]['slowdown_cached'])}, GPT "
                    f"{_x(gpt[n]['slowdown'])}/{_x(gpt[n]['slowdown_cached'])}"
                    for n in others if mm[n]["native_available"])
        + f". The paper's GPU: {lat['matmul'][3] / lat['matmul'][2]:.2f}× (quantisation) and "
          f"{lat['matmul'][1] / lat['matmul'][0]:.2f}× (sparsity) on a matmul, {lat['gpt'][3] / lat['gpt'][2]:.2f}× "
          f"and {lat['gpt'][1] / lat['gpt'][0]:.2f}× on GPT inference."]
    if qu in mm and mm[qu]["native_available"]:
        notes.append(
            f"Quantisation ({qu}): the native int8 kernel is {mm['fp32']['native_s'] / mm[qu]['native_s']:.1f}× "
            f"faster than fp32 on the {spec['matmul_n']}² matmul, so emulating it costs {_x(mm[qu]['slowdown'])} "
            f"(paper {lat['matmul'][3] / lat['matmul'][2]:.2f}×); in the whole GPT the gap shrinks to "
            f"{_x(gpt[qu]['slowdown'])} (paper {lat['gpt'][3] / lat['gpt'][2]:.2f}×) because attention, norms and "
            f"activation quantisation are not sped up." if "fp32" in mm and mm[qu]["native_s"] else
            f"Quantisation ({qu}): emulation costs {_x(mm[qu]['slowdown'])} on the matmul.")
    if sp in mm and not mm[sp]["native_available"]:
        base = mm.get("fp32", {}).get("native_s")
        rel = f" ({mm[sp]['cached_s'] / base:.2f}× the fp32 matmul's time)" if base else ""
        notes.append(f"Sparsity ({sp}): this CPU has no 2:4 kernel, so no authorized speed exists to lose: the "
                     f"attacker runs the pre-masked model dense{rel}; re-masking on every call, as a naive "
                     f"emulation does, costs {_x(mm[sp]['emulated_s'] / mm[sp]['cached_s'])} that on the matmul and "
                     f"{_x(gpt[sp]['emulated_s'] / gpt[sp]['cached_s'])} on the GPT. The paper's GPU loses "
                     f"{lat['matmul'][1] / lat['matmul'][0]:.2f}× by emulating 2:4.")
    elif sp in mm:
        notes.append(f"Sparsity ({sp}): emulation costs {_x(mm[sp]['slowdown'])} the native sparse kernel on the "
                     f"matmul and {_x(gpt[sp]['slowdown'])} on the GPT.")
    cheap = [n for n in others if mm[n]["slowdown_cached"] is not None and mm[n]["slowdown_cached"] < 1.25]
    if cheap:
        notes.append(
            "Emulation is no slower than (or faster than) the native kernel here for " + ", ".join(cheap) + ": "
            + "; ".join(f"{n} native {_ms(mm[n]['native_s']):.3g} ms vs emulated {_ms(mm[n]['cached_s']):.3g} ms"
                        for n in cheap)
            + ". The native kernels for these formats are no faster here than fp32 with rounding, so a soft lock "
              "whose authorized format is one of them costs an attacker on this class of machine nothing in speed.")
    fp32 = gpt.get("fp32", {}).get("native_s")
    if fp32:
        notes.append("The attacker's real price is the rounding on top of a plain fp32 deployment: emulated GPT time "
                     "(weights pre-rounded) relative to fp32 native: "
                     + ", ".join(f"{n} {_x(gpt[n]['cached_s'] / fp32)}" for n in others if gpt[n]["cached_s"]) + ".")
    once = [f"{w} {n} {m}" for w in ("matmul", "gpt") for n, r in cpu[w].items() for m in _MODES
            if r[f"{m}_samples"] == 1 and spec["repeats"] > 1]
    notes.append(f"Timing: {spec['clock']}, one torch thread, native and emulated calls interleaved, median of up to "
                 f"{spec['repeats']} repeats; a call over slow_s={p['slow_s']} s is timed once"
                 + (f" ({', '.join(once)})" if once else "")
                 + ". On a shared machine the process's CPU time is far steadier than wall time (both are in the "
                   "JSON); differences under ~10 % are noise.")
    notes.append("Emulated int8 is exact in fp32 (sums of products of int8 codes stay below 2**24 here); a GPU "
                 "attacker could emulate in TF32/bf16 instead, faster but no longer bit-exact.")
    if gpu_reason:
        notes.append(f"GPU path skipped: {gpu_reason}. It is written for an H100/H200 (native fp16/bf16 matmul, "
                     f"torch._scaled_mm fp8, torch._int_mm int8, to_sparse_semi_structured 2:4) but has never run, "
                     f"so the paper's GPU numbers are not reproduced here; CPU ratios are not GPU ratios (no tensor "
                     f"cores, no sparse kernel, one BLAS thread).")
    return notes


def _plot(result: AttackResult, path) -> None:
    fig, axes = new_figure(2, width=5.5)
    cpu = result.data["cpu"]
    for ax, workload, unit in ((axes[0], "matmul", "TOPS"), (axes[1], "gpt", "tokens/s")):
        names = list(cpu[workload])
        width = 0.27
        for i, (mode, label) in enumerate((("native", "native"), ("emulated", "emulated"),
                                           ("cached", "emulated, weights pre-rounded"))):
            vals = [cpu[workload][n][f"{mode}_throughput"] or 0.0 for n in names]
            ax.bar([j + (i - 1) * width for j in range(len(names))], vals, width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(f"{'single matmul' if workload == 'matmul' else 'GPT forward'} (CPU)")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


__all__ = ["CONFIGS", "PAPER_TABLE4", "PRESETS", "EmulatedLinear", "emulated_model", "gpt_model", "handler_for",
           "matmul_fns", "native_kind", "native_model", "run", "time_side_by_side"]
