"""`chiplock softlock train` and `chiplock softlock eval` end to end on a tiny ResNet and the 8x8 digits."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from chiplock.cli import app
from chiplock.softlock.model_io import load_model


def test_train_then_eval(tmp_path):
    runner = CliRunner()
    out = tmp_path / "locked.safetensors"
    r = runner.invoke(app, ["softlock", "train", "--authorized", "fp16", "--unauthorized", "int8", "--data", "digits8",
                            "--width", "2", "--pretrain-epochs", "1", "--epochs", "1", "--max-train", "256",
                            "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    model, info = load_model(out)
    assert info["lock"]["authorized"]["type"] == "MiniFloat" and info["role"] == "locked"
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(model.state_dict())  # a plain model file, nothing extra
    orig = tmp_path / "locked.original.safetensors"
    r = runner.invoke(app, ["softlock", "eval", str(out), "--original", str(orig), "--config", "fp32",
                            "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "fp16 -> int8" in r.output
    rep = json.loads((tmp_path / "rep" / "softlock_eval.json").read_text())
    row = rep["rows"][0]
    assert abs(row["delta_lock"] - (rep["locked"]["fp16"] - rep["locked"]["int8"])) < 1e-12
    assert abs(row["delta_orig"] - (rep["original"]["fp16"] - rep["locked"]["fp16"])) < 1e-12
    assert (tmp_path / "rep" / "softlock_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "Δorig" in (tmp_path / "rep" / "softlock_eval.md").read_text()


def test_unknown_format_is_a_clean_error(tmp_path):
    r = CliRunner().invoke(app, ["softlock", "train", "--unauthorized", "fp12", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert "unknown configuration 'fp12'" in str(r.exception)
