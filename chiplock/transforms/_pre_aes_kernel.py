"""Compiled (numba) pieces of pre-aes v2: the decoder and the encoder's preimage search, per element.

Every operation here is IEEE: float64 -> float32 casts round to nearest even, no fast-math, so LLVM neither
fuses multiply-add nor reorders, and the result is the same on every machine. The numpy definition in
``pre_aes._Codec.decode_reference`` is kept for tests, which check both agree bit for bit.

A codec's tables (built in ``pre_aes._Codec``):

* ``table[slot]``: the interval owning a 16-bit slot (int16, 128 KiB);
* one 64-byte record per interval, one cache line: ``ints[k, 0:3] = (cs_k, U_k, U_k+1)``, interval ``k``'s first
  code and its bounding order keys, and ``floats[k, 3:5] = (base_k, scale_k)``, the position of breakpoint
  ``k`` and the position step per lattice point (``ints`` and ``floats`` are int64 and float64 views of the
  same memory).

Random codes hit random intervals, so memory latency, not arithmetic, bounds the decoder: one table load and
one cache line per element, no division (``scale_k`` is precomputed and part of the definition).

The encoder's preimage search (:func:`preimage_keys_into`) finds each key's intervals through an index over the
keys' top 16 bits, seeds a galloping search over the decoder from the closed-form inverse of the interval's
line, and for float32 compares rounded values instead of keys (about 45 ns per element on one core, from about
330 ns). Helpers are plain compiled functions, not ``inline="always"``: inlining every format's rounding into
every probe made the first compile take about 17 s; LLVM still inlines what pays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Output formats the kernel rounds to (a position is rounded float64 -> float32 -> format, each to nearest even).
FMT_INT, FMT_F32, FMT_F16, FMT_BF16, FMT_F8E4M3, FMT_F8E5M2 = 0, 1, 2, 3, 4, 5


@njit(cache=True, nogil=True, inline="always")
def _f32_to_mini_bits(x: np.uint32, mant: np.int64, bias: np.int64, w: np.int64) -> np.uint64:
    """Round-to-nearest-even float32 -> a narrow float with ``mant`` mantissa bits (finite inputs in range)."""
    sign = np.uint64(x >> np.uint32(31)) << np.uint64(w - 1)
    exp = np.int64((x >> np.uint32(23)) & np.uint32(0xFF))
    man = np.int64(x & np.uint32(0x7FFFFF))
    if exp == 0:  # float32 subnormals are far below every narrow format's smallest subnormal: +-0.
        return sign
    e = exp - 127 + bias
    drop = 23 - mant
    if e <= 0:
        if e < -mant:
            return sign
        man = man | 0x800000
        shift = drop + 1 - e
        half = man >> shift
        rem = man & ((1 << shift) - 1)
        mid = 1 << (shift - 1)
        if rem > mid or (rem == mid and (half & 1)):
            half += 1
        return sign | np.uint64(half)
    half = (e << mant) | (man >> drop)
    rem = man & ((1 << drop) - 1)
    mid = 1 << (drop - 1)
    if rem > mid or (rem == mid and (half & 1)):
        half += 1
    return sign | np.uint64(half)


@njit(cache=True, nogil=True)
def _decode_one(c, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch, scratch_bits):
    """Order key of code ``c`` (uint64): the public decode definition, one element."""
    if c >= mc:
        return esc_lo + (c - mc)
    k = np.int64(table[np.int64(c >> shift)])
    f = np.int64((c - np.uint64(ints[k, 0])) >> q)
    pos = floats[k, 3] + np.float64(f) * floats[k, 4]
    if fmt == FMT_INT:
        u = np.uint64(np.int64(np.rint(pos))) + u0
    else:
        scratch[0] = np.float32(pos)
        b32 = scratch_bits[0]
        if fmt == FMT_F32:
            bits = np.uint64(b32)
        elif fmt == FMT_BF16:
            bits = np.uint64((b32 + np.uint32(0x7FFF) + ((b32 >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        elif fmt == FMT_F16:
            bits = _f32_to_mini_bits(b32, 10, 15, w)
        elif fmt == FMT_F8E4M3:
            bits = _f32_to_mini_bits(b32, 3, 7, w)
        else:
            bits = _f32_to_mini_bits(b32, 2, 15, w)
        # Branch-free order key (random signs would mispredict): negative -> flip all w bits, else the sign.
        sign = np.uint64(1) << np.uint64(w - 1)
        negative = bits >> np.uint64(w - 1)
        u = bits ^ (sign | ((np.uint64(0) - negative) & (sign - np.uint64(1))))
    return min(max(u, np.uint64(ints[k, 1])), np.uint64(ints[k, 2]))


@njit(cache=True, nogil=True)
def decode_bits_into(code, out_bits, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, kind):
    """Element bits of ``code`` straight into the output tensor's memory: :func:`_decode_one` and the inverse
    order key, written out flat in one loop (calling ``_decode_one`` here measured 4x slower)."""
    # float32 bits go through a small ring of scratch slots, so consecutive elements do not reuse one address.
    scratch = np.empty(16, np.float32)
    scratch_bits = scratch.view(np.uint32)
    sign = np.uint64(1) << np.uint64(w - 1)
    low = sign - np.uint64(1)
    mask = sign | low
    for i in range(code.size):
        c = np.uint64(code[i])
        if c >= mc:
            u = esc_lo + (c - mc)
        else:
            k = np.int64(table[np.int64(c >> shift)])
            f = np.int64((c - np.uint64(ints[k, 0])) >> q)
            pos = floats[k, 3] + np.float64(f) * floats[k, 4]
            if fmt == FMT_INT:
                u = np.uint64(np.int64(np.rint(pos))) + u0
            else:
                j = i & 15
                scratch[j] = np.float32(pos)
                b32 = scratch_bits[j]
                if fmt == FMT_F32:
                    bits = np.uint64(b32)
                elif fmt == FMT_BF16:
                    bits = np.uint64((b32 + np.uint32(0x7FFF) + ((b32 >> np.uint32(16)) & np.uint32(1)))
                                     >> np.uint32(16))
                elif fmt == FMT_F16:
                    bits = _f32_to_mini_bits(b32, 10, 15, w)
                elif fmt == FMT_F8E4M3:
                    bits = _f32_to_mini_bits(b32, 3, 7, w)
                else:
                    bits = _f32_to_mini_bits(b32, 2, 15, w)
                negative = bits >> np.uint64(w - 1)
                u = bits ^ (sign | ((np.uint64(0) - negative) & low))
            u = min(max(u, np.uint64(ints[k, 1])), np.uint64(ints[k, 2]))
        if kind == 2:
            # Keys below the sign bit are negative values (flip every bit), the others non-negative (flip the sign).
            neg = np.uint64(1) - (u >> np.uint64(w - 1))
            out_bits[i] = (u ^ (sign | ((np.uint64(0) - neg) & mask))) & mask
        elif kind == 1:
            out_bits[i] = u ^ sign
        else:
            out_bits[i] = u


@njit(cache=True, nogil=True)
def decode_keys_into(code, out_u, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0):
    """Order keys of ``code`` into ``out_u`` (uint64). Mirrors ``_Codec.decode_reference`` exactly."""
    decode_bits_into(code, out_u, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, 0)


@njit(cache=True, nogil=True)
def from_order_key_into(u, out_bits, kind, w):
    """Bits of the values whose order keys are ``u`` (raw mode): kind 2 float, 1 signed int, 0 unsigned."""
    sign = np.uint64(1) << np.uint64(w - 1)
    mask = (sign << np.uint64(1)) - np.uint64(1)
    for i in range(u.size):
        x = np.uint64(u[i])
        if kind == 2:
            out_bits[i] = (x ^ sign) if (x & sign) else (~x & mask)
        elif kind == 1:
            out_bits[i] = x ^ sign
        else:
            out_bits[i] = x


@njit(cache=True, nogil=True, inline="always")
def _hit(g, u, vu, strict, k, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch, scratch_bits):
    """Whether lattice point ``g`` of interval ``k`` decodes to >= ``u`` (> when strict). Given ``vu``, the
    non-zero float32 value of key ``u``, compares the value the decoder rounds to with ``vu`` before the clamp
    instead: for non-zero ``vu`` value order is key order, whatever the sign of zero. ``vu`` is None or a
    float32, so each caller's branch is chosen at compile time."""
    if vu is None:
        d = _decode_one(np.uint64(ints[k, 0]) + (np.uint64(g) << q), mc, esc_lo, shift, q, table, ints, floats,
                        fmt, w, u0, scratch, scratch_bits)
        return d > u if strict else d >= u
    y = np.float32(floats[k, 3] + np.float64(g) * floats[k, 4])
    return y > vu if strict else y >= vu


