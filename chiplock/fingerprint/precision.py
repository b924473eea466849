"""Finite-precision fingerprint: the exact bits of a fixed series of floating-point operations.

Floating-point results depend on the order of operations, fused multiply-adds, vector width, the BLAS and
oneDNN kernels chosen for the CPU, the number of threads splitting a reduction, and the GPU's kernels. A fixed
probe suite run on fixed inputs therefore yields bits that are identical on one machine and configuration and
differ when the hardware path changes. Inputs are built from integers or from numpy's PCG64 generator, so
they are bit-identical everywhere; only the arithmetic differs.

Each probe is hashed on its own (:func:`probe_digests`), so two configurations can be compared probe by probe
(:func:`compare`), and each probe declares the configuration facts it depends on (:data:`FACTS`,
:func:`probe_dependencies`); ``benchmarks/fingerprint_precision.py`` checks those declarations against fresh
processes with the environment changed, and ``docs/fingerprints.md`` records the result.

Entropy: the fingerprint identifies a *configuration* (CPU microarchitecture, library builds, thread count, GPU
model), not a unit, and an attacker who knows or buys the target's kind of machine reproduces it exactly. What
is left to guess is the software configuration: :mod:`chiplock.fingerprint.configurations` enumerates what
environment variables and thread counts reach on one machine and counts the distinct fingerprints.
``entropy_bits`` is :data:`PRECISION_ENTROPY_BITS`, the log2 of that measured count (a constant, so enrollment
stays fast; ``chiplock fingerprint report --enumerate`` measures it again here). It is far below the 64 bits
``lock`` requires: a precision-only key needs a vendor secret.

Nothing this module puts in an enrollment's public ``info`` identifies the configuration: per-probe ids and
configuration facts (:func:`probe_ids`, :func:`config_facts`) are for ``chiplock fingerprint --sensitive`` only.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from chiplock.errors import FingerprintError
from chiplock.fingerprint.base import Enrollment, FingerprintSource, register_source
from chiplock.registry import Option

SUITE_VERSION = 2
SUPPORTED_SUITES = (1, 2)
#: log2 of the distinct CPU fingerprints that software settings reach on one machine, measured by
#: ``benchmarks/fingerprint_precision.py --only-enumerate`` on 2026-12-01 (docs/fingerprints.md: AMD EPYC with
#: AVX-512, 2 vCPUs, torch 2.13.0, numpy 2.4.6): 152 configurations run, composed to 5,760 distinct = 12.49 bits,
#: rounded up. Credited for ``device="cuda"`` too: the GPU model adds a guess among a few dozen models.
PRECISION_ENTROPY_BITS = 12.5

#: Configuration facts a probe can depend on, and what changes them.
FACTS: dict[str, str] = {
    "cpu.isa": "ATen's CPU kernels' vector ISA (ATEN_CPU_CAPABILITY=default/avx2/avx512; the CPU's features)",
    "cpu.threads": "torch's intra-op thread count (OMP_NUM_THREADS, torch.set_num_threads)",
    "mkl": "MKL's code path for torch's CPU GEMM (MKL_CBWR, MKL_ENABLE_INSTRUCTIONS)",
    "onednn.isa": "oneDNN's kernels for convolutions, GELU and bf16 GEMM (ONEDNN_MAX_CPU_ISA)",
    "openblas.core": "numpy's OpenBLAS kernel (OPENBLAS_CORETYPE; honoured by scipy-openblas64 0.3.31)",
    "openblas.threads": "numpy's OpenBLAS thread count (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS)",
    "numpy.simd": "numpy's own SIMD dispatch (NPY_DISABLE_CPU_FEATURES; numpy 2.4 groups features, e.g. X86_V3)",
    "libm": "the C math library (glibc version)",
    "build": "library versions and build options (torch, numpy, MKL, OpenBLAS)",
    "gpu.model": "GPU model and SM count (CUDA probes)",
    "gpu.libs": "CUDA, cuBLAS and cuDNN versions and their kernel heuristics",
    "gpu.tf32": "whether TF32 tensor cores are used for fp32 matmuls",
}

_TORCH = ("build",)
_GEMM = ("mkl", "cpu.threads", "build")


@dataclass(frozen=True)
class Probe:
    """One fingerprint probe: a name, the facts it depends on, and a builder returning a thunk to run."""

    name: str
    depends: tuple[str, ...]
    build: Callable[[], Callable[[], Any]]
    backend: str = "torch-cpu"


def _ints(seed: int, shape: tuple[int, ...], scale: int = 256) -> torch.Tensor:
    """Platform-independent float32 input: small integers divided by a power of two (exact in fp32)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    data = rng.integers(-scale * 4, scale * 4, size=shape, dtype=np.int32).astype(np.float32) / scale
    return torch.from_numpy(data)


