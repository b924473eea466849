"""CUDA clock probes: cycle counts read with ``clock64()`` inside a small kernel.

The kernel runs one warp and times a fixed series of dependent operations (FMA, transcendental, integer,
division, square root, shared-memory round trips, a global-memory pointer chase, a block barrier) with the
SM's cycle counter. Cycle counts do not depend on the clock frequency, only on the GPU's microarchitecture
and the compiled code, so they feed the same profile/quantise/BCH pipeline as the CPU timings
(:class:`chiplock.fingerprint.clock.ClockSource` with ``device="cuda"``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs ``nvcc``).
Not run on a GPU yet: the machines this was written on had none (see ``docs/fingerprints.md``).
"""

from __future__ import annotations

import functools

import numpy as np

from chiplock.errors import FingerprintError

OPS = ("fma", "sinf", "fast_sin", "imul", "fdiv", "sqrt", "shared", "global_chase", "syncthreads", "exp")

_CUDA_SRC = r"""
#include <torch/extension.h>

__global__ void chiplock_clock_probe(long long* out, float* scratch, int* chain, int iters) {
  __shared__ float sh[64];
  int tid = threadIdx.x;
  float a = scratch[tid], b = a;
  int k = tid + 1;
  long long t0, t1;
  sh[tid] = a; sh[tid + 32] = b;
  __syncthreads();
#define TIME(slot, body) t0 = clock64(); body; t1 = clock64(); if (tid == 0) out[slot] = t1 - t0;
  TIME(0, for (int i = 0; i < iters; ++i) a = fmaf(a, 1.0001f, 0.5f))
  TIME(1, for (int i = 0; i < iters; ++i) a = sinf(a) + 1.0f)
  TIME(2, for (int i = 0; i < iters; ++i) a = __sinf(a) + 1.0f)
  TIME(3, for (int i = 0; i < iters; ++i) k = k * 1664525 + 1013904223)
  TIME(4, for (int i = 0; i < iters; ++i) a = 1.0f / (a + 1.5f))
  TIME(5, for (int i = 0; i < iters; ++i) a = sqrtf(a + 2.0f))
  TIME(6, for (int i = 0; i < iters; ++i) { sh[(tid + i) & 63] += a; a = sh[(tid + 3 * i) & 63]; })
  TIME(7, for (int i = 0; i < iters; ++i) k = chain[(k & 0x7fffffff) % 65536])
  TIME(8, for (int i = 0; i < iters; ++i) __syncthreads())
  TIME(9, for (int i = 0; i < iters; ++i) a = expf(-a) + 0.25f)
#undef TIME
  scratch[tid] = a + (float)k;
}

torch::Tensor probe(torch::Tensor scratch, torch::Tensor chain, int64_t iters) {
  auto out = torch::zeros({10}, torch::dtype(torch::kInt64).device(scratch.device()));
  chiplock_clock_probe<<<1, 32>>>(out.data_ptr<long long>(), scratch.data_ptr<float>(), chain.data_ptr<int>(),
                                  (int)iters);
  return out;
}
"""

_CPP_SRC = "torch::Tensor probe(torch::Tensor scratch, torch::Tensor chain, int64_t iters);"


@functools.lru_cache(maxsize=1)
def _extension():
    import torch
    from torch.utils.cpp_extension import load_inline

    if not torch.cuda.is_available():
        raise FingerprintError("the CUDA clock needs a CUDA GPU and none is usable here; use device='cpu' or run "
                               "on the GPU machine")
    try:
        return load_inline(name="chiplock_cuda_clock", cpp_sources=_CPP_SRC, cuda_sources=_CUDA_SRC,
                           functions=["probe"], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - compiler failures come in many types; the fix is the same.
        raise FingerprintError(f"could not compile the CUDA clock probe ({type(exc).__name__}); install the CUDA "
                               "toolkit (nvcc) matching torch.version.cuda, or use device='cpu'") from None


def cuda_timings(rounds: int = 100, warmup: int = 5, iters: int = 256) -> tuple[list[str], np.ndarray]:
    """Cycle counts of each operation, ``rounds x ops`` (int64 cycles as float64).

    Raises:
        FingerprintError: No GPU, or the probe cannot be compiled.
    """
    import torch

    ext = _extension()
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    scratch = torch.from_numpy(rng.random(32).astype(np.float32)).to(dev)
    chain = torch.from_numpy(rng.permutation(65536).astype(np.int32)).to(dev)
    rows = []
    for r in range(-warmup, rounds):
        cycles = ext.probe(scratch, chain, iters)
        if r >= 0:
            rows.append(cycles)
    out = torch.stack(rows).cpu().numpy().astype(np.float64)
    return list(OPS), out
