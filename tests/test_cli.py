"""The command line end to end: enroll -> lock -> inspect -> unlock, errors, and the demo."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from chiplock.cli import app, main

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    save_file({"w": torch.randn(64, 32), "b": torch.arange(5, dtype=torch.int32)}, str(path))
    return path


@pytest.mark.parametrize("transform", ["aes", "shuffle", "pre-aes"])
def test_enroll_lock_unlock_round_trip(tmp_path, model_file, transform):
    profile, locked, plain = tmp_path / "device.json", tmp_path / "m.chiplock", tmp_path / "plain.safetensors"
    assert runner.invoke(app, ["enroll", "-o", str(profile)]).exit_code == 0
    res = runner.invoke(app, ["lock", str(model_file), "--profile", str(profile), "--transform", transform,
                              "-o", str(locked), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout[res.stdout.index("{"):])
    assert info["transform"] == transform and set(info["tensors"]) == {"w", "b"}

    res = runner.invoke(app, ["unlock", str(locked), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["written"] is None
    assert not plain.exists()

    assert runner.invoke(app, ["unlock", str(locked), "-o", str(plain)]).exit_code == 0
    original, unlocked = load_file(str(model_file)), load_file(str(plain))
    assert all(torch.equal(original[k], unlocked[k]) for k in original)


def test_inspect_json_needs_no_key(tmp_path, model_file):
    profile, locked = tmp_path / "device.json", tmp_path / "m.chiplock"
    runner.invoke(app, ["enroll", "-o", str(profile)])
    runner.invoke(app, ["lock", str(model_file), "--profile", str(profile), "-o", str(locked)])
    res = runner.invoke(app, ["inspect", str(locked), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["tensors"]["w"] == {"dtype": "F32", "shape": [64, 32]}
    assert info["transform"] == "pre-aes"


def test_bad_file_gives_one_line_error_and_exit_code_2(tmp_path, monkeypatch, capsys):
    bogus = tmp_path / "not-a-model.chiplock"
    bogus.write_bytes(b"hello, this is not a container")
    monkeypatch.setattr("sys.argv", ["chiplock", "inspect", str(bogus)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not an intact chiplock container" in err and "Traceback" not in err


def test_missing_profile_is_reported(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["chiplock", "lock", str(model_file), "--profile", str(tmp_path / "no.json"),
                                     "-o", str(tmp_path / "m.chiplock")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "chiplock enroll" in capsys.readouterr().err
    assert not (tmp_path / "m.chiplock").exists()


@pytest.mark.slow
def test_demo_writes_report_with_authorized_and_unauthorized_accuracy(tmp_path):
    from chiplock.demo import run_demo

    report = run_demo(tmp_path / "report", say=lambda s: None)
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "report" / "weights_hist.png").stat().st_size > 0
    assert "| pre-aes |" in report.read_text()
    assert not data["same_fingerprint"]
    for r in data["results"]:
        assert r["bit_exact"] and r["acc_here"] == pytest.approx(data["accuracy_original"])
        assert r["acc_other"] <= 0.10 + 0.05, r  # chance + 5 %
    pre = next(r for r in data["results"] if r["transform"] == "pre-aes")
    assert pre["ks_p"] > 0.01
