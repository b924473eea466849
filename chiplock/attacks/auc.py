"""AUC of a distinguishing statistic, its sampling noise under a fair statistic, and sample sizing.

An attack statistic separates right-key instances (positives) from wrong-key instances (negatives). Its AUC is
the Mann-Whitney probability that a positive scores above a negative (ties count one half). Reported as
``max(AUC, 1 - AUC)``, so a statistic that is *lower* for the right key counts as much as one that is higher:
an attacker may use either sign, and a test cannot pass by the sign.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def auc(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> float:
    """``max(AUC, 1 - AUC)`` of ``positives`` against ``negatives`` (0.5: no separation, 1.0: perfect).

    Args:
        positives: the statistic on right-key instances.
        negatives: the statistic on wrong-key instances.

    Returns:
        A float in [0.5, 1].

    Raises:
        ValueError: a sample is empty or holds NaN.

    Example:
        >>> auc([3.0, 4.0], [1.0, 2.0])
        1.0
    """
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auc needs at least one positive and one negative; pass non-empty samples")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("auc got NaN statistics; make the statistic return a number for every instance")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    a = (ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size)
    return float(max(a, 1.0 - a))


def null_sigma(n_pos: int, n_neg: int) -> float:
    """Standard deviation of the (signed) AUC of a fair, continuous statistic: ``sqrt((n+1) / (12·n_pos·n_neg))``.

    Ties only shrink it, so this is an upper bound for discrete statistics too.
    """
    if n_pos < 1 or n_neg < 1:
        raise ValueError("null_sigma needs n_pos >= 1 and n_neg >= 1")
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def false_alarm_probability(threshold: float, n_pos: int, n_neg: int) -> float:
    """Probability that a fair statistic's reported AUC exceeds ``threshold`` (normal approximation, two-sided)."""
    from scipy.stats import norm

    return float(2.0 * norm.sf((threshold - 0.5) / null_sigma(n_pos, n_neg)))


def samples_needed(threshold: float, p_fail: float = 1e-4) -> int:
    """Instances per class (``n_pos = n_neg = n``) so that a fair statistic exceeds ``threshold`` with
    probability below ``p_fail``.

    Example:
        >>> samples_needed(0.55) > 1000, samples_needed(0.6) < 300
        (True, True)
    """
    if not 0.5 < threshold < 1.0 or not 0.0 < p_fail < 1.0:
        raise ValueError("samples_needed needs 0.5 < threshold < 1 and 0 < p_fail < 1")
    n = 2
    while false_alarm_probability(threshold, n, n) >= p_fail:
        n = int(n * 1.25) + 1
    lo, hi = n // 2, n
    while lo < hi:
        mid = (lo + hi) // 2
        if false_alarm_probability(threshold, mid, mid) < p_fail:
            hi = mid
        else:
            lo = mid + 1
    return lo