@njit(cache=True, nogil=True)
def _first(u, vu, strict, k, est, nf, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch, scratch_bits):
    """First lattice point ``f`` in ``[0, nf[k]]`` of interval ``k`` whose decode is >= ``u`` (> when strict);
    ``nf[k]`` (past the end) when none. Gallops out from the estimate ``est``, then bisects: decode is
    monotone in ``f``, so the answer is exact whatever the estimate. ``vu`` (float32 only: the non-zero value of
    ``u``, which is not ``U_k`` (non-strict) or ``U_k+1`` (strict), so the clamp changes no comparison) compares
    values without building keys (see :func:`_hit`); pass None otherwise."""
    n = nf[k]
    f = min(max(est, 0), n - 1)
    step = 1
    if _hit(f, u, vu, strict, k, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch, scratch_bits):
        hi = f
        lo = -1
        while True:
            probe = hi - step
            if probe < 0:
                break
            if not _hit(probe, u, vu, strict, k, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch,
                        scratch_bits):
                lo = probe
                break
            hi = probe
            step *= 2
    else:
        lo = f
        hi = n
        while True:
            probe = lo + step
            if probe >= n:
                break
            if _hit(probe, u, vu, strict, k, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch,
                    scratch_bits):
                hi = probe
                break
            lo = probe
            step *= 2
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if _hit(mid, u, vu, strict, k, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0, scratch,
                scratch_bits):
            hi = mid
        else:
            lo = mid
    return hi


