"""The pre-aes model computed on histograms (8- and 16-bit dtypes) and with chunked bootstrap draws (32-bit)
must have the law of the sample-based definition it replaced, kept here as ``_build_model_reference``: the
public breakpoints, which every attack statistic reads, must not change in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from chiplock.transforms import _pre_aes_kernel as _kernel
from chiplock.transforms.base import DTYPES, raw_view
from chiplock.transforms.pre_aes import (BOOT_FACTOR, SMALL_N, _as_positions, _cells, _fine_keys, _finite_mask,
                                         _k_candidates, _key_bounds, _round_keys, _small_bounds, _values,
                                         build_model, from_order_key, order_key, probability_grid)


def _build_model_reference(t: torch.Tensor, rng: np.random.Generator, k: int | None = None,
                           keys: np.ndarray | None = None) -> tuple[torch.Tensor, bool]:
    """The sample-based model pre-aes built up to commit 30eaa7f (the current one must match it in law).

    Breakpoints are in ``t``'s dtype for 32- and 64-bit dtypes, float32 positions for 8- and 16-bit ones.
    A bootstrap resample of the finite values (``n`` draws with replacement) gives the quantiles at the
    probability grid, each breakpoint drawn between the two resampled values around its quantile:

    * 8- and 16-bit dtypes (a *smoothed* bootstrap): each resampled value is first spread uniformly over its
      rounding cell, so repeated values become continuous mass that the model splits between intervals as the
      data does, and the model rounded to the dtype has the data's distribution;
    * 32-bit dtypes: a breakpoint whose neighbour lands on the same resampled value marks an *atom* (a value
      repeated about ``n / K`` times or more) and keeps that value; any other is drawn uniformly from the
      aligned block of ``2**j`` order keys holding its resampled value, ``2**j`` about 16 times the local
      spacing of the data, so it equals a weight about as often as a value drawn from the model does.

    The outer breakpoints lie a random distance (up to the mean spacing of the ten outermost resampled
    values) below the minimum and above the maximum. ``k`` overrides the number of intervals; ``keys``, the
    order keys of all of ``t`` if the caller has them (used when every element is finite).
    """
    flat = t.reshape(-1)
    mask = _finite_mask(flat)
    nonfinite = bool(mask is not None and not mask.all())
    finite = flat[mask] if nonfinite else flat
    udtype, kind = DTYPES[t.dtype]
    w = np.dtype(udtype).itemsize * 8
    if flat.numel() < SMALL_N or finite.numel() < SMALL_N or t.dtype == torch.float64:
        # float64 is always stored raw; it needs no quantile model.
        bounds = _small_bounds(flat)
        return (_as_positions(bounds) if w <= 16 else bounds), nonfinite
    if keys is None or keys.size != flat.numel() or nonfinite:
        keys = order_key(raw_view(finite), kind, w)
    keys = np.sort(keys)
    if w <= 16:
        keys = keys.astype(np.uint64)
    n = len(keys)
    k = k or _k_candidates(n, w)[0]
    kmin, kmax = _key_bounds(t.dtype)
    nb = int(BOOT_FACTOR * n)
    i = np.floor(probability_grid(k) * (nb - 1)).astype(np.int64)
    m = min(10, n - 1)
    if w <= 16:
        boot = keys[rng.integers(0, n, nb)]
        # Where values repeat only a few times each (fp16 weights: ~10), a breakpoint at a resampled quantile
        # falls on a value with probability ~ its count, so "decoded values equal to a rounded breakpoint" would
        # favour the right key by ~1 count per breakpoint. Kernel smoothing in key space (4 keys, at most 2 % of
        # the interquartile range) makes that probability follow the smoothed density instead. Values repeated
        # 20+ times on average need none (smoothing them measured worse); values holding half an interval's
        # mass or more are atoms and stay put.
        counts = np.bincount(boot, minlength=1 << w)
        iqr = float(keys[(3 * n) // 4]) - float(keys[n // 4])
        spread = min(4.0, 0.02 * iqr)
        if spread >= 0.5 and n < 20 * np.count_nonzero(counts):
            heavy = counts[boot] >= 0.5 * nb / k
            step = np.rint(rng.normal(0.0, spread, nb)).astype(np.int64)
            moved = np.clip(boot.astype(np.int64) + step, int(keys[0]), int(keys[-1])).astype(np.uint64)
            if kind == "float":  # never onto NaN/inf keys between finite ones (there are none) or off the range
                moved = np.where(np.isfinite(_values(moved, t.dtype)), moved, boot)
            boot = np.where(heavy, boot, moved)
        lo, hi = _cells(boot, t.dtype)
        x = np.sort(lo + rng.random(nb) * (hi - lo))
        a, b = x[i], x[np.minimum(i + 1, nb - 1)]
        br = a + rng.random(k + 1) * (b - a)
        (cell_lo,), _ = _cells(keys[:1], t.dtype)
        _, (cell_hi,) = _cells(keys[-1:], t.dtype)
        br[0] = min(br[0], cell_lo - rng.random() * (x[m] - x[0]) / m)
        br[-1] = max(br[-1], cell_hi + rng.random() * (x[-1] - x[-1 - m]) / m)
        limit = (float(kmin), float(kmax)) if kind != "float" else (-float(torch.finfo(t.dtype).max),
                                                                   float(torch.finfo(t.dtype).max))
        pos = np.clip(br, *limit).astype(np.float32)
        # Cover the data exactly, whatever float32 rounding did to the outer positions.
        if _fine_keys(pos[:1], t.dtype)[0] > keys[0]:
            pos[0] = np.float32(_values(keys[:1], t.dtype)[0] if kind == "float" else float(keys[0]))
        if _fine_keys(pos[-1:], t.dtype)[0] < keys[-1]:
            pos[-1] = np.float32(_values(keys[-1:], t.dtype)[0] if kind == "float" else float(keys[-1]))
        return torch.from_numpy(np.sort(pos)), nonfinite
    # Positions: values for floats (so blocks are value-linear, not spread over binades near zero), order keys
    # for integers (already value-linear).
    # keys are sorted, so the sorted resample keys[idx] is keys[sorted idx]: only these few of its ranks are
    # needed, which are ranks of the drawn indices; the whole resample is never sorted.
    h = max(1, nb // (4 * k))
    lo_i, hi_i = np.maximum(i - h, 0), np.minimum(i + h, nb - 1)
    ranks = np.concatenate([i, lo_i, hi_i, [0, m, nb - 1, nb - 1 - m]])
    at = keys[_order_statistics_reference(rng.integers(0, n, nb), ranks)]
    boot = _values(at, t.dtype) if kind == "float" else at.astype(np.float64)
    a, boot_lo, boot_hi, (b0, bm, btop, btop_m) = np.split(boot, [k + 1, 2 * (k + 1), 3 * (k + 1)])
    atom = np.zeros(k + 1, bool)
    atom[:-1] |= a[:-1] == a[1:]
    atom[1:] |= a[1:] == a[:-1]
    # The block does not depend on where the exact weights lie inside it, so a breakpoint equals a weight with
    # about the probability that a value drawn from the model does.
    gap = (boot_hi - boot_lo) / np.maximum(hi_i - lo_i, 1)
    # Where the local spacing is 0 (a value repeated over the whole neighbourhood) the breakpoint keeps it.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        block = np.where(gap > 0, np.exp2(np.ceil(np.log2(16.0 * gap))), 0.0)
        if kind != "float":
            block = np.where(gap > 0, np.maximum(block, 1.0), 0.0)
        safe = np.where(block > 0, block, 1.0)
        offset = rng.random(k + 1) * safe
        offset = np.floor(offset) if kind != "float" else offset
        moved = np.floor(a / safe) * safe + offset
    br = np.sort(np.where(atom | (block == 0) | ~np.isfinite(moved), a, moved))
    low_gap = float(bm - b0) / m
    high_gap = float(btop - btop_m) / m
    if kind == "float":
        with np.errstate(over="ignore", invalid="ignore"):
            ext = _round_keys(np.array([b0 - rng.random() * low_gap, btop + rng.random() * high_gap]), t.dtype)
            brk = np.sort(_round_keys(br, t.dtype))  # keys: -0.0 and +0.0 compare equal as values
        lo_key = min(int(ext[0]), int(keys[0]) - 1) if np.isfinite(b0 - low_gap) else int(keys[0])
        hi_key = max(int(ext[1]), int(keys[-1]) + 1) if np.isfinite(btop + high_gap) else int(keys[-1])
        lo_key, hi_key = max(lo_key, kmin), min(hi_key, kmax)
        br = np.array([min(max(int(x), kmin), kmax) for x in brk], dtype=np.uint64)
    else:
        lo_key = max(kmin, int(keys[0]) - 1 - int(rng.random() * max(low_gap, 1.0)))
        hi_key = min(kmax, int(keys[-1]) + 1 + int(rng.random() * max(high_gap, 1.0)))
        # Python integers: float64 keys of 64-bit dtypes may round up to 2**64.
        br = np.array([min(max(int(x), kmin), kmax) for x in br], dtype=np.uint64)
    br[0] = min(int(br[0]), lo_key)
    br[-1] = max(int(br[-1]), hi_key)
    bits = np.ascontiguousarray(from_order_key(br.astype(udtype), kind, w))
    return torch.from_numpy(bits.view(np.dtype(f"i{w // 8}") if w > 8 else np.uint8)).view(t.dtype), nonfinite


def _order_statistics_reference(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``np.sort(x)[r]`` for non-negative int64 ``x``, without sorting all of ``x``.

    A histogram over the top bits of ``x`` (about 2**18 buckets) says which bucket holds each rank; only those
    buckets are gathered and sorted: two compiled passes over ``x`` instead of a sort.
    """
    x = np.ascontiguousarray(x, dtype=np.int64)
    shift = np.int64(max(0, int(x.max(initial=0)).bit_length() - 18))
    ends = np.zeros((int(x.max(initial=0)) >> shift) + 2, np.int64)
    _kernel.bucket_counts(x, shift, ends)
    np.cumsum(ends, out=ends)  # ends[b]: elements in the buckets before b
    bucket = np.searchsorted(ends, r, side="right") - 1
    need = np.zeros(len(ends) - 1, bool)
    need[bucket] = True
    sizes = np.where(need, np.diff(ends), 0)
    start = np.cumsum(sizes) - sizes
    buf = np.empty(int(sizes.sum()), np.int64)
    _kernel.gather_buckets(x, shift, np.where(need, start, -1), buf)
    buf.sort()  # the buckets are disjoint ranges in bucket order: sorting all sorts each
    return buf[start[bucket] + np.asarray(r) - ends[bucket]]


