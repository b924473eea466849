"""The new sources through the public verbs: enroll -> lock -> unlock on this device, and on another."""


import pytest
import torch

import chiplock
from chiplock.errors import FingerprintError
from chiplock.keys.kdf import INSECURE_FAST, KdfParams


@pytest.fixture()
def weights():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}


def test_simulated_sram_locks_and_unlocks_without_a_profile(tmp_path, weights, monkeypatch):
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    profile = chiplock.enroll(("sram",), options={"sram": {"simulate": "board-7", "noise": 0.1}})
    # A simulated PUF is a function of its name: credited 0 bits, so locking to it alone is refused as weak.
    assert profile.entropy_bits() == 0.0 and profile.enrollments[0].info["design_entropy_bits"] >= 128
    path = tmp_path / "m.chiplock"
    with pytest.raises(chiplock.WeakKey):
        chiplock.lock(weights, path, profile, transform="aes", kdf=KdfParams(**INSECURE_FAST))
    with pytest.warns(chiplock.LowEntropyWarning):
        chiplock.lock(weights, path, profile, transform="aes", kdf=KdfParams(**INSECURE_FAST), allow_weak_key=True)
    assert b"board-7" not in path.read_bytes()
    monkeypatch.setenv("CHIPLOCK_SRAM_SIM_DEVICE", "board-7")
    out = chiplock.unlock(path)
    assert all(torch.equal(out[k], weights[k]) for k in weights)
    monkeypatch.setenv("CHIPLOCK_SRAM_SIM_DEVICE", "board-8")
    with pytest.raises(FingerprintError, match="not the enrolled device"):
        chiplock.unlock(path)
    monkeypatch.delenv("CHIPLOCK_SRAM_SIM_DEVICE")
    with pytest.raises(FingerprintError, match="CHIPLOCK_SRAM_SIM_DEVICE"):
        chiplock.unlock(path)


def test_low_entropy_clock_profile_is_refused_unless_allowed(tmp_path, weights):
    from chiplock.errors import WeakKey
    from chiplock.fingerprint.base import Enrollment
    from chiplock.profile import DeviceProfile

    profile = DeviceProfile(enrollments=(Enrollment("clock", {}, b"m" * 32, 6.4),))
    with pytest.raises(WeakKey, match="6.4 bits"):
        chiplock.lock(weights, tmp_path / "c.chiplock", profile, transform="aes", kdf=KdfParams(**INSECURE_FAST))
    with pytest.warns(chiplock.LowEntropyWarning, match="6.4 bits"):
        chiplock.lock(weights, tmp_path / "c.chiplock", profile, transform="aes", kdf=KdfParams(**INSECURE_FAST),
                      allow_weak_key=True)
