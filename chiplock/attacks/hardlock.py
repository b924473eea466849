"""Key-distinguishing statistics against the hard locks (issue 8): cheap tests of a guessed key.

Each statistic returns a float for one (locked tensor, guessed key); :func:`right_wrong_samples` gathers it over
right-key instances (several independent locks of the same weights) and wrong keys, and
:func:`chiplock.attacks.auc.auc` says how well it separates them. A statistic whose AUC is far from 0.5 is a
key oracle: it makes a key guess cost one Argon2id run plus microseconds, instead of a model evaluation.

* :func:`canonical_code_fraction` (oracle 1): decrypt a few codes, decode them, re-encode the values with a
  deterministic encoder; the fraction that comes back identical.
* :func:`code_rank_uniformity` (oracle 1b): where the codes sit inside their values' preimages; uniform for
  random codes, so any non-uniform choice by the encoder shows.
* :func:`breakpoint_hit_fraction` (oracle 2): the fraction of decoded values equal to a public breakpoint value.
* :func:`ks_fit_pvalue`: the KS p-value of the decoded tensor against the public model's CDF; a model that fits
  the real tensor better than its own samples gives the right key away by p close to 1.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch

from chiplock.attacks.locked import LockedTensor

#: ``per_key(locked, key, n, rng)``: n statistic values for one key guess (see :func:`right_wrong_samples`).
PerKey = Callable[[LockedTensor, bytes, int, np.random.Generator], Sequence[float]]

#: Codes per oracle-1 check: 8 were enough against pre-aes v1 (8/8 canonical vs 0 of 80,000 wrong keys).
ORACLE1_CODES = 16


def canonical_code_fraction(locked: LockedTensor, key: bytes, *, start: int = 0,
                            count: int = ORACLE1_CODES) -> float:
    """Oracle 1: the fraction of ``count`` codes (from element ``start``) that a deterministic encoder would
    write for the values they decode to.

    Args:
        locked: the locked tensor.
        key: the guessed 32-byte key.
        start: the first element (a multiple of 16).
        count: how many codes to check.

    Returns:
        A fraction in [0, 1].

    Example:
        >>> import os, torch
        >>> from chiplock.attacks.locked import lock_pre_aes
        >>> t = lock_pre_aes(torch.randn(4000), os.urandom(32))
        >>> canonical_code_fraction(t, os.urandom(32)) < 0.5
        True
    """
    return float(canonical_mask(locked, locked.codes(key, start, count)).mean())


def canonical_mask(locked: LockedTensor, codes: np.ndarray) -> np.ndarray:
    """Which of ``codes`` (decrypted under a guessed key) are the deterministic encoder's code for their value."""
    return locked.canonical_codes(locked.decode_codes(codes)) == codes


def code_rank_uniformity(locked: LockedTensor, key: bytes, *, start: int = 0, count: int = 64) -> float:
    """Oracle 1b: how far the codes' positions inside their preimages are from uniform (KS distance).

    A wrong key gives uniformly random codes, so each code is uniform among the codes of the value it decodes
    to; a right key gives whatever the encoder chose. Any deterministic or biased choice (v1's ``floor``, a
    lowest-code encoder, a skewed random draw) shows up here, not only the one oracle 1 re-creates.

    Args:
        locked: the locked tensor.
        key: the guessed 32-byte key.
        start: the first element (a multiple of 16).
        count: how many codes to check.

    Returns:
        The KS distance in [0, 1] between the codes' mid-rank positions and Uniform(0, 1).
    """
    return _rank_ks(*locked.code_ranks(locked.codes(key, start, count)))


def _rank_ks(rank: np.ndarray, total: np.ndarray) -> float:
    x = np.sort((rank + 0.5) / np.maximum(total, 1))
    n = x.size
    return float(max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n)))


def _as_float64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def breakpoint_hit_fraction(values: torch.Tensor | np.ndarray, locked: LockedTensor) -> float:
    """Oracle 2: the fraction of ``values`` (decoded under a guessed key, or a window of them) that equal one of
    the public breakpoint values exactly.

    Args:
        values: decoded values.
        locked: the locked tensor whose public model is used.

    Returns:
        A fraction in [0, 1].
    """
    return float(np.mean(_breakpoint_hits(_as_float64(values), locked)))


def _breakpoint_hits(values: np.ndarray, locked: LockedTensor) -> np.ndarray:
    """Which of ``values`` (float64) equal a public breakpoint value exactly."""
    b = locked.breakpoint_values()
    i = np.clip(np.searchsorted(b, values), 0, b.size - 1)
    return b[i] == values


