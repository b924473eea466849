"""Findings of a red-team pass over issues 7 and 8, each kept as a regression test.

Crafted public helper data on the device's own unlock path (no ``--profile``), endless or blocking key inputs,
an existing file at ``enroll -o``, and a container whose header is too large for the content sniffer.
"""

from __future__ import annotations

import os

import pytest
import torch

import chiplock
from chiplock._io import file_kind
from chiplock.cli import run
from chiplock.fingerprint import get_source
from chiplock.keys import INSECURE_FAST, KdfParams

SECRET = b"vendor secret for hostile-input tests"


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def locked(tmp_path, profile):
    path = tmp_path / "m.chiplock"
    chiplock.lock({"w": torch.randn(16, 8)}, path, profile, "pre-aes", SECRET, kdf=KdfParams(**INSECURE_FAST))
    return path


@pytest.mark.parametrize("transform", ["pre-aes", "aes"])
@pytest.mark.parametrize("device", ["mps", 1, None, "cuda:0"])
def test_crafted_precision_device_is_one_clear_error_on_the_device(tmp_path, profile, container_io, transform,
                                                                   device):
    # The helper lives in the embedded licence. pre-aes wraps are unauthenticated (AES-CTR), so the device meets
    # the crafted helper before any check: the source refuses it with one clear error, never a traceback.
    path = tmp_path / "m.chiplock"
    chiplock.lock({"w": torch.randn(16, 8)}, path, profile, transform, SECRET, kdf=KdfParams(**INSECURE_FAST))
    read, write = container_io
    meta, header, data = read(path)
    meta["license"]["sources"][0]["helper"]["device"] = device
    write(path, meta, header, data)
    with pytest.raises(chiplock.FingerprintError, match="the file is damaged, obtain a fresh copy"):
        chiplock.unlock(path, secret=SECRET)  # measures this device from the licence's helper


@pytest.mark.parametrize("transform", ["pre-aes", "aes"])
def test_helper_the_source_accepts_but_was_changed(tmp_path, profile, container_io, transform):
    # An AES-GCM wrap's associated data covers the sources and their helpers: a changed helper the source still
    # accepts is refused as an altered licence. A pre-aes wrap has no check to fail (by design): no error.
    path = tmp_path / "m.chiplock"
    chiplock.lock({"w": torch.randn(16, 8)}, path, profile, transform, SECRET, kdf=KdfParams(**INSECURE_FAST))
    read, write = container_io
    meta, header, data = read(path)
    meta["license"]["sources"][0]["helper"]["extra"] = 1
    write(path, meta, header, data)
    if transform == "aes":
        with pytest.raises(chiplock.InvalidKey, match="or it was altered"):
            chiplock.unlock(path, secret=SECRET)
    else:
        assert set(chiplock.unlock(path, secret=SECRET)) == {"w"}


@pytest.mark.parametrize("exc", [KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError])
def test_source_tripping_over_a_crafted_helper_is_a_container_error(locked, monkeypatch, exc):
    # Whatever a source raises on a helper it failed to bound, the device gets one ContainerError.
    import chiplock.license as license_mod

    real = license_mod.get_source

    class Tripping:
        def __init__(self, src):
            self.src = src

        def reproduce(self, helper):
            raise exc("crafted")

    monkeypatch.setattr(license_mod, "get_source", lambda name, **kw: Tripping(real(name, **kw)))
    with pytest.raises(chiplock.ContainerError, match="public helper data for fingerprint source 'precision' is "
                                                      "malformed"):
        chiplock.unlock(locked, secret=SECRET)


@pytest.mark.parametrize("field, value", [("rounds", 2000), ("rounds", "x"), ("profiles", 40), ("profiles", -1),
                                          ("quantile", float("nan")), ("device", "tpu")])
def test_crafted_clock_helper_is_refused_before_measuring(field, value):
    from chiplock.fingerprint.clock import ClockSource

    helper = {"version": 2, "device": "cpu", "ops": [], "rounds": 100, "quantile": 0.1, "profiles": 3,
              "width": [], "offset": [], "bits": [], "fuzzy": {}, field: value}
    with pytest.raises(chiplock.FingerprintError, match="out of range"):
        ClockSource._check(helper)


@pytest.mark.parametrize("field, value", [("sim_bytes", 2 ** 31), ("sim_bytes", 1.5), ("offset", -1),
                                          ("offset", 2 ** 40), ("fuzzy", 1)])
def test_crafted_sram_helper_is_refused_before_reading(monkeypatch, field, value):
    monkeypatch.setenv("CHIPLOCK_SRAM_SIM_DEVICE", "board-1")
    src = get_source("sram", simulate="board-1")
    helper = dict(src.enroll().helper)
    helper[field] = value
    with pytest.raises(chiplock.FingerprintError, match="damaged"):
        src.reproduce(helper)


def test_endless_secret_input_is_refused_in_one_line(locked, capsys):
    code, err = _cli(["unlock", locked, "--secret-file", "/dev/zero"], capsys)
    assert code == 2 and err.count("\n") == 1 and "larger than 1 MiB" in err


def test_fifo_without_writer_does_not_hang(locked, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err = _cli(["unlock", locked, "--verify-key", fifo, "--secret-file", fifo], capsys)
    assert code == 2 and err.count("\n") == 1


def test_enroll_does_not_replace_an_existing_file(tmp_path, capsys):
    victim = tmp_path / "model.safetensors"
    victim.write_bytes(b"the only copy")
    code, err = _cli(["enroll", "-o", victim], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert victim.read_bytes() == b"the only copy"


def test_container_with_a_header_past_the_sniff_limit_is_still_a_container(locked, monkeypatch, tmp_path):
    import chiplock._io as io

    monkeypatch.setattr(io, "_SNIFF_LIMIT", 16)  # as if the header were larger than the parse limit
    assert file_kind(locked) == "container"
    plain = tmp_path / "p.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    assert file_kind(plain) in ("safetensors", "other")
    with pytest.raises(chiplock.OutputError):
        io.check_output(locked, kind="weights", force=True)


def test_public_fingerprint_output_has_no_timing(capsys):
    """The precision suite's run time tells one thread from several, so it is configuration: --sensitive only."""
    import json

    capsys.readouterr()
    assert run(["fingerprint", "--json"]) == 0
    public = json.loads(capsys.readouterr().out)
    assert "seconds" not in json.dumps(public)
    assert run(["fingerprint", "--json", "--sensitive"]) == 0
    assert "seconds" in capsys.readouterr().out


def test_profile_fifo_without_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "device.json"
    os.mkfifo(fifo)
    with pytest.raises(chiplock.ProfileError):
        chiplock.DeviceProfile.load(fifo)
