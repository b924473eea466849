"""Clock source: the quantise/select/decode mechanism on deterministic fake timings, plus one real smoke test."""

import json

import numpy as np
import pytest

from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
from chiplock.fingerprint.clock import ClockSource, gray, profile_from_timings, quantise


class FakeDevice:
    """Profiles = a fixed device vector + Gaussian noise, with optional rare large jumps."""

    def __init__(self, seed, noise=0.02, n_ops=20, jump_every=0, jump=0.5):
        self.centre = np.random.default_rng(seed).normal(0.0, 0.8, n_ops)
        self.rng = np.random.default_rng(seed + 1000)
        self.noise, self.jump_every, self.jump, self.calls = noise, jump_every, jump, 0

    def __call__(self):
        self.calls += 1
        x = self.centre + self.rng.normal(0.0, self.noise, self.centre.size)
        if self.jump_every and self.calls % self.jump_every == 0:
            x[self.calls % x.size] += self.jump
        return x


def test_gray_code_neighbours_differ_in_one_bit():
    for b in (1, 2, 3, 4):
        codes = [gray(np.array([v]), np.array([b])) for v in range(1 << b)]
        for v in range(1 << b):
            assert (codes[v] != codes[(v + 1) % (1 << b)]).sum() == 1
    assert gray(np.array([-1]), np.array([2])).tolist() == gray(np.array([3]), np.array([2])).tolist()


def test_enrolled_value_sits_in_the_middle_of_its_bin():
    x, w = np.array([0.37, -1.2]), np.array([0.2, 0.5])
    offset = np.mod(x - w / 2, w)
    q = quantise(x, w, offset)
    assert (quantise(x + 0.49 * w, w, offset) == q).all() and (quantise(x - 0.49 * w, w, offset) == q).all()
    assert (quantise(x + 0.51 * w, w, offset) != q).all()


def test_profile_normalises_frequency():
    t = np.abs(np.random.default_rng(0).normal(1000, 50, (100, 5))) * np.array([1, 2, 4, 8, 16])
    assert np.allclose(profile_from_timings(t), profile_from_timings(t * 1.7))
    with pytest.raises(FingerprintError, match="timer"):
        profile_from_timings(np.zeros((10, 3)))


def test_same_fake_device_reproduces_every_time():
    src = ClockSource(measure=FakeDevice(1))
    e = src.enroll()
    assert all(src.reproduce(e.helper) == e.material for _ in range(200))
    assert e.info["enroll_ber"] == 0.0


def test_rare_jumps_are_absorbed_by_the_median_of_profiles():
    dev = FakeDevice(2, jump_every=7, jump=1.0)
    src = ClockSource(measure=dev)  # median of 3 profiles: one jumped profile cannot move a feature
    e = src.enroll()
    assert sum(src.reproduce(e.helper) == e.material for _ in range(100)) == 100


def test_small_drift_is_corrected_by_bch():
    dev = FakeDevice(6, noise=0.0)
    src = ClockSource(measure=dev, reproduce_profiles=1, sigma_floor=0.05)
    e = src.enroll()
    # Push two features just past their bin edge: two Gray bits flip, within BCH's t=2.
    w = np.asarray(e.helper["width"])
    dev.centre = dev.centre.copy()
    dev.centre[[0, 5]] += 0.6 * w[[0, 5]]
    assert (src.raw_bits(e.helper) != ClockSource(measure=FakeDevice(6, noise=0.0)).raw_bits(e.helper)).sum() == 2
    assert src.reproduce(e.helper) == e.material


def test_other_fake_devices_fail_or_differ():
    e = ClockSource(measure=FakeDevice(3)).enroll()
    for seed in range(10, 30):
        other = ClockSource(measure=FakeDevice(seed))
        try:
            assert other.reproduce(e.helper) != e.material
        except FingerprintError as exc:
            assert "not the enrolled device" in str(exc)


def test_noisier_features_get_wider_bins_and_less_credit():
    quiet = ClockSource(measure=FakeDevice(4, noise=0.01)).enroll()
    noisy = ClockSource(measure=FakeDevice(4, noise=0.2)).enroll()
    assert np.mean(noisy.helper["width"]) > np.mean(quiet.helper["width"])
    assert noisy.info["credit_bits"] < quiet.info["credit_bits"]
    for e in (quiet, noisy):
        assert 0.0 <= e.entropy_bits <= e.info["credit_bits"] - e.info["leakage_bits"] + 1e-9
        assert e.material.hex() not in json.dumps(e.helper)


def test_bad_helpers():
    src = ClockSource(measure=FakeDevice(5))
    e = src.enroll()
    with pytest.raises(FingerprintError, match="unknown version"):
        src.reproduce({**e.helper, "version": 99})
    with pytest.raises(FingerprintError, match="number of features"):
        ClockSource(measure=FakeDevice(5, n_ops=7)).reproduce(e.helper)
    with pytest.raises(ValueError, match="device"):
        ClockSource(device="tpu")


def test_real_cpu_clock_smoke():
    # On a shared machine the real timings are noisy: this checks that the pipeline runs and is fast enough,
    # not the reproduction rate (benchmarks/fingerprint_clock.py measures that on a quiet machine).
    src = get_source("clock", rounds=20, enroll_profiles=3, reproduce_profiles=1)
    e = src.enroll()
    assert e.info["n_bits"] >= 20 and e.entropy_bits >= 0.0
    assert e.info["seconds_per_profile"] < 3.0
    bits = src.raw_bits(e.helper)
    assert bits.size == e.info["n_bits"] and set(np.unique(bits)) <= {0, 1}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_clock_without_gpu_says_what_to_do():
    with pytest.raises(FingerprintError, match="CUDA GPU"):
        get_source("clock", device="cuda").enroll()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU and nvcc; CI has none")
def test_cuda_clock_reproduces():
    src = get_source("clock", device="cuda", enroll_profiles=4)
    e = src.enroll()
    assert src.reproduce(e.helper) == e.material
