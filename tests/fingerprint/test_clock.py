"""Clock source: the quantise/select/decode mechanism on deterministic fake timings, the Argon2id check on
decoded material, the cross-machine entropy credit, plus real smoke tests."""

import itertools
import json
import math

import numpy as np
import pytest

import chiplock.fingerprint.clock as clock
import chiplock.keys.kdf as kdf
from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
from chiplock.fingerprint.clock import (CHECK_COST, CROSS_MACHINE_BITS, ClockSource, Variant,
                                        check_value, cross_machine_test, gray, profile_from_timings, quantise)
from chiplock.keys.fuzzy import FuzzyExtractor
from chiplock.keys.kdf import INSECURE_FAST, KdfParams

#: A cheap check for fake devices; the real default (64 MiB Argon2id) is exercised by the tests that say so.
FAST = dict(INSECURE_FAST)


def fake_source(measure, **kw):
    return ClockSource(measure=measure, check_cost=FAST, **kw)


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
    src = fake_source(FakeDevice(1))
    e = src.enroll()
    assert all(src.reproduce(e.helper) == e.material for _ in range(200))
    assert e.info["enroll_ber"] == 0.0


def test_rare_jumps_are_absorbed_by_the_median_of_profiles():
    dev = FakeDevice(2, jump_every=7, jump=1.0)
    src = fake_source(dev)  # median of 3 profiles: one jumped profile cannot move a feature
    e = src.enroll()
    assert sum(src.reproduce(e.helper) == e.material for _ in range(100)) == 100


def test_small_drift_is_corrected_by_bch():
    dev = FakeDevice(6, noise=0.0)
    src = fake_source(dev, reproduce_profiles=1, sigma_floor=0.05)
    e = src.enroll()
    # Push two features just past their bin edge: two Gray bits flip, within BCH's t=2.
    w = np.asarray(e.helper["width"])
    dev.centre = dev.centre.copy()
    dev.centre[[0, 5]] += 0.6 * w[[0, 5]]
    assert (src.raw_bits(e.helper) != fake_source(FakeDevice(6, noise=0.0)).raw_bits(e.helper)).sum() == 2
    assert src.reproduce(e.helper) == e.material


def test_other_fake_devices_fail_or_differ():
    e = fake_source(FakeDevice(3)).enroll()
    for seed in range(10, 30):
        other = fake_source(FakeDevice(seed))
        try:
            assert other.reproduce(e.helper) != e.material
        except FingerprintError as exc:
            assert "did not reproduce the enrolled key in 5 measurements" in str(exc)
            assert "retry on an idle machine" in str(exc)


def test_noisier_features_get_wider_bins_and_less_credit():
    quiet = fake_source(FakeDevice(4, noise=0.01)).enroll()
    noisy = fake_source(FakeDevice(4, noise=0.2)).enroll()
    assert np.mean(noisy.helper["width"]) > np.mean(quiet.helper["width"])
    assert noisy.info["credit_bits"] < quiet.info["credit_bits"]
    for e in (quiet, noisy):
        assert 0.0 <= e.entropy_bits <= e.info["credit_bits"] - e.info["leakage_bits"] + 1e-9
        assert e.material.hex() not in json.dumps(e.helper)


def test_bad_helpers():
    src = fake_source(FakeDevice(5))
    e = src.enroll()
    with pytest.raises(FingerprintError, match="unknown version"):
        src.reproduce({**e.helper, "version": 99})
    for bad in ({"check": None}, {"check": {**e.helper["check"], "bits": 17}},
                {"check": {**e.helper["check"], "memory_kib": 1 << 40}},
                {"check": {**e.helper["check"], "value": "zz"}}):
        with pytest.raises(FingerprintError, match="check value is damaged"):
            src.reproduce({**e.helper, **bad})
    with pytest.raises(FingerprintError, match="number of features"):
        fake_source(FakeDevice(5, n_ops=7)).reproduce(e.helper)
    with pytest.raises(ValueError, match="device"):
        ClockSource(device="tpu")
    with pytest.raises(ValueError, match="check_cost"):
        ClockSource(check_cost={"iterations": 1})
    with pytest.raises(ValueError, match="cross_machine"):
        ClockSource(measure=FakeDevice(5), cross_machine=True)
    with pytest.raises(ValueError, match="1..16"):
        check_value(b"m", KdfParams(**FAST), bits=17)


