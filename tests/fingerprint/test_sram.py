"""SRAM PUF source: simulated devices and dump files through enroll/reproduce."""

import json

import numpy as np
import pytest

from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
from chiplock.fingerprint.sram import simulated_device_bits


@pytest.fixture(scope="module")
def board():
    src = get_source("sram", simulate="board-a", noise=0.10, read_seed=1)
    return src, src.enroll()


def test_enrollment_is_honest_and_helper_public(board):
    src, e = board
    # A simulated PUF binds nothing (its bits follow from its name): credited 0; the code design is for >= 128.
    assert e.entropy_bits == 0.0 and e.info["design_entropy_bits"] >= 128
    assert e.info["leakage_bits"] + e.info["design_entropy_bits"] <= e.info["code_bits"]
    text = json.dumps(e.helper)
    assert "board-a" not in text and e.material.hex() not in text
    assert e.helper["mode"] == "simulated"


def test_same_device_reproduces(board):
    src, e = board
    again = get_source("sram", simulate="board-a", noise=0.10)
    assert all(again.reproduce(e.helper) == e.material for _ in range(50))


def test_other_devices_never_reproduce(board):
    _, e = board
    for i in range(20):
        other = get_source("sram", simulate=f"board-{i}", noise=0.10)
        try:
            assert other.reproduce(e.helper) != e.material
        except FingerprintError as exc:
            assert "not the enrolled device" in str(exc)


def test_device_bits_are_independent_between_devices():
    a, b = simulated_device_bits("x", 4096), simulated_device_bits("y", 4096)
    assert 0.45 < (a != b).mean() < 0.55
    assert (simulated_device_bits("x", 4096) == a).all()


def test_device_identity_comes_from_options_or_env(board, monkeypatch):
    _, e = board
    monkeypatch.delenv("CHIPLOCK_SRAM_SIM_DEVICE", raising=False)
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    with pytest.raises(FingerprintError, match="CHIPLOCK_SRAM_SIM_DEVICE"):
        get_source("sram").reproduce(e.helper)
    monkeypatch.setenv("CHIPLOCK_SRAM_SIM_DEVICE", "board-a")
    assert get_source("sram").reproduce(e.helper) == e.material


def test_dump_files(tmp_path, monkeypatch):
    truth = simulated_device_bits("chip", 4096)
    rng = np.random.default_rng(4)
    paths = []
    for i in range(5):
        p = tmp_path / f"dump{i}.bin"
        p.write_bytes(np.packbits(truth ^ (rng.random(truth.size) < 0.05)).tobytes())
        paths.append(p)
    e = get_source("sram", path=paths, ber=0.10).enroll()
    assert e.helper["mode"] == "dump" and str(tmp_path) not in json.dumps(e.helper)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(np.packbits(truth ^ (rng.random(truth.size) < 0.05)).tobytes())
    monkeypatch.setenv("CHIPLOCK_SRAM_DUMP", str(fresh))
    assert get_source("sram").reproduce(e.helper) == e.material
    with pytest.raises(FingerprintError, match="cannot read SRAM dump"):
        get_source("sram", path=tmp_path / "missing.bin").reproduce(e.helper)
    small = tmp_path / "small.bin"
    small.write_bytes(b"\0" * 16)
    with pytest.raises(FingerprintError, match="needs"):
        get_source("sram", path=small).reproduce(e.helper)


def test_no_reading_configured(monkeypatch):
    monkeypatch.delenv("CHIPLOCK_SRAM_SIM_DEVICE", raising=False)
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    with pytest.raises(FingerprintError, match="CHIPLOCK_SRAM_DUMP"):
        get_source("sram").enroll()
    with pytest.raises(ValueError, match="noise"):
        get_source("sram", simulate="x", noise=0.7)
