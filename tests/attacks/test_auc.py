"""AUC, its noise under a fair statistic, and the sample sizing the attack tests rely on."""

from __future__ import annotations

import numpy as np
import pytest

from chiplock.attacks import auc, false_alarm_probability, null_sigma, samples_needed


def test_auc_reports_separation_whatever_the_sign():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 1.0
    assert auc([1, 1], [1, 1]) == 0.5
    assert auc([1, 3], [2, 2]) == 0.5


def test_auc_rejects_empty_and_nan_samples():
    with pytest.raises(ValueError, match="non-empty"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([np.nan], [1.0])


def test_null_sigma_matches_simulation():
    rng = np.random.default_rng(0)
    sims = [auc(rng.random(300), rng.random(300)) for _ in range(400)]
    # Reported AUC is max(a, 1 - a): its mean excess over 0.5 is sigma * sqrt(2 / pi).
    assert np.mean(sims) - 0.5 == pytest.approx(null_sigma(300, 300) * np.sqrt(2 / np.pi), rel=0.2)


def test_samples_needed_meets_the_false_alarm_target():
    for threshold in (0.55, 0.6):
        n = samples_needed(threshold, 1e-4)
        assert false_alarm_probability(threshold, n, n) < 1e-4 <= false_alarm_probability(threshold, n - 1, n - 1)
    with pytest.raises(ValueError, match="threshold"):
        samples_needed(0.5)