def _uniform(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    bits = rng.integers(0, 1 << 23, size=shape, dtype=np.int32).astype(np.float32)
    return torch.from_numpy(bits / np.float32(1 << 23) * np.float32(6.0) - np.float32(3.0))


def _np_full(seed: int, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    """Full-mantissa inputs, so that every rounding step of the arithmetic shows in the result."""
    return (np.random.Generator(np.random.PCG64(seed)).random(shape) * 4.0 - 2.0).astype(dtype)


def _matmul(m: int, k: int, n: int, seed: int) -> Callable[[], torch.Tensor]:
    a, b = _uniform(seed, (m, k)), _uniform(seed + 1, (k, n))
    return lambda: a @ b


# Suite 1 (kept so that files locked with it still open). -------------------------------------------------
def _build_cpu_probes() -> dict[str, Callable[[], Any]]:
    x = _uniform(10, (1 << 20,))
    t = _uniform(11, (64, 1000))
    img, w = _uniform(12, (4, 16, 32, 32)), _uniform(13, (32, 16, 3, 3))
    ln = _uniform(14, (256, 768))
    na, nb = _uniform(15, (300, 200)).double().numpy(), _uniform(16, (200, 100)).double().numpy()
    return {
        "matmul_64": _matmul(64, 64, 64, 1),
        "matmul_odd": _matmul(127, 255, 63, 2),
        "matmul_tall": _matmul(512, 1024, 33, 3),
        "dot_4096": _matmul(1, 4096, 1, 4),
        "bmm": (lambda a=_uniform(5, (8, 48, 96)), b=_uniform(6, (8, 96, 40)): torch.bmm(a, b)),
        "sum_1m": lambda: x.sum(),
        "var_1m": lambda: x.var(),
        "norm_1m": lambda: torch.linalg.vector_norm(x),
        "cumsum": lambda: torch.cumsum(x[:65536], 0),
        "exp": lambda: torch.exp(x[:65536]),
        "log": lambda: torch.log(x[:65536].abs() + 1e-3),
        "tanh": lambda: torch.tanh(x[:65536]),
        "sin": lambda: torch.sin(x[:65536] * 100),
        "erf": lambda: torch.erf(x[:65536]),
        "sigmoid": lambda: torch.sigmoid(x[:65536]),
        "pow": lambda: torch.pow(x[:65536].abs(), 1.37),
        "softmax": lambda: torch.softmax(t, dim=1),
        "log_softmax": lambda: torch.log_softmax(t, dim=1),
        "conv2d": lambda: F.conv2d(img, w, padding=1),
        "conv2d_grouped": lambda: F.conv2d(img, w[:, :4], padding=1, groups=4),
        "layer_norm": lambda: F.layer_norm(ln, (768,)),
        "numpy_blas": lambda: na @ nb,
    }


# Suite 2: suite 1's torch probes plus numpy/OpenBLAS probes, each with its declared dependencies. ---------
_V1_DEPENDS: dict[str, tuple[str, ...]] = {
    "matmul_64": _GEMM, "matmul_odd": _GEMM, "matmul_tall": _GEMM, "dot_4096": _GEMM, "bmm": _GEMM,
    "sum_1m": ("cpu.isa", "cpu.threads", *_TORCH), "var_1m": ("cpu.isa", "cpu.threads", *_TORCH),
    "norm_1m": ("cpu.isa", "cpu.threads", *_TORCH), "cumsum": ("cpu.isa", *_TORCH),
    "exp": ("cpu.isa", *_TORCH), "log": ("cpu.isa", *_TORCH), "tanh": ("cpu.isa", *_TORCH),
    "sin": ("cpu.isa", *_TORCH), "erf": ("cpu.isa", *_TORCH), "sigmoid": ("cpu.isa", *_TORCH),
    "pow": ("cpu.isa", *_TORCH), "softmax": ("cpu.isa", *_TORCH), "log_softmax": ("cpu.isa", *_TORCH),
    "conv2d": ("onednn.isa", "cpu.threads", *_TORCH), "conv2d_grouped": ("onednn.isa", "cpu.threads", *_TORCH),
    "layer_norm": ("cpu.isa", *_TORCH),
}


def _v2_cpu_probes() -> list[Probe]:
    v1 = _build_cpu_probes()
    probes = [Probe(name, _V1_DEPENDS[name], (lambda fn=fn: fn)) for name, fn in v1.items() if name != "numpy_blas"]

    def np_probe(name: str, depends: tuple[str, ...], build: Callable[[], Callable[[], Any]]) -> Probe:
        return Probe(name, (*depends, "build"), build, backend="numpy")

    def dgemm():
        a, b = _np_full(31, (300, 200)), _np_full(32, (200, 100))
        return lambda: a @ b

    def sgemm():
        a, b = _np_full(33, (256, 384), np.float32), _np_full(34, (384, 96), np.float32)
        return lambda: a @ b

    def ddot():
        a, b = _np_full(35, (100_000,)), _np_full(36, (100_000,))
        return lambda: np.dot(a, b)

    def solve():
        a, b = _np_full(37, (96, 96)) + 8 * np.eye(96), _np_full(38, (96, 4))
        return lambda: np.linalg.solve(a, b)

    def sum32():
        a = _np_full(39, (1 << 18,), np.float32)
        return lambda: a.sum()

    def unary(fn: Callable[[np.ndarray], np.ndarray], dtype: type, seed: int) -> Callable[[], Callable[[], Any]]:
        def build():
            a = _np_full(seed, (1 << 15,), dtype)
            return lambda: fn(a)
        return build

    return probes + [
        Probe("bf16_matmul", ("cpu.isa", "onednn.isa", *_GEMM),
              lambda a=_uniform(40, (96, 160)), b=_uniform(41, (160, 64)): (
                  lambda: (a.bfloat16() @ b.bfloat16()).float())),
        Probe("gelu", ("cpu.isa", "onednn.isa", *_TORCH), lambda x=_uniform(42, (1 << 16,)): (lambda: F.gelu(x))),
        np_probe("np_dgemm", ("openblas.core", "openblas.threads"), dgemm),
        np_probe("np_sgemm", ("openblas.core", "openblas.threads"), sgemm),
        np_probe("np_ddot", ("openblas.core", "openblas.threads"), ddot),
        np_probe("np_solve", ("openblas.core",), solve),
        np_probe("np_sum_f32", ("numpy.simd",), sum32),
        np_probe("np_exp_f32", ("numpy.simd",), unary(np.exp, np.float32, 43)),
        np_probe("np_log_f64", ("numpy.simd", "libm"), unary(lambda a: np.log(np.abs(a) + 1e-3), np.float64, 44)),
        np_probe("np_sin_f64", ("numpy.simd", "libm"), unary(lambda a: np.sin(a * 100), np.float64, 45)),
        np_probe("np_tanh_f32", ("numpy.simd", "libm"), unary(np.tanh, np.float32, 46)),
    ]


def _v2_cuda_probes() -> list[Probe]:
    dev = torch.device("cuda")
    gpu = ("gpu.model", "gpu.libs", "build")

    def tensors():
        return (_uniform(21, (1024, 1024)).to(dev), _uniform(22, (1024, 777)).to(dev), _uniform(23, (1 << 22,)).to(dev),
                _uniform(24, (8, 32, 64, 64)).to(dev), _uniform(25, (64, 32, 3, 3)).to(dev))

    a, b, x, img, w = tensors()
    return [
        Probe("cuda_matmul_fp32", gpu, lambda: (lambda: a @ b), "cuda"),
        Probe("cuda_matmul_tf32", (*gpu, "gpu.tf32"), lambda: (lambda: _tf32(lambda: a @ b)), "cuda"),
        Probe("cuda_matmul_fp16", gpu, lambda: (lambda: (a.half() @ b.half()).float()), "cuda"),
        Probe("cuda_matmul_bf16", gpu, lambda: (lambda: (a.bfloat16() @ b.bfloat16()).float()), "cuda"),
        Probe("cuda_sum", gpu, lambda: (lambda: x.sum()), "cuda"),
        Probe("cuda_row_sum", gpu, lambda: (lambda: a.sum(dim=1)), "cuda"),
        Probe("cuda_exp", gpu, lambda: (lambda: torch.exp(x)), "cuda"),
        Probe("cuda_softmax", gpu, lambda: (lambda: torch.softmax(a, dim=1)), "cuda"),
        Probe("cuda_layer_norm", gpu, lambda: (lambda: F.layer_norm(a, (1024,))), "cuda"),
        Probe("cuda_conv2d", gpu, lambda: (lambda: F.conv2d(img, w, padding=1)), "cuda"),
    ]


def _tf32(fn: Callable[[], Any]) -> Any:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _build_cuda_probes() -> dict[str, Callable[[], Any]]:
    """Suite 1's CUDA probes."""
    dev = torch.device("cuda")
    a, b = _uniform(21, (1024, 1024)).to(dev), _uniform(22, (1024, 777)).to(dev)
    x = _uniform(23, (1 << 22,)).to(dev)
    return {
        "cuda_matmul_fp32": lambda: a @ b,
        "cuda_matmul_fp16": lambda: (a.half() @ b.half()).float(),
        "cuda_matmul_bf16": lambda: (a.bfloat16() @ b.bfloat16()).float(),
        "cuda_sum": lambda: x.sum(),
        "cuda_exp": lambda: torch.exp(x),
        "cuda_softmax": lambda: torch.softmax(a, dim=1),
    }


@contextmanager
def _deterministic_cuda() -> Iterator[None]:
    """Pin the settings that choose CUDA kernels, so one GPU always picks the same (atomics-free) ones."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


def suite(device: str = "cpu", version: int = SUITE_VERSION) -> list[Probe]:
    """The probes of suite ``version`` for ``device`` (``"cpu"``, ``"cuda"`` or ``"auto"``).

    Raises:
        FingerprintError: CUDA requested but no GPU is usable, or an unknown suite version.
    """
    if version not in SUPPORTED_SUITES:
        raise FingerprintError(f"the file was locked with precision probe suite {version!r}; this chiplock runs "
                               f"suites {SUPPORTED_SUITES}: upgrade chiplock")
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', not {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise FingerprintError("the precision source was enrolled on CUDA but no GPU is usable here; "
                               "run on the enrolled GPU machine")
    if version == 1:
        probes = [Probe(n, (), (lambda fn=fn: fn)) for n, fn in _build_cpu_probes().items()]
        if use_cuda:
            probes += [Probe(n, (), (lambda fn=fn: fn), "cuda") for n, fn in _build_cuda_probes().items()]
        return probes
    return _v2_cpu_probes() + (_v2_cuda_probes() if use_cuda else [])


def probe_dependencies(device: str = "cpu") -> dict[str, list[str]]:
    """Probe name -> the configuration facts (keys of :data:`FACTS`) its result depends on."""
    return {p.name: list(p.depends) for p in suite(device)}


def _digest(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    arr = np.ascontiguousarray(value)
    return hashlib.sha256(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes()).digest()


def probe_digests(device: str = "cpu", *, suite_version: int = SUITE_VERSION) -> dict[str, str]:
    """Run the probe suite and return each probe's SHA-256 digest (hex), so two runs compare probe by probe.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CPU plus CUDA when a GPU is present).
        suite_version: Which probe suite to run (default: the current one).

    Raises:
        FingerprintError: ``device="cuda"`` but no GPU is usable.

    Example:
        >>> a = probe_digests()  # doctest: +SKIP
        >>> compare(a, probe_digests())  # doctest: +SKIP
        []
    """
    probes = suite(device, suite_version)
    out: dict[str, str] = {}
    with torch.no_grad():
        if any(p.backend == "cuda" for p in probes):
            with _deterministic_cuda():
                out = {p.name: _digest(p.build()()).hex() for p in probes}
        else:
            out = {p.name: _digest(p.build()()).hex() for p in probes}
    return out


def probe_ids(digests: dict[str, str], salt: bytes = b"") -> dict[str, str]:
    """Short identifiers of each probe's digest (32 bits each), to compare two runs probe by probe.

    Sensitive without a secret ``salt``: an attacker who enumerates configurations (a few hundred) matches
    unsalted ids to the configuration at once. With a fresh random salt that is not published, ids compare only
    within one output.
    """
    return {n: hashlib.sha256(b"chiplock/probe-id\0" + salt + bytes.fromhex(d)).hexdigest()[:8]
            for n, d in digests.items()}


def compare(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names of the probes whose digests (or ids) differ between two runs, or that only one run has."""
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def config_facts() -> dict[str, Any]:
    """The configuration facts this process runs with, for explaining a mismatch.

    Sensitive: they tell an attacker which configuration to try first. Print them only on request
    (``chiplock fingerprint --sensitive``), never in helper data or public info.
    """
    env = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE",
           "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES")
    facts: dict[str, Any] = {
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ[k] for k in env if k in os.environ},
    }
    try:
        import platform

        facts["libc"] = "-".join(platform.libc_ver())
        with open("/proc/cpuinfo") as fh:
            facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


