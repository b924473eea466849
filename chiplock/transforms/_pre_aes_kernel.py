"""Compiled (numba) decoder of pre-aes codes: the same arithmetic as the numpy reference, fused per element.

Every operation here is IEEE: float64 -> float32 casts round to nearest even, no fast-math, so LLVM neither
fuses multiply-add nor reorders, and the result is the same on every machine. The numpy reference in
``pre_aes._Codec.decode_reference`` is kept for tests, which check both agree bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Output formats the kernel rounds to.
FMT_INT, FMT_F32, FMT_F16, FMT_BF16 = 0, 1, 2, 3


@njit(cache=True, nogil=True)
def _f32_to_f16_bits(x: np.uint32) -> np.uint64:
    sign = np.uint64((x >> np.uint32(16)) & np.uint32(0x8000))
    exp = np.int64((x >> np.uint32(23)) & np.uint32(0xFF))
    man = np.int64(x & np.uint32(0x7FFFFF))
    if exp == 0xFF:
        return sign | np.uint64(0x7C00) | (np.uint64(0x200) if man else np.uint64(0))
    e = exp - 127 + 15
    if e >= 31:
        return sign | np.uint64(0x7C00)
    if e <= 0:
        if e < -10:
            return sign
        man = man | 0x800000
        shift = 14 - e
        half = man >> shift
        rem = man & ((1 << shift) - 1)
        mid = 1 << (shift - 1)
        if rem > mid or (rem == mid and (half & 1)):
            half += 1
        return sign | np.uint64(half)
    half = (e << 10) | (man >> 13)
    rem = man & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (half & 1)):
        half += 1
    return sign | np.uint64(half)


@njit(cache=True, nogil=True)
def decode_into(code, out_u, shift, m_slots, s_codes, escape_base, lo, r, table, ints, floats, fmt, w):
    """Order keys of ``code`` into ``out_u`` (uint64). Mirrors ``_Codec.decode_reference`` exactly.

    ``table[slot]`` is the interval holding a slot (int16: 128 KiB); ``ints[k] = (slot_start, slot_end, U_k, U_k+1)`` and
    ``floats[k] = (pos_lo, width)`` keep each interval's numbers in one or two cache lines, because random
    codes hit random intervals: memory latency and branch mispredictions, not arithmetic, bound this loop.
    """
    sign = np.uint64(1) << np.uint64(w - 1)
    low_bits = sign - np.uint64(1)
    scratch = np.empty(1, np.float32)
    scratch_bits = scratch.view(np.uint32)
    sf = np.float64(s_codes)
    for i in range(code.size):
        c = np.uint64(code[i])
        slot = np.int64(c >> shift)
        if slot >= m_slots:
            out_u[i] = lo + (c - escape_base) % r
            continue
        k = np.int64(table[slot])
        start = ints[k, 0]
        offset = c - (np.uint64(start) << shift)
        # uint64 -> float64 in two exact halves and one rounding (= the correctly rounded conversion); LLVM's
        # direct unsigned conversion branches on the top bit, which random codes mispredict half the time.
        off64 = (np.float64(np.int64(offset >> np.uint64(32))) * 4294967296.0
                 + np.float64(np.int64(offset & np.uint64(0xFFFFFFFF))))
        t = off64 / (np.float64(ints[k, 1] - start) * sf)
        pos = floats[k, 0] + t * floats[k, 1]
        if fmt == FMT_INT:
            u = np.uint64(np.int64(np.rint(pos))) + np.uint64(ints[0, 2])
        else:
            scratch[0] = np.float32(pos)
            b32 = scratch_bits[0]
            if fmt == FMT_F32:
                bits = np.uint64(b32)
            elif fmt == FMT_F16:
                bits = _f32_to_f16_bits(b32)
            else:
                bits = np.uint64((b32 + np.uint32(0x7FFF) + ((b32 >> np.uint32(16)) & np.uint32(1)))
                                 >> np.uint32(16))
            # Branch-free order key (random signs would mispredict): negative -> flip all w bits, else the sign.
            negative = bits >> np.uint64(w - 1)
            u = bits ^ (sign | ((np.uint64(0) - negative) & low_bits))
        out_u[i] = min(max(u, np.uint64(ints[k, 2])), np.uint64(ints[k, 3]))


@njit(cache=True, nogil=True)
def from_order_key_into(u, out_bits, kind, w):
    """Bits of the values whose order keys are ``u``: kind 2 float (offset binary -> sign-magnitude),
    1 signed int (flip the sign bit), 0 unsigned (as is)."""
    sign = np.uint64(1) << np.uint64(w - 1)
    mask = (sign << np.uint64(1)) - np.uint64(1)
    for i in range(u.size):
        x = u[i]
        if kind == 2:
            out_bits[i] = (x ^ sign) if (x & sign) else (~x & mask)
        elif kind == 1:
            out_bits[i] = x ^ sign
        else:
            out_bits[i] = x
