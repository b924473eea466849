"""`chiplock neuronlock train|issue|eval|attack`: one-line errors, and train -> issue -> eval end to end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from chiplock.cli import run
from cli_helpers import one_line_error, run_cli, synthetic_device
from chiplock.license import ContentKeys, License

TINY = ["--data", "digits8", "--arch", "smallcnn", "--width", "4", "--pretrain-epochs", "1", "--lock-epochs", "1",
        "--max-train", "128", "--calib", "32"]


_cli, _one_line_error = run_cli, one_line_error
_device = synthetic_device


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny neuron-locked model on the 8x8 digits, its keys file and the train command's JSON summary."""
    d = tmp_path_factory.mktemp("neuronlock")
    out = io.StringIO()  # capsys is function-scoped: capture the module fixture's output by hand.
    with contextlib.redirect_stdout(out):
        code = run(["neuronlock", "train", *TINY, "-o", str(d / "m.safetensors"), "--json"])
    assert code == 0
    return d, json.loads(out.getvalue())


def test_help_lists_the_commands(capsys):
    code, out, _ = _cli(["neuronlock", "--help"], capsys)
    assert code == 0
    for name in ("train", "issue", "eval", "attack"):
        assert name in out
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0 and "neuronlock" in out


def test_train_writes_a_model_and_private_keys(trained):
    d, summary = trained
    from chiplock.neuronlock.model_io import load_model

    keys = ContentKeys.load(d / "m.safetensors.keys")
    assert stat.S_IMODE(os.stat(d / "m.safetensors.keys").st_mode) == 0o600
    assert list(keys.groups) == ["neuronlock"] and keys.silent("neuronlock")
    _, info = load_model(d / "m.safetensors")
    assert info.extra["content_id"] == keys.content_id.hex() and info.extra["data"] == "digits8"
    # The key never lands in the public model file.
    assert keys.groups["neuronlock"].key.hex().encode() not in (d / "m.safetensors").read_bytes()
    assert keys.groups["neuronlock"].key not in (d / "m.safetensors").read_bytes()
    assert summary["authorization_neurons"] >= summary["locked_layers"] >= 1
    for k in ("original", "authorized", "natural"):
        assert 0.0 <= summary[k] <= 1.0


def _evaluate_with(model_path: Path, key: bytes) -> float:
    from chiplock.neuronlock.model_io import load_model
    from chiplock.neuronlock.password import derive_password
    from chiplock.neuronlock.train import evaluate
    from chiplock.softlock.pipeline import load_dataset

    model, info = load_model(model_path)
    ds = load_dataset("digits8")
    return evaluate(model, ds.x_test, ds.y_test, derive_password(key, info.stats, info.spec))


