"""2:4 structured sparsity and unstructured magnitude pruning."""

from __future__ import annotations

import pytest
import torch

from chiplock.softlock import MagnitudePruning, NMSparsity, parse_config
from chiplock.softlock.magnitude import magnitude_mask
from chiplock.softlock.nm_sparsity import nm_mask


def test_two_four_keeps_the_two_largest_of_every_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)  # 36 inputs per row: 9 groups of 4 in the flattened order
    mask = nm_mask(w, 2, 4, order="flat")
    groups = mask.reshape(8, 9, 4)
    assert (groups.sum(-1) == 2).all()
    mags = w.abs().reshape(8, 9, 4)
    kept_min = torch.where(groups, mags, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, mags).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_two_four_tail_group_and_ties():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 0.1]])  # ties keep the earlier; tail group of 2 keeps both
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, True]]


@pytest.mark.parametrize("level", [0.05, 0.25, 0.5, 0.9])
def test_magnitude_prunes_exactly_the_smallest_fraction(level):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(w, level)
    assert int((~mask).sum()) == int(level * w.numel())
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_magnitude_ties_drop_earliest():
    assert magnitude_mask(torch.tensor([3.0, 1, 1, 1, 2, 0.5]), 0.5).tolist() == [True, False, False, True, True,
                                                                                  False]


def test_configs():
    assert parse_config("2:4") == NMSparsity(2, 4) and parse_config("prune0.25") == MagnitudePruning(0.25)
    assert MagnitudePruning(0.5).name == "prune0.5"
    with pytest.raises(ValueError, match="0 < n < m"):
        NMSparsity(4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MagnitudePruning(1.0)