def _combine(digests: dict[str, str], version: int = SUITE_VERSION) -> bytes:
    # Suite 1 used this exact domain string; keep it so that suite-1 files reproduce the same material.
    h = hashlib.sha256(f"chiplock/precision/v{version}".encode())
    for name in sorted(digests):
        h.update(name.encode() + b"\0" + bytes.fromhex(digests[name]))
    return h.digest()


@register_source
class PrecisionSource(FingerprintSource):
    """Hashes the exact output bits of a fixed floating-point probe suite.

    Args:
        device: ``"cpu"`` (default), ``"cuda"``, or ``"auto"``.

    Example:
        >>> PrecisionSource().enroll().material  # doctest: +SKIP
    """

    name = "precision"
    strength_group = "configuration"  # Identifies the configuration, as clock does: credited once together.
    cli_options = (Option("device", str, "cpu", "Where precision measures: cpu, cuda or auto.",
                          choices=("cpu", "cuda", "auto")),)

    def __init__(self, device: str = "cpu") -> None:
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', not {device!r}")
        self.device = device

    def enroll(self) -> Enrollment:
        start = time.perf_counter()
        digests = probe_digests(self.device)
        elapsed = time.perf_counter() - start
        device = "cuda" if any(k.startswith("cuda_") for k in digests) else "cpu"
        return Enrollment(
            source=self.name,
            helper={"suite": SUITE_VERSION, "device": device},
            material=_combine(digests),
            entropy_bits=PRECISION_ENTROPY_BITS,
            info={"seconds": elapsed,
                  "entropy_note": f"{PRECISION_ENTROPY_BITS:.1f} bits: log2 of the distinct fingerprints that "
                                  "software settings reach on one machine (measured, docs/fingerprints.md); the "
                                  "fingerprint identifies a configuration, not a unit: use a vendor secret"},
        )

    def reproduce(self, helper: dict[str, Any]) -> bytes:
        version = helper.get("suite") if isinstance(helper, dict) else None
        if version not in SUPPORTED_SUITES:
            raise FingerprintError(f"the file was locked with precision probe suite {version!r}; "
                                   f"this chiplock runs suites {SUPPORTED_SUITES}: upgrade chiplock")
        device = helper.get("device", "cpu")
        if device not in ("cpu", "cuda"):
            raise FingerprintError(f"the file's precision helper names device {str(device)[:40]!r}; only 'cpu' and "
                                   "'cuda' exist: the file is damaged, obtain a fresh copy")
        return _combine(probe_digests(device, suite_version=version), version)