class Script:
    """A fake device that returns scripted profiles (one per call), then the true centre forever."""

    def __init__(self, centre, script):
        self.centre, self.script, self.calls = centre, list(script), 0

    def __call__(self):
        self.calls += 1
        return self.script.pop(0) if self.script else self.centre


def _miscorrecting_profile(dev, e):
    """A profile that BCH decodes without error to a *wrong* reading: three features one bin off."""
    w = np.asarray(e.helper["width"])
    fe, fuzzy = FuzzyExtractor.from_helper(e.helper["fuzzy"]), e.helper["fuzzy"]
    for idx in itertools.combinations(range(w.size), 3):
        x = dev.centre.copy()
        x[list(idx)] += 0.6 * w[list(idx)]
        bits = fake_source(lambda: x).raw_bits({**e.helper, "profiles": 1})
        try:
            if fe.reproduce(bits, fuzzy) != e.material:
                return x
        except FingerprintError:
            continue
    raise AssertionError("no 3-flip pattern miscorrects; the test needs another fake device")


class CountingArgon2id:
    """Wraps cryptography's Argon2id (as the check's MasterKDF calls it) and records every derivation's cost."""

    calls = []

    def __init__(self, **kw):
        self.kw = kw

    def derive(self, data):
        CountingArgon2id.calls.append(self.kw)
        return clock_argon2id(**self.kw).derive(data)


clock_argon2id = kdf.Argon2id


def test_wrong_decode_is_detected_by_the_check_and_measured_again(monkeypatch):
    dev = FakeDevice(6, noise=0.0)
    e = fake_source(dev, sigma_floor=0.05).enroll()
    wrong = _miscorrecting_profile(dev, e)
    monkeypatch.setattr(kdf, "Argon2id", CountingArgon2id)
    CountingArgon2id.calls = []
    # The first measurement (3 profiles) decodes to a wrong key without a BCH error; the check rejects it and the
    # second measurement (median of its own profiles, and of all six) gives the enrolled key.
    script = Script(dev.centre, [wrong] * 3)
    assert fake_source(script, sigma_floor=0.05).reproduce(e.helper) == e.material
    assert script.calls == 6 and len(CountingArgon2id.calls) == 2
    # Without the check (a version-1 helper) the same readings return the wrong key silently.
    old = {k: v for k, v in e.helper.items() if k != "check"} | {"version": 1}
    assert fake_source(Script(dev.centre, [wrong] * 3)).reproduce(old) != e.material
    # A reading that stays wrong is never accepted.
    with pytest.raises(FingerprintError, match=r"too busy or noisy now \(retry on an idle machine\)"):
        fake_source(lambda: wrong).reproduce(e.helper, attempts=3)


def test_the_check_costs_an_argon2id_with_the_stored_parameters(monkeypatch):
    dev = FakeDevice(7)
    e = ClockSource(measure=dev).enroll()  # The real default cost.
    c = e.helper["check"]
    assert (c["iterations"], c["lanes"], c["memory_kib"], c["bits"]) == (
        CHECK_COST["iterations"], CHECK_COST["lanes"], CHECK_COST["memory_kib"], 16)
    assert CHECK_COST["memory_kib"] >= 64 * 1024 and len(bytes.fromhex(c["value"])) == 2
    monkeypatch.setattr(kdf, "Argon2id", CountingArgon2id)
    CountingArgon2id.calls = []
    assert ClockSource(measure=dev).reproduce(e.helper) == e.material
    assert CountingArgon2id.calls == [{"salt": bytes.fromhex(c["salt"]), "length": 32, "iterations": c["iterations"],
                                       "lanes": c["lanes"], "memory_cost": c["memory_kib"]}]


def test_check_value_depends_on_material_and_salt_and_has_at_most_16_bits():
    p, q = KdfParams(**FAST), KdfParams(**FAST)
    values = {check_value(bytes([i]) * 32, p) for i in range(64)}
    assert len(values) > 50  # 64 draws from 2**16 values rarely collide more than a few times.
    assert check_value(b"a" * 32, p) == check_value(b"a" * 32, p)
    assert any(check_value(bytes([i]) * 32, p) != check_value(bytes([i]) * 32, q) for i in range(4))
    assert all(int.from_bytes(check_value(bytes([i]) * 32, p, bits=4), "big") < 16 for i in range(32))