def model_cdf(locked: LockedTensor) -> Callable[[np.ndarray], np.ndarray]:
    """The public model's CDF: piecewise linear between the breakpoints at the public probability grid,
    right-continuous where breakpoints repeat (an atom)."""
    b, p = locked.breakpoints(), locked.grid()
    width = np.diff(b)

    def cdf(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        k = np.searchsorted(b, x, side="right") - 1
        inside = (k >= 0) & (k < b.size - 1)
        kk = np.clip(k, 0, b.size - 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(width[kk] > 0, (x - b[kk]) / width[kk], 0.0)
        f = p[kk] + (p[kk + 1] - p[kk]) * np.clip(t, 0.0, 1.0)
        return np.where(inside, f, np.where(k < 0, 0.0, 1.0))

    return cdf


def ks_fit_pvalue(values: torch.Tensor | np.ndarray, locked: LockedTensor) -> float:
    """The one-sample KS p-value of ``values`` against the public model's CDF (:func:`model_cdf`).

    Args:
        values: the decoded tensor (all of it: overfitting shows only at the tensor's own size).
        locked: the locked tensor whose public model is used.

    Returns:
        A p-value in [0, 1].
    """
    from scipy.stats import kstest

    return float(kstest(_as_float64(values), model_cdf(locked)).pvalue)


def quantize_int8(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 quantisation (``round(t / s)`` with ``s = max|t| / 127``), as a deployment
    recipe would store an int8 model."""
    s = t.detach().abs().max().clamp_min(1e-12) / 127.0
    return torch.round(t.detach() / s).clamp(-127, 127).to(torch.int8)


def right_wrong_samples(locks: Sequence[tuple[LockedTensor, bytes]], per_key: PerKey, *, n_pos: int,
                        n_wrong_keys: int, n_neg: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The statistic on right-key and wrong-key instances.

    Args:
        locks: ``(locked tensor, its right key)`` pairs: independent locks of the weights under attack.
        per_key: ``per_key(locked, key, n, rng)`` returns ``n`` statistic values for that guess (``n`` disjoint
            windows of the tensor; statistics of the whole tensor take ``n == 1``).
        n_pos: right-key instances wanted, spread evenly over ``locks`` (at least one per lock).
        n_wrong_keys: random wrong keys, spread evenly over ``locks``.
        n_neg: wrong-key instances wanted (default: one per wrong key), spread evenly over the wrong keys.
        seed: seeds the window choices (the keys come from ``os.urandom``).

    Returns:
        ``(positives, negatives)`` as float64 arrays.
    """
    if not locks or n_wrong_keys < 1 or n_pos < 1:
        raise ValueError("right_wrong_samples needs at least one lock, one positive and one wrong key")
    rng = np.random.default_rng(seed)
    per_lock = -(-n_pos // len(locks))
    per_wrong = -(-(n_neg or n_wrong_keys) // n_wrong_keys)
    pos = [v for locked, key in locks for v in per_key(locked, key, per_lock, rng)]
    neg = [v for i in range(n_wrong_keys) for v in per_key(locks[i % len(locks)][0], os.urandom(32), per_wrong, rng)]
    return np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)


def _windows(size: int, window: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` disjoint windows of ``window`` random element indices (rows of the result).

    Random index sets, not runs of neighbours: a run would also measure the tensor's layout (rows of different
    scale), which is the structural panel's business, and make the oracles flag structure instead of codes.
    """
    if size // window < n:
        raise ValueError(f"a tensor of {size} elements holds only {size // window} windows of {window}; "
                         "ask for fewer")
    return rng.permutation(size)[:n * window].reshape(n, window)


def _window_codes(locked: LockedTensor, key: bytes, count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The codes of ``n`` disjoint random windows of ``count`` elements, decrypted under ``key`` (rows: windows)."""
    size = int(np.prod(locked.shape))
    windows = _windows(size, count, n, rng)
    # Decrypting every code is one AES pass; decoding only the chosen ones keeps the statistic cheap.
    return locked.codes(key, 0, size)[windows]


def oracle1_per_key(count: int = ORACLE1_CODES) -> PerKey:
    """A ``per_key`` for :func:`right_wrong_samples`: oracle 1 on disjoint random sets of ``count`` codes."""

    def per_key(locked: LockedTensor, key: bytes, n: int, rng: np.random.Generator) -> list[float]:
        codes = _window_codes(locked, key, count, n, rng)
        mask = canonical_mask(locked, codes.reshape(-1)).reshape(codes.shape)
        return [float(m) for m in mask.mean(axis=1)]

    return per_key


def oracle1b_per_key(count: int = 64) -> PerKey:
    """A ``per_key``: :func:`code_rank_uniformity` on disjoint random sets of ``count`` codes."""

    def per_key(locked: LockedTensor, key: bytes, n: int, rng: np.random.Generator) -> list[float]:
        codes = _window_codes(locked, key, count, n, rng)
        rank, total = locked.code_ranks(codes.reshape(-1))
        return [_rank_ks(r, t) for r, t in zip(rank.reshape(codes.shape), total.reshape(codes.shape))]

    return per_key


def oracle2_per_key(size: int) -> PerKey:
    """A ``per_key``: oracle 2 on disjoint random sets of ``size`` decoded values."""

    def per_key(locked: LockedTensor, key: bytes, n: int, rng: np.random.Generator) -> list[float]:
        values = _as_float64(locked.decode(key))
        # One pass over all the windows: the public breakpoints are read once per key, not once per window.
        return [float(h) for h in _breakpoint_hits(values[_windows(values.size, size, n, rng)], locked).mean(axis=1)]

    return per_key


def ks_per_key(locked: LockedTensor, key: bytes, n: int, rng: np.random.Generator) -> list[float]:
    """A ``per_key``: the KS-fit p-value of the whole decoded tensor (``n`` must be 1)."""
    if n != 1:
        raise ValueError("the KS-fit statistic looks at the whole tensor: one instance per key (n == 1)")
    return [ks_fit_pvalue(locked.decode(key), locked)]
