"""Fixtures for the attack tests: trained weights in four dtypes, their pre-aes locks, and a deliberately weak
encoder (v1-style canonical codes, exact-quantile breakpoints) that the same attack code must break."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chiplock.attacks import quantize_int8

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def trained_weights(request) -> dict[str, torch.Tensor]:
    """The weight tensors (dim >= 2) of the pretrained DigitCNN, in layer order; a SmallCNN trained on the 8x8
    digits when the `digit-recognizer-py` package is missing."""
    from chiplock_demo.models.digit_cnn import load_pretrained

    model = load_pretrained() or request.getfixturevalue("trained_model")
    return {n: p.detach().clone() for n, p in model.state_dict().items() if p.dim() >= 2}


@pytest.fixture(scope="session")
def attacked_name(trained_weights) -> str:
    """The tensor the oracle tests attack: the largest one of at most 100k elements (DigitCNN: conv_layers.6)."""
    fits = [n for n, w in trained_weights.items() if w.numel() <= 100_000]
    return max(fits, key=lambda n: trained_weights[n].numel())


def as_dtype(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype``; int8 by per-tensor symmetric quantisation."""
    return quantize_int8(w) if dtype == torch.int8 else w.to(dtype)


def _keystream_xor(key: bytes, nonce: bytes, data: bytes, offset: int = 0) -> bytes:
    counter = (int.from_bytes(nonce, "big") + offset // 16) % (1 << 128)
    enc = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    return enc.update(data) + enc.finalize()


@dataclass
class WeakTensor:
    """A test-local, deliberately weak pre-aes-like lock: the v1 design flaws on purpose.

    Exact empirical quantiles as breakpoints on a uniform probability grid (public weight values, a model that
    fits the tensor far better than its own samples), 32-bit codes, and one canonical code per value
    (``floor(t · n_codes)`` inside its interval), encrypted with AES-256-CTR. It implements
    :class:`chiplock.attacks.LockedTensor`.
    """

    stored: bytes
    nonce: bytes
    breaks: np.ndarray
    starts: np.ndarray
    dtype: torch.dtype
    shape: tuple[int, ...]

    N_CODES = 1 << 32

    @classmethod
    def lock(cls, tensor: torch.Tensor, key: bytes) -> "WeakTensor":
        v = np.sort(tensor.detach().double().reshape(-1).numpy())
        # A breakpoint every 20 values (v1 had one every 100): the model hugs the tensor even when it is small.
        k = max(1, v.size // 20)
        grid = np.arange(k + 1) / k
        breaks = v[np.rint(grid * (v.size - 1)).astype(np.int64)]
        starts = np.rint(grid * cls.N_CODES).astype(np.uint64)
        self = cls(b"", os.urandom(16), breaks, starts, tensor.dtype, tuple(tensor.shape))
        codes = self.canonical_codes(tensor.detach().double().reshape(-1).numpy()).astype(np.uint32)
        self.stored = _keystream_xor(key, self.nonce, codes.tobytes())
        return self

    def _round(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == torch.int8:
            return np.clip(np.rint(x), -128, 127)
        return torch.from_numpy(x).to(self.dtype).double().numpy()

    def codes(self, key: bytes, start: int, count: int) -> np.ndarray:
        raw = _keystream_xor(key, self.nonce, self.stored[4 * start:4 * (start + count)], 4 * start)
        return np.frombuffer(raw, dtype=np.uint32).astype(np.uint64)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        b, s = self.breaks, self.starts
        k = np.clip(np.searchsorted(s, codes, side="right") - 1, 0, b.size - 2)
        t = (codes - s[k]).astype(np.float64) / (s[k + 1] - s[k]).astype(np.float64)
        return np.clip(self._round(b[k] + t * (b[k + 1] - b[k])), b[k], b[k + 1])

    def canonical_codes(self, values: np.ndarray) -> np.ndarray:
        b, s = self.breaks, self.starts
        k = np.clip(np.searchsorted(b, values, side="right") - 1, 0, b.size - 2)
        width = b[k + 1] - b[k]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(width > 0, (values - b[k]) / width, 0.0)
        n = (s[k + 1] - s[k]).astype(np.float64)
        return s[k] + np.minimum(np.floor(t * n), n - 1).astype(np.uint64)

    def decode(self, key: bytes) -> torch.Tensor:
        values = self.decode_codes(self.codes(key, 0, len(self.stored) // 4))
        return torch.from_numpy(values).to(self.dtype).reshape(self.shape)

    def breakpoints(self) -> np.ndarray:
        return self.breaks

    def breakpoint_values(self) -> np.ndarray:
        return np.unique(self.breaks)

    def grid(self) -> np.ndarray:
        return np.arange(self.breaks.size) / (self.breaks.size - 1)


@pytest.fixture(scope="session")
def weak_lock():
    """``weak_lock(tensor, key)``: :meth:`WeakTensor.lock`."""
    return WeakTensor.lock


def _weak_code_ranks(self: WeakTensor, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Decoding is monotone in the code, so a value's codes form one range: find its ends by binary search.
    values = self.decode_codes(codes)

    def first_code(pred) -> np.ndarray:  # smallest code c with pred(decode(c)), vectorised over values
        lo = np.zeros(values.size, np.uint64)
        hi = np.full(values.size, WeakTensor.N_CODES, np.uint64)
        while np.any(lo < hi):
            mid = lo + (hi - lo) // np.uint64(2)
            ok = pred(self.decode_codes(np.minimum(mid, np.uint64(WeakTensor.N_CODES - 1))), values)
            ok &= mid < WeakTensor.N_CODES
            hi = np.where(ok & (lo < hi), mid, hi)
            lo = np.where(~ok & (lo < hi), mid + np.uint64(1), lo)
        return lo

    start = first_code(lambda d, v: d >= v)
    end = first_code(lambda d, v: d > v)
    return (codes - start).astype(np.float64), (end - start).astype(np.float64)


WeakTensor.code_ranks = _weak_code_ranks
