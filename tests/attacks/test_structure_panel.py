"""The structural panel tells trained weights from wrong-key weights (docs/attacks.md states it; this checks it),
and each statistic is near its i.i.d. value on i.i.d. weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from chiplock.attacks import auc
from chiplock.attacks.structure import (PANEL, cross_layer_spearman, kernel_neighbour_corr, measure_panel,
                                        row_norm_cv, spectral_edge_ratio)

WRONG_KEYS = 200
CLAIMED = ("spectrum", "row_norm_cv")


@pytest.fixture(scope="module")
def panel(trained_weights):
    # The two largest matrices (DigitCNN: fc_layers.0 and conv_layers.6), locked with the current pre-aes.
    big = sorted(trained_weights, key=lambda n: trained_weights[n].numel())[-2:]
    with threadpool_limits(1):
        return measure_panel({n: trained_weights[n] for n in big}, [], n_locks=2, n_wrong_keys=WRONG_KEYS,
                             stats=CLAIMED), big


@pytest.mark.slow
def test_spectrum_and_row_norms_tell_right_from_wrong_keys(panel):
    result, names = panel
    assert len(result) == len(CLAIMED) * len(names)
    for label, r in result.items():
        assert r["neg"].size >= 200
        a = auc(r["pos"], r["neg"])
        assert a >= 0.95, f"{label}: AUC {a:.3f} (right {r['pos'].mean():.3f}, wrong {r['neg'].mean():.3f})"


def test_panel_statistics_are_neutral_on_iid_weights():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((128, 64, 3, 3)))
    assert abs(spectral_edge_ratio(w) - 1.0) < 0.05
    assert row_norm_cv(w) < 0.05
    assert abs(kernel_neighbour_corr(w)) < 0.02
    assert abs(cross_layer_spearman(w, torch.from_numpy(rng.standard_normal((32, 128))))) < 0.3
    for name, (fn, applies) in PANEL.items():
        assert applies(w), name
        assert np.isfinite(fn(w)), name


def test_panel_statistics_see_planted_structure():
    rng = np.random.default_rng(1)
    scale = np.exp(rng.standard_normal((128, 1, 1, 1)))
    w = torch.from_numpy(rng.standard_normal((128, 64, 3, 3)) * scale)
    assert row_norm_cv(w) > 0.3
    smooth = torch.from_numpy(rng.standard_normal((128, 64, 1, 1))).expand(128, 64, 3, 3) + 0.1 * torch.randn(
        128, 64, 3, 3, dtype=torch.float64)
    assert kernel_neighbour_corr(smooth) > 0.9
    low_rank = torch.from_numpy(np.outer(rng.standard_normal(128), rng.standard_normal(576)) * 0.2
                                + rng.standard_normal((128, 576)))
    assert spectral_edge_ratio(low_rank) > 1.5
    with pytest.raises(ValueError, match="conv weight"):
        kernel_neighbour_corr(torch.zeros(4, 4))
