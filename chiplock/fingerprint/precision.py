"""Finite-precision fingerprint: the exact bits of a fixed series of floating-point operations.

Floating-point results depend on the order of operations, fused multiply-adds, vector width, the BLAS and
oneDNN kernels chosen for the CPU, the number of threads splitting a reduction, and the GPU's kernels. A fixed
probe suite run on fixed inputs therefore yields bits that are identical on one machine and configuration and
differ when the hardware path changes. Inputs are built from integers so they are bit-identical everywhere;
only the arithmetic differs.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from chiplock.errors import FingerprintError
from chiplock.fingerprint.base import Enrollment, FingerprintSource, register_source

SUITE_VERSION = 1


def _ints(seed: int, shape: tuple[int, ...], scale: int = 256) -> torch.Tensor:
    """Platform-independent float32 input: small integers divided by a power of two (exact in fp32)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    data = rng.integers(-scale * 4, scale * 4, size=shape, dtype=np.int32).astype(np.float32) / scale
    return torch.from_numpy(data)


def _uniform(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    bits = rng.integers(0, 1 << 23, size=shape, dtype=np.int32).astype(np.float32)
    return torch.from_numpy(bits / np.float32(1 << 23) * np.float32(6.0) - np.float32(3.0))


def _matmul(m: int, k: int, n: int, seed: int) -> Callable[[], torch.Tensor]:
    a, b = _uniform(seed, (m, k)), _uniform(seed + 1, (k, n))
    return lambda: a @ b


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


def _build_cuda_probes() -> dict[str, Callable[[], Any]]:
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


def _digest(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    arr = np.ascontiguousarray(value)
    return hashlib.sha256(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes()).digest()


def probe_digests(device: str = "cpu") -> dict[str, str]:
    """Run the probe suite and return each probe's SHA-256 digest (hex), so two runs compare probe by probe.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CPU plus CUDA when a GPU is present).

    Raises:
        FingerprintError: ``device="cuda"`` but no GPU is usable.
    """
    probes: dict[str, Callable[[], Any]] = {}
    if device in ("cpu", "auto"):
        probes.update(_build_cpu_probes())
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FingerprintError("the precision source was enrolled on CUDA but no GPU is usable here; "
                                   "run on the enrolled GPU machine")
        probes.update(_build_cuda_probes())
    with torch.no_grad():
        return {name: _digest(fn()).hex() for name, fn in probes.items()}


def _combine(digests: dict[str, str]) -> bytes:
    h = hashlib.sha256(f"chiplock/precision/v{SUITE_VERSION}".encode())
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
            entropy_bits=None,
            info={"probes": digests, "seconds": elapsed, "threads": torch.get_num_threads()},
        )

    def reproduce(self, helper: dict[str, Any]) -> bytes:
        if helper.get("suite") != SUITE_VERSION:
            raise FingerprintError(f"the file was locked with precision probe suite {helper.get('suite')!r}; "
                                   f"this chiplock runs suite {SUITE_VERSION}: upgrade chiplock")
        return _combine(probe_digests(helper.get("device", "cpu")))