def test_entropy_bits_credit_what_other_machines_do_not_reproduce():
    e = fake_source(FakeDevice(8, noise=0.01), sigma_floor=0.01).enroll()
    assert e.info["within_machine_bits"] > 0  # The bins alone would claim something...
    assert e.entropy_bits == CROSS_MACHINE_BITS == 0.0  # ...but machines of the same kind reproduce the key.
    assert e.info["within_machine_bits"] <= e.info["credit_bits"] - e.info["leakage_bits"] - e.info["check_bits"]
    assert "not a unit" in e.info["entropy_note"]


def test_cross_machine_result_counts_distinct_keys(monkeypatch):
    e = fake_source(FakeDevice(9)).enroll()
    import hashlib

    mine = hashlib.sha256(b"chiplock/clock-cross/v1" + e.material).hexdigest()
    answers = {"a": {"key": mine}, "b": {"key": "11" * 32}, "c": {"error": "too busy"}, "d": {"key": "11" * 32},
               "e": {"key": "22" * 32}}
    monkeypatch.setattr(clock, "_run_variant", lambda v, path, timeout: answers[v.name])
    r = cross_machine_test(e.helper, e.material, variants=[Variant(n) for n in answers])
    assert r.outcomes == {"a": "enrolled key", "b": "other key 1", "c": "failed: too busy", "d": "other key 1",
                          "e": "other key 2"}
    assert r.distinct_keys == 3 and r.reproduced == 1 and r.credited_bits == pytest.approx(math.log2(3))
    same = cross_machine_test(e.helper, e.material, variants=[Variant("a")])
    assert same.credited_bits == 0.0 and same.to_json()["reproduced"] == 1


def test_default_variants_cover_the_issue_list():
    names = " ".join(v.name for v in clock.default_variants())
    for part in ("1 thread", "8 threads", "pinned to cpu", "busy loop on cpu", "busy loop on the same cpu",
                 "ATEN_CPU_CAPABILITY=default", "NPY_DISABLE_CPU_FEATURES", "every ISA limit"):
        assert part in names


def test_real_cpu_clock_smoke():
    # On a shared machine the real timings are noisy: this checks that the pipeline runs and is fast enough,
    # not the reproduction rate (benchmarks/fingerprint_clock.py measures that on a quiet machine).
    src = get_source("clock", rounds=20, enroll_profiles=3, reproduce_profiles=1, check_cost=FAST)
    e = src.enroll()
    assert e.info["n_bits"] >= 20 and e.entropy_bits >= 0.0
    assert e.info["seconds_per_profile"] < 3.0
    bits = src.raw_bits(e.helper)
    assert bits.size == e.info["n_bits"] and set(np.unique(bits)) <= {0, 1}


@pytest.mark.slow
def test_real_cross_machine_fresh_processes():
    # Two real variants in fresh processes (about 10 s): each must either reproduce a key or fail cleanly, and the
    # credit must be log2 of the distinct keys seen.
    e = get_source("clock", rounds=30, enroll_profiles=3, check_cost=FAST).enroll()
    variants = [Variant("fresh process"), Variant("ATEN default", {"ATEN_CPU_CAPABILITY": "default"}, cpus=(0,))]
    r = cross_machine_test(e.helper, e.material, variants=variants, timeout=120)
    assert set(r.outcomes) == {"fresh process", "ATEN default"}
    allowed = ("enrolled key", "other key", "failed: the clock timing")
    assert all(o.startswith(allowed) for o in r.outcomes.values())
    assert r.credited_bits == math.log2(r.distinct_keys)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_clock_without_gpu_says_what_to_do():
    with pytest.raises(FingerprintError, match="CUDA GPU"):
        get_source("clock", device="cuda").enroll()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU and nvcc; CI has none")
def test_cuda_clock_reproduces():
    src = get_source("clock", device="cuda", enroll_profiles=4)
    e = src.enroll()
    assert src.reproduce(e.helper) == e.material
