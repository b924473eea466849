"""SP 800-90B-style estimators against sources whose min-entropy is known."""

import math

import numpy as np
import pytest

from chiplock.fingerprint import entropy


def test_fair_coin_is_near_one_bit():
    bits = np.random.default_rng(0).integers(0, 2, 200_000, dtype=np.uint8)
    a = entropy.assess(bits, allow_iid=True)
    assert a.iid and a.mcv > 0.98 and a.markov > 0.98
    assert 0.8 < a.collision < 0.95  # the binary collision estimate is conservative by design
    assert a.min_entropy == a.mcv
    assert entropy.assess(bits).min_entropy == a.collision  # non-IID track takes the minimum


@pytest.mark.parametrize("p", [0.7, 0.9, 0.99])
def test_biased_coin_matches_theory(p):
    bits = (np.random.default_rng(1).random(200_000) < p).astype(np.uint8)
    a = entropy.assess(bits, allow_iid=True)
    truth = -math.log2(p)
    for est in (a.mcv, a.collision, a.markov):
        assert est <= truth * 1.05 + 0.005
        assert est >= truth * 0.85 - 0.01


def test_markov_catches_alternation_that_mcv_misses():
    bits = np.tile(np.array([0, 1], np.uint8), 10_000)
    a = entropy.assess(bits, allow_iid=True)
    assert a.mcv > 0.95 and a.markov < 0.01
    assert not a.iid and a.min_entropy < 0.01


def test_sticky_markov_chain():
    rng = np.random.default_rng(2)
    flips = rng.random(100_000) < 0.05
    bits = (np.cumsum(flips) % 2).astype(np.uint8)  # stays put with probability 0.95
    a = entropy.assess(bits, allow_iid=True)
    assert not a.iid
    assert a.markov == pytest.approx(-math.log2(0.95), rel=0.15)


def test_short_samples_are_penalised():
    bits = np.random.default_rng(3).integers(0, 2, 64, dtype=np.uint8)
    assert entropy.most_common_value(bits) < 0.8


def test_bit_error_rates():
    ref = np.array([0, 1, 0, 1], np.uint8)
    readings = np.array([[0, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 0]], np.uint8)
    assert entropy.bit_error_rates(ref, readings).tolist() == pytest.approx([2 / 3, 0, 0, 1 / 3])
    assert entropy.bit_error_rate(ref, readings) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="reference"):
        entropy.bit_error_rates(ref, readings[:, :3])


def test_rejects_non_bits():
    with pytest.raises(ValueError, match="0/1"):
        entropy.assess(np.array([0, 1, 2, 0, 1, 0, 1]))


def test_collision_is_not_used_on_tiny_samples():
    bits = np.random.default_rng(5).integers(0, 2, 45, dtype=np.uint8)
    a = entropy.assess(bits)
    assert a.non_iid == min(a.mcv, a.markov)
    big = entropy.assess(np.random.default_rng(5).integers(0, 2, 5000, dtype=np.uint8))
    assert big.non_iid == min(big.mcv, big.collision, big.markov)