@njit(cache=True, nogil=True, inline="always")
def _estimate(x, floats, k):
    sc = floats[k, 4]
    e = (x - floats[k, 3]) / sc if sc > 0 else 0.0
    if e != e:
        return np.int64(0)
    return np.int64(min(max(e, -1.0), 9.0e15))


@njit(cache=True, nogil=True)
def decode_f32_into(code, out_bits, out_f32, mc, esc_lo, shift, q, table, ints, floats):
    """float32 fast path of :func:`decode_bits_into` (same results): the clamp into ``[U_k, U_k+1]`` is done
    on values, which orders every pair of non-zero floats as their keys do; a rounded value of +-0 (whose key
    order the value order cannot see) takes the key path. ``floats[k, 5:7]`` hold the bounds' values and
    ``ints[k, 7]`` their bits (low 32: ``U_k``, high 32: ``U_k+1``)."""
    sign = np.uint64(1) << np.uint64(31)
    low = sign - np.uint64(1)
    mask = sign | low
    for i in range(code.size):
        c = np.uint64(code[i])
        if c < mc:
            k = np.int64(table[np.int64(c >> shift)])
            f = np.int64((c - np.uint64(ints[k, 0])) >> q)
            x = np.float32(floats[k, 3] + np.float64(f) * floats[k, 4])
            if x != 0:
                if x < floats[k, 5]:
                    out_bits[i] = np.uint32(np.uint64(ints[k, 7]) & np.uint64(0xFFFFFFFF))
                elif x > floats[k, 6]:
                    out_bits[i] = np.uint32(np.uint64(ints[k, 7]) >> np.uint64(32))
                else:
                    out_f32[i] = x
                continue
            out_f32[i] = x
            bits = np.uint64(out_bits[i])
            negative = bits >> np.uint64(31)
            u = bits ^ (sign | ((np.uint64(0) - negative) & low))
            u = min(max(u, np.uint64(ints[k, 1])), np.uint64(ints[k, 2]))
        else:
            u = esc_lo + (c - mc)
        neg = np.uint64(1) - (u >> np.uint64(31))
        out_bits[i] = np.uint32((u ^ (sign | ((np.uint64(0) - neg) & mask))) & mask)


