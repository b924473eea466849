"""Combination policy: correlated sources are not added, unknowns stay unknown, a vendor secret suffices."""

import pytest

from chiplock.fingerprint import Enrollment
from chiplock.keys.combine import key_strength


def test_independent_sources_add_and_correlated_ones_do_not():
    assert key_strength({"clock": 6.0, "sram": 130.0}).bits == 136.0
    assert key_strength({"clock": 6.0, "precision": 10.0}).bits == 10.0


def test_unknown_entropy_and_threshold():
    s = key_strength({"precision": None, "clock": 6.0})
    assert s.bits is None and s.unknown == ("precision",) and not s.sufficient
    assert "precision" in s.message() and "secret" in s.message()
    weak = key_strength({"clock": 6.4})
    assert not weak.sufficient
    assert weak.message() == ("the key rests on about 6.4 bits of estimated entropy (< 64) and no vendor secret: "
                              "pass a vendor secret (secret= / --secret-file) or add a source that binds the unit "
                              "(sram, tpm)")
    assert key_strength({"clock": 6.4}, secret=b"k" * 32).sufficient


def test_precision_and_clock_together_stay_weak():
    from chiplock.fingerprint.precision import PRECISION_ENTROPY_BITS

    s = key_strength({"precision": PRECISION_ENTROPY_BITS, "clock": 8.0})
    assert s.bits == max(PRECISION_ENTROPY_BITS, 8.0) < 64 and not s.sufficient
    assert key_strength({"precision": PRECISION_ENTROPY_BITS, "tpm": 256.0}).sufficient


def test_accepts_enrollments():
    es = [Enrollment("sram", {}, b"x", 131.5), Enrollment("clock", {}, b"y", 6.5)]
    s = key_strength(es)
    assert s.bits == 138.0 and s.sufficient
    with pytest.raises(ValueError, match="empty"):
        key_strength({})