def _cases() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(41)
    g = rng.standard_normal(20_000)
    relu = np.maximum(g, 0.0)
    return {
        # fp16 weights repeat ~10 times each: the Gaussian kernel smoothing is on.
        "f16-gauss": torch.from_numpy(g * 0.05).half(),
        # An atom (a fifth zeros) holds over half an interval's mass: its draws stay put, the rest are smoothed.
        "bf16-zeros": torch.from_numpy(np.where(rng.random(20_000) < 0.2, 0.0, g * 0.05)).bfloat16(),
        # Few distinct values repeated 100+ times: no smoothing, wide rounding cells.
        "i8-quantized": torch.from_numpy(np.clip(np.rint(g * 20), -127, 127).astype(np.int8)),
        "f32-gauss": torch.from_numpy((g * 0.05).astype(np.float32)),
        "f32-relu": torch.from_numpy(relu.astype(np.float32)),
    }


CASES = _cases()
REPS = 200


def _statistics(t: torch.Tensor, model) -> np.ndarray:
    """Per model: breakpoints at a few indices (float64 values; positions for 8/16-bit dtypes) and the fraction
    of breakpoints that round onto a value of the tensor (what the breakpoint-hit attacks read)."""
    udtype, kind = DTYPES[t.dtype]
    w = np.dtype(udtype).itemsize * 8
    present = np.unique(order_key(raw_view(t.reshape(-1)), kind, w).astype(np.uint64))
    if w <= 16:
        pos = model.numpy().astype(np.float64)
        keys = _fine_keys(model.numpy(), t.dtype)
    else:
        keys = order_key(raw_view(model), kind, w).astype(np.uint64)
        pos = _values(keys, t.dtype) if kind == "float" else keys.astype(np.float64)
    k = len(pos) - 1
    picks = pos[[0, 1, k // 8, k // 4, k // 2, (3 * k) // 4, k - 1, k]]
    return np.append(picks, np.isin(keys, present).mean())


def _draws(fn, t: torch.Tensor, seed: int) -> np.ndarray:
    return np.array([_statistics(t, fn(t, np.random.default_rng([seed, r]))[0]) for r in range(REPS)])


def _worst_p(t: torch.Tensor) -> float:
    """The smallest KS p-value over the statistics, Bonferroni-corrected, between the two models."""
    new, old = _draws(build_model, t, 1), _draws(_build_model_reference, t, 2)
    ps = []
    for j in range(new.shape[1]):
        if np.ptp(np.concatenate([new[:, j], old[:, j]])) == 0:
            continue  # a statistic both models hold constant (an atom's breakpoint) agrees exactly
        ps.append(ks_2samp(new[:, j], old[:, j]).pvalue)
    return min(ps) * len(ps)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_model_has_the_law_of_the_sample_based_reference(name, monkeypatch):
    from chiplock.transforms import pre_aes

    monkeypatch.setattr(pre_aes, "_DRAW_CHUNK", 4096)  # several chunks per bootstrap pass
    p = _worst_p(CASES[name])
    assert p > 1e-3, f"{name}: breakpoints of the new model differ in law from the reference (p = {p:.2e})"


@pytest.mark.slow
def test_the_law_comparison_sees_a_changed_bootstrap(monkeypatch):
    # The control: a 4x larger bootstrap (breakpoints half as spread) must fail the comparison above.
    from chiplock.transforms import pre_aes

    monkeypatch.setattr(pre_aes, "BOOT_FACTOR", 4 * BOOT_FACTOR)
    assert _worst_p(CASES["f16-gauss"]) < 1e-3


def test_resample_order_statistics_match_sorting_the_resample():
    # Several ranks in one cell are drawn jointly: the joint law of (x[r1], x[r2]) matches sorting nb uniforms.
    from chiplock.transforms.pre_aes import _resample_order_statistics

    keys = np.array([10, 11, 40], np.uint64)
    counts = np.array([3, 50, 7], np.int64)
    ranks = np.array([0, 2, 3, 20, 21, 52, 53, 59])
    rng = np.random.default_rng(5)
    new = np.array([_resample_order_statistics(keys, counts, ranks, torch.int8, rng) for _ in range(2000)])
    lo, hi = _cells(np.repeat(keys, counts), torch.int8)
    old = np.array([np.sort(lo + rng.random(lo.size) * (hi - lo))[ranks] for _ in range(2000)])
    for j in range(len(ranks)):
        assert ks_2samp(new[:, j], old[:, j]).pvalue > 1e-4, ranks[j]
    # Joint, not independent: the gap between ranks 20 and 21 of the 50 uniforms in [10.5, 11.5] is ~1/51.
    for x in (new, old):
        assert np.all(x[:, 4] >= x[:, 3]) and abs(np.mean(x[:, 4] - x[:, 3]) - 1 / 51) < 0.003
    assert np.all(np.diff(new, axis=1) >= 0)


@pytest.mark.parametrize("n", [1, 7, 1000, 300_000])
def test_boot_order_statistics_match_a_full_sort(n, monkeypatch):
    from chiplock.transforms import pre_aes

    monkeypatch.setattr(pre_aes, "_DRAW_CHUNK", 777)
    nb = int(1.1 * n)
    r = np.concatenate([[0, nb - 1], np.random.default_rng(n).integers(0, nb, 500)])
    got = pre_aes._boot_order_statistics(n, nb, r, np.random.default_rng(n))
    seed = np.random.default_rng(n).integers(0, 1 << 63, 4)  # the child stream the function draws from
    draws = np.concatenate(list(pre_aes._boot_draws(n, nb, seed)))
    assert draws.size == nb and draws.min() >= 0 and draws.max() < n
    np.testing.assert_array_equal(got, np.sort(draws)[r])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_radix_sort_matches_numpy(dtype):
    rng = np.random.default_rng(3)
    x = rng.integers(0, np.iinfo(dtype).max, 100_000, dtype=dtype, endpoint=True)
    x[:5000] = x[0]  # repeats, and keys sharing their top bytes (a byte all keys share costs no pass)
    for a in (x, x >> dtype(3) if dtype != np.uint8 else x, x & dtype(0xFF)):
        y = a.copy()
        _kernel.radix_sort(y, np.empty_like(y))
        np.testing.assert_array_equal(y, np.sort(a))
