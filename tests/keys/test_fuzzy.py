"""Fuzzy extractor: reproduction under noise, failure beyond the design, leakage accounting."""

import numpy as np
import pytest

from chiplock.errors import FingerprintError
from chiplock.keys.fuzzy import CodeParams, FuzzyExtractor, repetition_error_rate


def _bits(n, seed):
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


def _flip(bits, idx):
    out = bits.copy()
    out[idx] ^= 1
    return out


def test_design_meets_targets_at_15_percent():
    p = CodeParams.design(ber=0.15, key_bits=128, failure=1e-6)
    assert p.construction == "code-offset" and p.repetition > 1
    assert p.failure_probability(0.15) <= 1e-7
    assert p.remaining_entropy(p.input_bits) >= 128
    # The leakage bound is code length minus message length.
    assert p.leakage_bits == p.code_bits - 8 * p.data_bytes * p.blocks


def test_design_charges_for_imperfect_entropy():
    perfect = CodeParams.design(ber=0.15, key_bits=128)
    biased = CodeParams.design(ber=0.15, key_bits=128, entropy_per_bit=0.97)
    assert biased.code_bits > perfect.code_bits
    assert biased.remaining_entropy(0.97 * biased.input_bits) >= 128


def test_design_refuses_impossible_targets():
    with pytest.raises(ValueError, match="no code reaches"):
        CodeParams.design(ber=0.15, key_bits=128, entropy_per_bit=0.8)
    with pytest.raises(ValueError, match="ber"):
        CodeParams.design(ber=0.6)


def test_code_offset_reproduces_at_design_ber_and_fails_for_unrelated_reading():
    p = CodeParams.design(ber=0.15, key_bits=128)
    fe = FuzzyExtractor(params=p)
    w = _bits(p.input_bits, 1)
    key, helper = fe.generate(w)
    rng = np.random.default_rng(2)
    for _ in range(200):
        noisy = w ^ (rng.random(w.size) < 0.15).astype(np.uint8)
        assert FuzzyExtractor.from_helper(helper).reproduce(noisy, helper) == key
    with pytest.raises(FingerprintError, match="not the enrolled device"):
        fe.reproduce(_bits(p.input_bits, 3), helper)


def test_bch_corrects_exactly_t_errors_after_the_vote():
    # Without repetition (syndrome construction) each flipped bit is one BCH error: t pass, t+1 fail.
    p = CodeParams(repetition=1, bch_m=8, bch_t=6, data_bytes=16)
    fe = FuzzyExtractor(params=p)
    w = _bits(p.input_bits, 4)
    key, helper = fe.generate(w)
    rng = np.random.default_rng(5)
    for _ in range(50):
        assert fe.reproduce(_flip(w, rng.choice(w.size, 6, replace=False)), helper) == key
    failures = 0
    for _ in range(50):
        try:
            failures += fe.reproduce(_flip(w, rng.choice(w.size, 7, replace=False)), helper) != key
        except FingerprintError:
            failures += 1
    assert failures == 50


def test_empirical_failure_rate_matches_analytic_at_high_ber():
    # At a BER well above the design, failures are common enough to count; the analytic model must predict them.
    p = CodeParams(repetition=5, bch_m=7, bch_t=8, data_bytes=8)
    ber = 0.2
    expected = p.failure_probability(ber)
    assert 0.05 < expected < 0.6
    fe = FuzzyExtractor(params=p)
    w = _bits(p.input_bits, 6)
    key, helper = fe.generate(w)
    rng = np.random.default_rng(7)
    trials, fails = 1500, 0
    for _ in range(trials):
        noisy = w ^ (rng.random(w.size) < ber).astype(np.uint8)
        try:
            fails += fe.reproduce(noisy, helper) != key
        except FingerprintError:
            fails += 1
    sd = np.sqrt(expected * (1 - expected) / trials)
    assert abs(fails / trials - expected) < 5 * sd


def test_repetition_error_rate():
    assert repetition_error_rate(0.15, 1) == pytest.approx(0.15)
    assert repetition_error_rate(0.15, 3) == pytest.approx(3 * 0.15**2 * 0.85 + 0.15**3)


def test_syndrome_handles_unaligned_lengths_and_leaks_only_parity():
    p = CodeParams(repetition=1, bch_m=7, bch_t=3, data_bytes=8, input_bits=61)
    assert p.leakage_bits == p.ecc_bits
    fe = FuzzyExtractor(params=p)
    w = _bits(61, 8)
    key, helper = fe.generate(w)
    assert fe.reproduce(_flip(w, [0, 30, 60]), helper) == key


def test_helper_is_public_and_keys_differ_per_enrollment():
    p = CodeParams.design(ber=0.15, key_bits=128)
    w = _bits(p.input_bits, 9)
    key1, h1 = FuzzyExtractor(params=p).generate(w)
    key2, h2 = FuzzyExtractor(params=p).generate(w)
    assert key1 != key2 and h1["seed"] != h2["seed"]
    assert key1.hex() not in repr(h1) and key1 not in repr(h1).encode()
    # The code-offset helper is the reading masked by a random codeword: about half its bits differ from w.
    import base64
    offset = np.unpackbits(np.frombuffer(base64.b64decode(h1["data"]), np.uint8))[: w.size]
    assert 0.4 < (offset != w).mean() < 0.6


def test_bad_inputs():
    p = CodeParams.design(ber=0.15, key_bits=128)
    fe = FuzzyExtractor(params=p)
    key, helper = fe.generate(_bits(p.input_bits, 10))
    with pytest.raises(FingerprintError, match="bits"):
        fe.reproduce(_bits(p.input_bits - 1, 10), helper)
    with pytest.raises(FingerprintError, match="malformed"):
        fe.reproduce(_bits(p.input_bits, 10), {**helper, "seed": "zz"})
    with pytest.raises(FingerprintError, match="version"):
        FuzzyExtractor.from_helper({"fuzzy": 99})
    with pytest.raises(FingerprintError, match="malformed"):
        FuzzyExtractor.from_helper({"fuzzy": 1, "params": {}})
    with pytest.raises(ValueError, match="repetition"):
        CodeParams(repetition=2, bch_m=8, bch_t=4, data_bytes=4)
    with pytest.raises(ValueError, match="does not fit"):
        CodeParams(repetition=1, bch_m=6, bch_t=4, data_bytes=8)