def test_issue_and_eval_on_the_right_and_a_wrong_device(trained, tmp_path, capsys):
    d, _ = trained
    model = d / "m.safetensors"
    keys = ContentKeys.load(d / "m.safetensors.keys")
    right, wrong = _device(tmp_path / "right.json"), _device(tmp_path / "wrong.json")
    code, _, err = _cli(["neuronlock", "issue", model, "--profile", tmp_path / "right.json",
                         "-o", tmp_path / "right.lic"], capsys)
    assert code == 0, err
    lic = License.load(tmp_path / "right.lic")
    assert lic.groups == ("neuronlock",) and lic.silent

    code, out, err = _cli(["neuronlock", "eval", model, "--keys", d / "m.safetensors.keys", "--wrong-keys", "2",
                           "--json"], capsys)
    assert code == 0, err
    vendor = json.loads(out)
    expected = _evaluate_with(model, keys.groups["neuronlock"].key)
    assert vendor["accuracy"] == expected and vendor["key_from"] == "keys file" and vendor["wrong_passwords"] == 2

    code, out, err = _cli(["neuronlock", "eval", model, "--license", tmp_path / "right.lic", "--profile",
                           tmp_path / "right.json", "--wrong-keys", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == expected  # The device re-derives the vendor's password.

    # A wrong device opens the licence without any error and evaluates with its own (wrong) password.
    code, out, err = _cli(["neuronlock", "eval", model, "--license", tmp_path / "right.lic", "--profile",
                           tmp_path / "wrong.json", "--wrong-keys", "0", "--json"], capsys)
    assert code == 0, err
    from chiplock.neuronlock.keys import password_key

    wrong_key = password_key(lic, profile=wrong)
    assert wrong_key != keys.groups["neuronlock"].key and password_key(lic, profile=right) == \
        keys.groups["neuronlock"].key
    assert json.loads(out)["accuracy"] == _evaluate_with(model, wrong_key)

    code, out, err = _cli(["neuronlock", "eval", model, "--keys", d / "m.safetensors.keys", "--wrong-keys", "1"],
                          capsys)
    assert code == 0, err
    assert "natural" in out and "chance" in out


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    d, _ = trained
    model = d / "m.safetensors"
    _one_line_error(*_cli(["neuronlock", "eval", model], capsys)[::2], "exactly one of --keys")
    _one_line_error(*_cli(["neuronlock", "eval", tmp_path / "nope.safetensors", "--keys", "k"], capsys)[::2],
                    "not found")
    _one_line_error(*_cli(["neuronlock", "eval", model, "--keys", d / "m.safetensors.keys", "--profile", "p.json"],
                          capsys)[::2], "go with --license")
    ContentKeys.new({"neuronlock": "pre-aes"}).save(tmp_path / "other.keys")
    _one_line_error(*_cli(["neuronlock", "eval", model, "--keys", tmp_path / "other.keys"], capsys)[::2],
                    "another model")
    ContentKeys.new({"main": "aes"}).save(tmp_path / "container.keys")
    _one_line_error(*_cli(["neuronlock", "eval", model, "--keys", tmp_path / "container.keys"], capsys)[::2],
                    "no 'neuronlock' group")
    _one_line_error(*_cli(["neuronlock", "eval", d / "m.safetensors.keys", "--keys", d / "m.safetensors.keys"],
                          capsys)[::2], "not a valid neuron-locked model")
    # A licence of another model is refused (the model records its content id).
    other = ContentKeys.new({"neuronlock": "pre-aes"})
    from chiplock.neuronlock.keys import issue

    issue(other, _device(tmp_path / "dev.json")).save(tmp_path / "other.lic")
    _one_line_error(*_cli(["neuronlock", "eval", model, "--license", tmp_path / "other.lic", "--profile",
                           tmp_path / "dev.json"], capsys)[::2], "another model")


def test_train_errors_are_one_line_and_come_before_training(trained, tmp_path, capsys):
    d, _ = trained
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "--gamma", "1.5", "-o", tmp_path / "m"], capsys)[::2],
                    "gamma")
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "--mode", "sometimes", "-o", tmp_path / "m"],
                          capsys)[::2], "mode")
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "--wrong-fraction", "2", "-o", tmp_path / "m"],
                          capsys)[::2], "wrong_fraction")
    _one_line_error(*_cli(["neuronlock", "train", "--data", "cifar", "-o", tmp_path / "m"], capsys)[::2],
                    "unknown data set")
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "--arch", "vgg", "-o", tmp_path / "m"], capsys)[::2],
                    "unknown architecture")
    # Another model's keys are never replaced, even with --force; nothing is written.
    code, _, err = _cli(["neuronlock", "train", *TINY, "-o", tmp_path / "n.safetensors", "--keys-out",
                         d / "m.safetensors.keys", "--force"], capsys)
    _one_line_error(code, err, "holds the content keys of another model")
    assert not (tmp_path / "n.safetensors").exists()
    (tmp_path / "junk").write_text("x")
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "-o", tmp_path / "n.safetensors", "--keys-out",
                           tmp_path / "junk"], capsys)[::2], "--force")
    _one_line_error(*_cli(["neuronlock", "train", *TINY, "-o", tmp_path / "n", "--keys-out", tmp_path / "n"],
                          capsys)[::2], "output")


def test_issue_errors_are_one_line(trained, tmp_path, capsys):
    d, _ = trained
    model = d / "m.safetensors"
    _one_line_error(*_cli(["neuronlock", "issue", model, "--profile", tmp_path / "none.json", "-o",
                           tmp_path / "x.lic"], capsys)[::2], "device profile")
    _device(tmp_path / "dev.json")
    (tmp_path / "x.lic").write_text("{}")
    _one_line_error(*_cli(["neuronlock", "issue", model, "--profile", tmp_path / "dev.json", "-o",
                           tmp_path / "x.lic"], capsys)[::2], "already exists")
    _one_line_error(*_cli(["neuronlock", "issue", model, "--keys", tmp_path / "none.keys", "--profile",
                           tmp_path / "dev.json", "-o", tmp_path / "y.lic"], capsys)[::2], "content keys file")


def test_attack_errors_are_one_line(capsys, tmp_path):
    _one_line_error(*_cli(["neuronlock", "attack", "--preset", "huge", "-o", tmp_path], capsys)[::2],
                    "unknown preset")
    _one_line_error(*_cli(["neuronlock", "attack", "--set", "help=1"], capsys)[::2], "ft_fractions")
    _one_line_error(*_cli(["neuronlock", "attack", "--set", "nonsense"], capsys)[::2], "KEY=VALUE")
    _one_line_error(*_cli(["neuronlock", "attack", "--preset", "smoke", "--set", "bogus=1"], capsys)[::2],
                    "unknown setting")


@pytest.mark.slow
def test_attack_smoke_writes_the_table(capsys, tmp_path):
    code, out, err = _cli(["neuronlock", "attack", "--preset", "smoke", "-o", tmp_path, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["name"] == "neuronlock" and result["tables"]
    assert (tmp_path / "neuronlock.md").exists() and (tmp_path / "neuronlock.json").exists()
