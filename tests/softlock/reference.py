"""An independent reference for minifloat rounding, written with integer arithmetic on the fp32 bit pattern.

It shares no code with chiplock.softlock.minifloat: it decodes x = S * 2**k exactly as integers, shifts S right
with an explicit round-half-to-even on the remainder, and compares against the largest finite value in float64.
"""

from __future__ import annotations

import numpy as np


def decode_all(e: int, m: int, bias: int, fn: bool) -> np.ndarray:
    """Every code of the format decoded from its bit fields (float64; NaN for NaN codes, +-inf for infinities)."""
    codes = np.arange(1 << (1 + e + m), dtype=np.int64)
    sign = np.where((codes >> (e + m)) & 1, -1.0, 1.0)
    ef = (codes >> m) & ((1 << e) - 1)
    mf = codes & ((1 << m) - 1)
    top = (1 << e) - 1
    val = np.where(ef == 0, mf * 2.0 ** (1 - bias - m), (mf + (1 << m)) * np.exp2(ef.astype(np.float64) - bias - m))
    if fn:
        val = np.where((ef == top) & (mf == (1 << m) - 1), np.nan, val)
    else:
        val = np.where(ef == top, np.where(mf == 0, np.inf, np.nan), val)
    return sign * val


def max_finite(e: int, m: int, bias: int, fn: bool) -> float:
    v = decode_all(e, m, bias, fn)
    return float(np.nanmax(np.where(np.isfinite(v), v, np.nan)))


def ref_round(x: np.ndarray, e: int, m: int, bias: int, fn: bool, saturate: bool) -> np.ndarray:
    """Round fp32 values to the format with integer operations; returns float32."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.int64)
    neg = (bits >> 31) & 1
    ef = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    S = np.where(ef == 0, frac, frac | 0x800000)
    k = np.where(ef == 0, -149, ef - 150)
    # floor(log2(x)) from the integer significand's bit length.
    blen = np.zeros_like(S)
    tmp = S.copy()
    for _ in range(25):
        nz = tmp > 0
        blen += nz
        tmp >>= 1
    emin = 1 - bias
    t = np.maximum(k + blen - 1, emin)
    qe = t - m
    shift = qe - k
    up_shift = np.clip(-shift, 0, 62)
    dn_shift = np.clip(shift, 0, 62)
    R = np.where(shift <= 0, S << up_shift, S >> dn_shift)
    rem = S & ((np.int64(1) << dn_shift) - 1)
    half = np.where(dn_shift > 0, np.int64(1) << np.maximum(dn_shift - 1, 0), 0)
    round_up = (shift > 0) & ((rem > half) | ((rem == half) & (half > 0) & ((R & 1) == 1)))
    R = R + round_up
    val = R.astype(np.float64) * np.exp2(qe.astype(np.float64))
    mx = max_finite(e, m, bias, fn)
    over = val > mx
    if saturate:
        val = np.where(over, mx, val)
    else:
        val = np.where(over, np.nan if fn else np.inf, val)
    special = ef == 0xFF
    is_nan = special & (frac != 0)
    if saturate:
        val = np.where(special & (frac == 0), mx, val)
    else:
        val = np.where(special & (frac == 0), np.nan if fn else np.inf, val)
    val = np.where(is_nan, np.nan, val)
    out = np.where(neg == 1, -val, val).astype(np.float32)
    return out


def probe_inputs(e: int, m: int, bias: int, fn: bool) -> np.ndarray:
    """Every finite code, every midpoint between neighbours (the ties), values one fp32 ulp either side of each
    midpoint and each code, the overflow boundary, infinities, NaN, zeros and fp32 subnormals, both signs."""
    vals = decode_all(e, m, bias, fn)
    pos = np.unique(vals[np.isfinite(vals) & (vals >= 0)])
    mx = pos[-1]
    # The value one step above max (the first value that would exist with an unbounded exponent/mantissa).
    step = pos[-1] - pos[-2]
    if fn:
        beyond = mx + step
    else:
        beyond = mx + step  # in the top binade both variants' next grid point is max + step
    ext = np.concatenate([pos, [beyond, beyond + step, 2 * beyond]])
    mids = (ext[:-1] + ext[1:]) / 2
    base = np.concatenate([pos, mids, [beyond, 4 * beyond, 1e30, 3.4e38]])
    base = base[base <= np.finfo(np.float32).max].astype(np.float32)
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(0))
    tiny = np.array([1e-45, 1e-40, 1.17e-38, 2.0 ** -126, 2.0 ** -140], dtype=np.float32)
    allv = np.concatenate([base, up, down, tiny, [np.inf, np.nan]]).astype(np.float32)
    allv = allv[~np.isnan(allv) | (np.arange(len(allv)) == len(allv) - 1)]
    return np.concatenate([allv, -allv]).astype(np.float32)
