"""``pre-aes``: pre-transformed AES, whose wrong-key output looks like real weights.

Each tensor gets a small public *distribution model*: ``K + 1`` quantile breakpoints of its values, stored in
the tensor's own dtype (about 1 % of the tensor). Every element is mapped to a *code* in a space twice as wide
as the element (16-bit codes for 8-bit dtypes, 32-bit for 16-bit, 64-bit for 32- and 64-bit dtypes) such that a
uniformly random code decodes to a value distributed like the tensor; the codes are then encrypted with
AES-256-CTR. Decoding is total: every code decodes to some value, so a wrong key never fails, it yields
weights drawn from the model. The right key yields the original bits exactly.

Decoding a code ``c`` of ``b`` bits (the public, deterministic map; see docs/FORMAT.md):

* its top 16 bits pick a *slot* of ``S = 2**(b - 16)`` codes. Slots ``[0, M)`` belong to the ``K`` intervals
  between breakpoints, ``round(p_j * M)`` slots up to breakpoint ``j`` for a fixed probability grid ``p``;
  within interval ``k`` the code is a fraction ``t`` of the interval's codes and decodes to the value
  ``lerp(value(U_k), value(U_k+1), t)`` rounded to the dtype and clamped into the interval (for integers the
  same in integer steps);
* the top ``e = ceil(R / S)`` slots (the *escape region*, at most 1/256 of the codes) map code offset ``o`` to
  order key ``U_0 + o mod R``, which reaches every value between the outer breakpoints (or every bit pattern,
  when the tensor holds non-finite values). It guarantees every element has a code, whatever its value.

64-bit tensors whose values span more than ``2**48 * 256`` order keys (float64 almost always) cannot get an
escape region small enough; they are stored in ``raw`` mode (codes are the order keys themselves), which keeps
bit-exactness and encryption but not indistinguishability. Lock float64 weights as float32 to get it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from chiplock.errors import ContainerError
from chiplock.transforms import _pre_aes_kernel as _kernel
from chiplock.container.format import NUMPY_CODE_NAMES
from chiplock.transforms.base import (DTYPES, Encoded, Transform, aes_ctr_into, empty_raw, parallel_for,
                                      raw_view, register_transform)

SLOT_BITS = 16
SLOTS = 1 << SLOT_BITS
K_MAX = 4096
ELEMENTS_PER_BREAK = 100
SMALL_N = 100
MAX_ESCAPE_SLOTS = SLOTS // 256
_CHUNK = 1 << 18
_CODE_DTYPES = {1: np.uint16, 2: np.uint32, 4: np.uint64, 8: np.uint64}


def probability_grid(k: int) -> np.ndarray:
    """Public probability levels of the ``k + 1`` breakpoints: half uniform, half Chebyshev (denser tails)."""
    j = np.arange(k + 1, dtype=np.float64) / k
    p = 0.5 * j + 0.25 * (1.0 - np.cos(np.pi * j))
    p[0], p[-1] = 0.0, 1.0
    return p


class _Codec:
    """The public map between order keys and codes for one tensor (built identically on both sides)."""

    def __init__(self, dtype: torch.dtype, breaks: np.ndarray, nonfinite: bool) -> None:
        self.dtype = dtype
        self.udtype, self.kind = DTYPES[dtype]
        self.w = np.dtype(self.udtype).itemsize * 8
        self.cdtype = _CODE_DTYPES[self.w // 8]
        self.b = np.dtype(self.cdtype).itemsize * 8
        self.shift = np.uint64(self.b - SLOT_BITS)
        self.S = 1 << (self.b - SLOT_BITS)
        self.U = order_key(breaks.astype(self.udtype), self.kind, self.w).astype(np.uint64)
        self.K = len(self.U) - 1
        if self.K < 1 or np.any(np.diff(self.U.astype(np.float64)) < 0):
            raise ContainerError("a pre-aes distribution model is malformed; the file is damaged")
        if nonfinite:
            self.lo, self.R = 0, 1 << self.w
        else:
            self.lo, self.R = int(self.U[0]), int(self.U[-1]) - int(self.U[0]) + 1
        self.e = -(-self.R // self.S)
        self.raw = self.e > MAX_ESCAPE_SLOTS
        if self.raw:
            return
        self.M = SLOTS - self.e
        c = np.rint(probability_grid(self.K) * self.M).astype(np.int64)
        self.slot_start = c[:-1]
        self.slot_count = np.diff(c)
        self.table = np.repeat(np.arange(self.K, dtype=np.int32), self.slot_count)
        self.pos_lo = self._pos(self.U[:-1])
        self.width = self._pos(self.U[1:]) - self.pos_lo
        # The compiled decoder's layout of the same numbers (order keys fit in int64: U < 2**64 only for
        # 64-bit dtypes in model mode, whose span is < 2**56 and whose keys are stored as their bit pattern).
        ints = np.stack([self.slot_start, self.slot_start + self.slot_count, self.U[:-1].view(np.int64),
                         self.U[1:].view(np.int64)], axis=1)
        self._kernel_tables = (self.table.astype(np.int16), np.ascontiguousarray(ints),
                               np.ascontiguousarray(np.stack([self.pos_lo, self.width], axis=1)))

    # Positions are float64 coordinates that are linear in value: the value itself for floats, the offset from
    # the first breakpoint for integers (whose order key is already linear in value).
    def _pos(self, u: np.ndarray) -> np.ndarray:
        if self.kind != "float":
            return (u - self.U[0]).astype(np.float64)
        bits = from_order_key(u.astype(self.udtype), self.kind, self.w)
        t = torch.from_numpy(np.ascontiguousarray(bits)).view(_torch_int(self.w)).view(self.dtype)
        return t.double().numpy()

    def _round(self, pos: np.ndarray) -> np.ndarray:
        if self.kind != "float":
            return np.rint(pos).astype(np.uint64) + self.U[0]
        t = torch.from_numpy(pos).to(self.dtype).view(_torch_int(self.w))
        return order_key(t.numpy().view(self.udtype), self.kind, self.w).astype(np.uint64)

    def decode(self, code: np.ndarray) -> np.ndarray:
        """Order keys (uint64) for ``code``; total: every code decodes. Compiled where the dtype allows."""
        fmt = _KERNEL_FMT.get(self.dtype, _kernel.FMT_INT if self.kind != "float" else None)
        if self.raw or fmt is None:
            return self.decode_reference(code)
        out = np.empty(code.size, dtype=np.uint64)
        _kernel.decode_into(code, out, self.shift, self.M, self.S, np.uint64((self.M * self.S) % (1 << 64)),
                            np.uint64(self.lo), np.uint64(self.R % (1 << 64)), *self._kernel_tables, fmt, self.w)
        return out

    def decode_reference(self, code: np.ndarray) -> np.ndarray:
        """The numpy definition of :meth:`decode` (the compiled kernel must agree with it bit for bit)."""
        code = code.astype(np.uint64, copy=False)
        if self.raw:
            return code
        slot = (code >> self.shift).astype(np.int64)
        escape = slot >= self.M
        k = self.table[np.minimum(slot, self.M - 1)]
        offset = code - (self.slot_start[k].astype(np.uint64) << self.shift)
        t = offset.astype(np.float64) / (self.slot_count[k].astype(np.float64) * self.S)
        u = self._round(self.pos_lo[k] + t * self.width[k])
        u = np.clip(u, self.U[k], self.U[k + 1])
        if escape.any():
            esc = code[escape] - np.uint64((self.M * self.S) % (1 << 64))
            u[escape] = np.uint64(self.lo) + esc % np.uint64(self.R)
        return u

    def encode(self, u: np.ndarray) -> np.ndarray:
        """A code for each order key ``u`` (uint64) that :meth:`decode` maps back to it exactly."""
        if self.raw:
            return u.astype(self.cdtype)
        k = np.clip(np.searchsorted(self.U, u, side="right") - 1, 0, self.K - 1)
        n_codes = self.slot_count[k].astype(np.float64) * self.S
        width = self.width[k]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(width > 0, (self._pos(u) - self.pos_lo[k]) / width, 0.0)
        t = np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
        offset = np.clip(np.floor(t * n_codes), 0, np.maximum(n_codes - 4096, 0))
        code = (self.slot_start[k].astype(np.uint64) << self.shift) + offset.astype(np.uint64)
        bad = (self.slot_count[k] == 0) | (self.decode(code) != u)
        if bad.any():
            code[bad] = np.uint64((self.M * self.S) % (1 << 64)) + (u[bad] - np.uint64(self.lo))
            if np.any(self.decode(code[bad]) != u[bad]):
                raise RuntimeError("pre-aes could not encode a value exactly; please report this as a bug")
        return code.astype(self.cdtype)


_KERNEL_FMT = {torch.float32: _kernel.FMT_F32, torch.float16: _kernel.FMT_F16, torch.bfloat16: _kernel.FMT_BF16}
_KIND_CODES = {"uint": 0, "int": 1, "float": 2}


def _torch_int(w: int) -> torch.dtype:
    return {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[w]


def order_key(bits: np.ndarray, kind: str, w: int) -> np.ndarray:
    """Unsigned keys whose integer order is the value order (for floats: sign-magnitude to offset binary)."""
    ut = bits.dtype.type
    sign = ut(1 << (w - 1))
    if kind == "float":
        return np.where(bits & sign, ~bits, bits | sign).astype(ut)
    if kind == "int":
        return bits ^ sign
    return bits


def from_order_key(u: np.ndarray, kind: str, w: int) -> np.ndarray:
    """Inverse of :func:`order_key`."""
    ut = u.dtype.type
    sign = ut(1 << (w - 1))
    if kind == "float":
        return np.where(u & sign, u ^ sign, ~u).astype(ut)
    if kind == "int":
        return u ^ sign
    return u


def _small_bounds(t: torch.Tensor) -> torch.Tensor:
    """Public bounds for tensors too small for a quantile model: +-(next power of two of the largest |x|)."""
    if t.dtype == torch.bool:
        return torch.tensor([False, True])
    if t.dtype.is_floating_point:
        finite = t[torch.isfinite(t)].double()
        m = finite.abs().max().item() if finite.numel() else 1.0
        fmax = torch.finfo(t.dtype).max
        bound = min(2.0 ** math.frexp(m)[1], fmax) if 0 < m < fmax / 2 else (1.0 if m == 0 else fmax)
        return torch.tensor([-bound, bound], dtype=torch.float64).to(t.dtype)
    info = torch.iinfo(t.dtype)
    # Python ints: abs() of the dtype's minimum would wrap around in the tensor's own dtype.
    m = max(abs(int(t.min())), abs(int(t.max()))) if t.numel() else 0
    e = 1 << max(m.bit_length(), 1)
    return torch.tensor([max(-e, info.min), min(e - 1, info.max)], dtype=t.dtype)


def build_model(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The public breakpoints (in ``t``'s dtype) and the non-finite flag for tensor ``t``."""
    flat = t.reshape(-1)
    nonfinite = bool(t.dtype.is_floating_point and not torch.isfinite(flat).all())
    finite = flat[torch.isfinite(flat)] if t.dtype.is_floating_point else flat
    if flat.numel() < SMALL_N or finite.numel() < SMALL_N:
        return _small_bounds(flat), nonfinite
    udtype, kind = DTYPES[t.dtype]
    u = np.sort(order_key(raw_view(finite), kind, np.dtype(udtype).itemsize * 8))
    k = int(min(K_MAX, max(1, finite.numel() // ELEMENTS_PER_BREAK)))
    idx = np.rint(probability_grid(k) * (len(u) - 1)).astype(np.int64)
    breaks = from_order_key(u[idx], kind, np.dtype(udtype).itemsize * 8)
    return torch.from_numpy(np.ascontiguousarray(breaks)).view(_torch_int(np.dtype(udtype).itemsize * 8)).view(
        t.dtype), nonfinite


@register_transform
class PreAesTransform(Transform):
    name = "pre-aes"
    detects_wrong_key = False

    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        src = raw_view(tensor)
        breaks, nonfinite = build_model(tensor.detach().cpu())
        codec = _Codec(tensor.dtype, raw_view(breaks), nonfinite)
        codes = np.empty(src.size, dtype=codec.cdtype)

        def work(a: int, b: int) -> None:
            codes[a:b] = codec.encode(order_key(src[a:b], codec.kind, codec.w).astype(np.uint64))

        parallel_for(src.size, _CHUNK, work)
        nonce = os.urandom(16)
        out = np.empty_like(codes)
        aes_ctr_into(key, nonce, codes.view(np.uint8), out.view(np.uint8))
        params = {"breaks": raw_view(breaks).tobytes().hex(), "nonfinite": nonfinite, "nonce": nonce.hex(),
                  "mode": "raw" if codec.raw else "model"}
        return Encoded(out, params, stored_dtype=NUMPY_CODE_NAMES[np.dtype(codec.cdtype)])

    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        out, raw = empty_raw(dtype, shape)
        udtype = DTYPES[dtype][0]
        try:
            breaks = np.frombuffer(bytes.fromhex(params["breaks"]), dtype=udtype)
            codec = _Codec(dtype, breaks, bool(params["nonfinite"]))
            nonce = bytes.fromhex(params["nonce"])
        except (KeyError, ValueError, TypeError):
            raise ContainerError("a pre-aes tensor's public parameters are malformed; the file is damaged: "
                                 "obtain a fresh copy") from None
        if ("raw" if codec.raw else "model") != params.get("mode"):
            raise ContainerError("a pre-aes tensor's mode does not match its model; the file is damaged")
        itemsize = np.dtype(codec.cdtype).itemsize
        if stored.nbytes != raw.size * itemsize:
            raise ContainerError("a pre-aes tensor has the wrong number of bytes; the file is damaged")

        def work(a: int, b: int) -> None:
            codes = np.empty(b - a, dtype=codec.cdtype)
            aes_ctr_into(key, nonce, stored[a * itemsize:b * itemsize], codes.view(np.uint8), a * itemsize)
            _kernel.from_order_key_into(codec.decode(codes), raw[a:b], _KIND_CODES[codec.kind], codec.w)

        parallel_for(raw.size, _CHUNK, work)
        return out