@njit(cache=True, nogil=True, inline="always")
def _count_below(arr, x, strict):
    """Number of entries of the sorted ``arr`` that are < ``x`` (<= ``x`` when not strict): searchsorted."""
    lo = 0
    hi = arr.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if arr[mid] < x or (not strict and arr[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def preimage_keys_into(u, x_lo, x_hi, lo_out, cnt_out, top_nz, bot_nz, nz, jump, jb, nf, ce, mc, esc_lo, shift, q,
                       table, ints, floats, fmt, w, u0):
    """For each order key ``u[i]``: the main-region codes decoding to it, ``[lo_out[i], lo_out[i] + cnt_out[i])``.

    The main-region decode is monotone in the code, so the preimage is one contiguous range: from the first
    lattice point decoding to >= u in ``ka``, the first non-empty interval whose top key is >= u, to the first
    decoding to > u in ``kb``, the last non-empty one whose bottom key is <= u (empty when there is none).
    ``top_nz``/``bot_nz`` are the top/bottom keys of the non-empty intervals ``nz`` (both sorted), ``jump[p]``
    the number of ``bot_nz`` below ``p << jb`` (65,537 entries), which narrows each look-up to the few
    intervals sharing the key's top bits. For float32 and integer formats the search seeds are computed here
    too and ``x_lo``/``x_hi`` may be empty; other formats pass them in (they only seed the search, which is
    exact whatever they are)."""
    scratch = np.empty(1, np.float32)
    scratch_bits = scratch.view(np.uint32)
    m = nz.size
    own_seeds = x_lo.size < u.size
    v = np.empty(3, np.float64)
    for i in range(u.size):
        ui = np.uint64(u[i])
        p = min(np.int64(ui >> jb), 65535)  # keys past the dtype (callers' bad input) stay inside the table
        a = np.int64(jump[p])
        b = np.int64(jump[p + 1])
        while a < b:  # ib + 1 = the number of bottoms <= ui, which lies in [jump[p], jump[p + 1]]
            mid = (a + b) >> 1
            if bot_nz[mid] <= ui:
                a = mid + 1
            else:
                b = mid
        ib = a - 1
        # ia = the number of tops < ui, at most ib + 1 (a later top is >= its bottom > ui): step down from there,
        # and bisect where a repeated key (an atom) spans many intervals.
        ia = ib + 1
        steps = 0
        while ia > 0 and top_nz[ia - 1] >= ui and steps < 4:
            ia -= 1
            steps += 1
        if ia > 0 and top_nz[ia - 1] >= ui:
            ia = _count_below(top_nz[:ia], ui, True)
        if ia >= m or ib < 0:
            lo_out[i] = 0
            cnt_out[i] = 0
            continue
        ka = np.int64(nz[ia])
        kb = np.int64(nz[ib])
        if kb < ka:
            lo_out[i] = 0
            cnt_out[i] = 0
            continue
        if own_seeds:
            if fmt == FMT_F32:
                # The value of key ui and the midpoints to its neighbours' values (inf/nan only weaken the seed).
                sign = np.uint64(1) << np.uint64(31)
                for j in range(3):
                    uj = ui + np.uint64(j) - np.uint64(1)
                    if (j == 0 and ui == 0) or (j == 2 and ui == np.uint64(0xFFFFFFFF)):
                        uj = ui
                    bits = (uj ^ sign) if (uj & sign) else (~uj & np.uint64(0xFFFFFFFF))
                    scratch_bits[0] = np.uint32(bits)
                    v[j] = np.float64(scratch[0])
                xl = 0.5 * (v[0] + v[1])
                xh = 0.5 * (v[1] + v[2])
            else:
                x = np.float64(ui - u0) if ui >= u0 else -np.float64(u0 - ui)
                xl = x - 0.5
                xh = x + 0.5
        else:
            xl = x_lo[i]
            xh = x_hi[i]
        ea = _estimate(xl, floats, ka)
        eb = _estimate(xh, floats, kb)
        if fmt == FMT_F32 and own_seeds and v[1] != 0:
            # The clamp into [U_k, U_k+1] decides only where u is a bound (every point decodes to >= U_k, none
            # to > U_k+1); elsewhere the rounded values are compared with u's value (see _hit).
            vu = np.float32(v[1])
            fa = 0 if np.uint64(ints[ka, 1]) == ui else _first(ui, vu, False, ka, ea, nf, mc, esc_lo, shift, q,
                                                               table, ints, floats, fmt, w, u0, scratch, scratch_bits)
            fb = nf[kb] if np.uint64(ints[kb, 2]) <= ui else _first(ui, vu, True, kb, eb, nf, mc, esc_lo, shift, q,
                                                                    table, ints, floats, fmt, w, u0, scratch,
                                                                    scratch_bits)
        else:
            fa = _first(ui, None, False, ka, ea, nf, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0,
                        scratch, scratch_bits)
            fb = _first(ui, None, True, kb, eb, nf, mc, esc_lo, shift, q, table, ints, floats, fmt, w, u0,
                        scratch, scratch_bits)
        lo = min(np.uint64(ints[ka, 0]) + (np.uint64(fa) << q), np.uint64(ce[ka]))
        hi = min(np.uint64(ints[kb, 0]) + (np.uint64(fb) << q), np.uint64(ce[kb]))
        lo_out[i] = lo
        cnt_out[i] = hi - lo if hi > lo else np.uint64(0)


@njit(cache=True, nogil=True)
def bucket_counts(x, shift, counts):
    """``counts[b + 1] += 1`` for each bucket ``b = x[i] >> shift`` (a histogram, offset by one)."""
    for i in range(x.size):
        counts[(x[i] >> shift) + 1] += 1


@njit(cache=True, nogil=True)
def gather_buckets(x, shift, fill, buf):
    """Copy each ``x[i]`` whose bucket ``b = x[i] >> shift`` has ``fill[b] >= 0`` to ``buf[fill[b]]``, then
    advance ``fill[b]``: the elements of the chosen buckets, grouped by bucket in ``buf``."""
    for i in range(x.size):
        b = x[i] >> shift
        if fill[b] >= 0:
            buf[fill[b]] = x[i]
            fill[b] += 1


@njit(cache=True, nogil=True)
def code_totals(u, cnt, esc_lo, esc_n, total):
    """``total[i]``: how many codes decode to key ``u[i]``, its ``cnt[i]`` main-region codes plus its escape
    code if it has one; returns how many keys have none."""
    empty = 0
    for i in range(u.size):
        rel = np.uint64(u[i]) - esc_lo
        t = np.uint64(cnt[i]) + np.uint64(1 if (np.uint64(u[i]) >= esc_lo and rel < esc_n) else 0)
        total[i] = t
        empty += t == 0
    return empty


@njit(cache=True, nogil=True)
def pick_codes(u, lo, cnt, r, esc_lo, mc, codes):
    """Code number ``r[i]`` of key ``u[i]``'s codes: main-region code ``lo + r`` while ``r < cnt``, else its
    escape code ``mc + (u - esc_lo)``."""
    for i in range(u.size):
        if r[i] < cnt[i]:
            codes[i] = lo[i] + r[i]
        else:
            codes[i] = mc + (np.uint64(u[i]) - esc_lo)


@njit(cache=True, nogil=True)
def key_counts(keys, counts):
    """``counts[u] += 1`` for each 8- or 16-bit order key ``u`` in ``keys`` (np.bincount without its int64 copy
    of the keys)."""
    for i in range(keys.size):
        counts[keys[i]] += 1


@njit(cache=True, nogil=True)
def radix_sort(a, buf):
    """Sort the unsigned keys ``a`` in place (LSD radix, one byte per pass; ``buf`` is scratch of ``a``'s size
    and dtype). A byte that all keys share costs no pass."""
    nbytes = a.itemsize
    counts = np.zeros((nbytes, 256), np.int64)
    for i in range(a.size):
        x = np.uint64(a[i])
        for d in range(nbytes):
            counts[d, np.int64((x >> np.uint64(8 * d)) & np.uint64(255))] += 1
    src = a
    dst = buf
    in_buf = False
    pos = np.empty(256, np.int64)
    for d in range(nbytes):
        if counts[d].max() == a.size:
            continue
        total = 0
        for j in range(256):
            pos[j] = total
            total += counts[d, j]
        s = np.uint64(8 * d)
        for i in range(src.size):
            x = src[i]
            j = np.int64((np.uint64(x) >> s) & np.uint64(255))
            dst[pos[j]] = x
            pos[j] += 1
        src, dst = dst, src
        in_buf = not in_buf
    if in_buf:
        a[:] = buf
