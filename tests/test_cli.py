"""The command line end to end: enroll -> lock -> inspect -> unlock, one-line errors, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import chiplock
from chiplock.cli import app, main, run
from chiplock.keys import INSECURE_FAST, KdfParams

runner = CliRunner()
SECRET = b"vendor secret for the cli tests"
CHIPLOCK = Path(sys.executable).with_name("chiplock")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    save_file({"w": torch.randn(64, 32), "b": torch.arange(5, dtype=torch.int32)}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_file, profile):
    """A folder with a model, a profile, a secret, keys of every kind and a signed aes container."""
    d = tmp_path_factory.mktemp("files")
    profile.save(d / "device.json")
    (d / "secret").write_bytes(SECRET)
    ed = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = dict(encoding=ser.Encoding.PEM, format=ser.PrivateFormat.PKCS8, encryption_algorithm=ser.NoEncryption())
    pub = dict(encoding=ser.Encoding.PEM, format=ser.PublicFormat.SubjectPublicKeyInfo)
    (d / "ed.pem").write_bytes(ed.private_bytes(**pem))
    (d / "ed.pub").write_bytes(ed.public_key().public_bytes(**pub))
    (d / "rsa.pem").write_bytes(rsa_key.private_bytes(**pem))
    (d / "rsa.pub").write_bytes(rsa_key.public_key().public_bytes(**pub))
    (d / "locked.pem").write_bytes(ed.private_bytes(encoding=ser.Encoding.PEM, format=ser.PrivateFormat.PKCS8,
                                                    encryption_algorithm=ser.BestAvailableEncryption(b"pw")))
    (d / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    (d / "sub").mkdir()
    chiplock.lock(model_file, d / "m.chiplock", profile, "aes", SECRET, kdf=KdfParams(**INSECURE_FAST),
                  signing_key=ed)
    save_file({"x": torch.zeros(3)}, str(d / "plain.safetensors"))
    torch.save({"x": torch.zeros(3)}, d / "plain.pt")
    return d


def _cli(argv, capsys, cwd: Path) -> tuple[int, str, str]:
    """Run the CLI in this process, as the console script does; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = run([str(a) for a in argv])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def test_enroll_lock_unlock_round_trip(tmp_path, model_file, monkeypatch):
    import functools

    import chiplock.api as api

    # The CLI always uses the default (slow, secure) KDF; this test is about the commands, so lock fast.
    monkeypatch.setattr(api, "lock", functools.partial(api.lock, kdf=KdfParams(**INSECURE_FAST)))
    profile, locked, plain = tmp_path / "device.json", tmp_path / "m.chiplock", tmp_path / "plain.safetensors"
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    assert runner.invoke(app, ["enroll", "-o", str(profile)]).exit_code == 0
    for transform in ("aes", "shuffle", "pre-aes"):
        res = runner.invoke(app, ["lock", str(model_file), "--profile", str(profile), "--transform", transform,
                                  "--secret-file", str(secret), "-o", str(locked), "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout[res.stdout.index("{"):])
        assert info["transform"] == transform and set(info["tensors"]) == {"w", "b"}

        res = runner.invoke(app, ["unlock", str(locked), "--profile", str(profile), "--secret-file", str(secret),
                                  "-o", str(plain)])
        assert res.exit_code == 0, res.output
        original, unlocked = load_file(str(model_file)), load_file(str(plain))
        assert all(torch.equal(original[k], unlocked[k]) for k in original)
        assert (plain.stat().st_mode & 0o777) == 0o600
        plain.unlink()
    # On the device itself (no --profile: it is measured) and without -o: nothing is written.
    res = runner.invoke(app, ["unlock", str(locked), "--secret-file", str(secret), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["written"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.json", "m.chiplock", "secret"]


def test_inspect_json_needs_no_key(files, capsys):
    code, out, err = _cli(["inspect", "m.chiplock", "--json"], capsys, files)
    assert code == 0, err
    info = json.loads(out)
    assert info["tensors"]["w"] == {"dtype": "F32", "shape": [64, 32], "group": "main"}
    assert info["transform"] == "aes" and info["signed"] and info["license"] == "embedded"
    assert info["groups"] == {"main": {"transform": "aes", "tensors": 2}}


def test_signed_container_unlocks_with_the_vendor_key(files, capsys, tmp_path):
    code, out, err = _cli(["unlock", files / "m.chiplock", "--secret-file", files / "secret", "--verify-key",
                           files / "ed.pub", "-o", tmp_path / "w.safetensors"], capsys, files)
    assert code == 0, err
    assert set(load_file(str(tmp_path / "w.safetensors"))) == {"w", "b"}


LONG = "a" * 300
#: A lock that would succeed but for its --signing-key (the file name follows).
_SIGN = ["lock", "plain.safetensors", "--profile", "device.json", "-o", "x.chiplock", "--secret-file", "secret",
         "--signing-key"]
#: (argv, what the single error line must contain). Paths are relative to the `files` fixture's folder.
BAD = {
    "lock: model missing": (["lock", "nope.safetensors", "--profile", "device.json", "-o", "x.chiplock",
                             "--secret-file", "secret"], "model file 'nope.safetensors' not found"),
    "lock: profile missing": (["lock", "plain.safetensors", "--profile", "nope.json", "-o", "x.chiplock"],
                              "`chiplock enroll -o FILE`"),
    "lock: profile is garbage": (["lock", "plain.safetensors", "--profile", "secret", "-o", "x.chiplock"],
                                 "device profile"),
    "lock: -o is the input": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "plain.safetensors",
                               "--secret-file", "secret", "--force"], "is the input file"),
    "lock: -o is the secret file": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "secret",
                                     "--secret-file", "secret", "--force"], "is the input file"),
    "lock: -o a plaintext model": (["lock", "plain.pt", "--profile", "device.json", "-o",
                                    "plain.safetensors", "--secret-file", "secret"], "pass --force"),
    "lock: -o a folder": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "sub",
                           "--secret-file", "secret"], "is a folder"),
    "lock: -o under a file": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "secret/x.chiplock",
                               "--secret-file", "secret"], "which is a file, not a folder"),
    "lock: -o in a missing folder": (["lock", "plain.safetensors", "--profile", "device.json", "-o",
                                      "new/x.chiplock", "--secret-file", "secret"], "create it first"),
    "lock: -o too long": (["lock", "plain.safetensors", "--profile", "device.json", "-o", LONG,
                           "--secret-file", "secret"], "too long"),
    "lock: secret file missing": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "x.chiplock",
                                   "--secret-file", "nope"], "secret file 'nope' not found"),
    "lock: signing key missing": ([*_SIGN, "nope.pem"], "signing key file 'nope.pem' not found"),
    "lock: signing key garbage": ([*_SIGN, "garbage.pem"], "is not a PEM private key"),
    "lock: signing key is text": ([*_SIGN, "secret"], "is not a PEM private key"),
    "lock: signing key is public": ([*_SIGN, "ed.pub"],
                                    "is a public key; --signing-key needs the vendor's private key"),
    "lock: signing key is RSA": ([*_SIGN, "rsa.pem"], "is an RSA key; chiplock signs with Ed25519 only"),
    "lock: signing key encrypted": ([*_SIGN, "locked.pem"], "password-protected"),
    "unlock: container missing": (["unlock", "nope.chiplock", "--secret-file", "secret"],
                                  "container 'nope.chiplock' not found"),
    "unlock: container under a file": (["unlock", "secret/m.chiplock", "--secret-file", "secret"],
                                       "runs through a file"),
    "unlock: container path too long": (["unlock", LONG, "--secret-file", "secret"], "too long"),
    "unlock: container is a folder": (["unlock", "sub", "--secret-file", "secret"], "holds no *.chiplock container"),
    "unlock: not a container": (["unlock", "plain.safetensors", "--secret-file", "secret"],
                                "not an intact chiplock container"),
    "unlock: secret file missing": (["unlock", "m.chiplock", "--secret-file", "nope"],
                                    "secret file 'nope' not found"),
    "unlock: profile missing": (["unlock", "m.chiplock", "--profile", "nope.json", "--secret-file", "secret"],
                                "`chiplock enroll -o FILE`"),
    "unlock: verify key missing": (["unlock", "m.chiplock", "--secret-file", "secret", "--verify-key", "nope.pub"],
                                   "verification key file 'nope.pub' not found"),
    "unlock: verify key garbage": (["unlock", "m.chiplock", "--secret-file", "secret", "--verify-key", "secret"],
                                   "is not a PEM public key"),
    "unlock: verify key is private": (["unlock", "m.chiplock", "--secret-file", "secret", "--verify-key",
                                       "ed.pem"], "is a private key; pass the public key"),
    "unlock: verify key is RSA": (["unlock", "m.chiplock", "--secret-file", "secret", "--verify-key", "rsa.pub"],
                                  "is an RSA key; chiplock verifies Ed25519"),
    "unlock: verify key is an RSA private key": (["unlock", "m.chiplock", "--secret-file", "secret",
                                                  "--verify-key", "rsa.pem"], "is a private key"),
    "unlock: -o is the container": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "m.chiplock",
                                     "--force"], "is the input file"),
    "unlock: -o another container": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "other.chiplock",
                                      "--force"], "unlocked weights never replace one"),
    "unlock: -o a .pt": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "plain.pt"], "pass --force"),
    "unlock: -o a folder": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "sub"], "is a folder"),
    "unlock: -o under a file": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "secret/w.safetensors"],
                                "which is a file, not a folder"),
    "unlock: -o in a missing folder": (["unlock", "m.chiplock", "--secret-file", "secret", "-o",
                                        "new/w.safetensors"], "does not exist; create it first"),
    "unlock: -o too long": (["unlock", "m.chiplock", "--secret-file", "secret", "-o", LONG], "too long"),
    "inspect: missing": (["inspect", "nope.chiplock"], "container 'nope.chiplock' not found"),
    "inspect: under a file": (["inspect", "secret/x"], "runs through a file"),
    "enroll: -o in a missing folder": (["enroll", "-o", "new/device.json"], "create it first"),
    "enroll: -o a folder": (["enroll", "-o", "sub"], "is a folder"),
    "usage: unknown option": (["lock", "--bogus"], "--help"),
    "usage: missing argument": (["unlock"], "Missing argument"),
    "usage: bad choice": (["lock", "plain.safetensors", "--profile", "device.json", "-o", "x.chiplock",
                           "--transform", "rot13"], "--transform"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_error_is_one_line_with_exit_code_2(case, files, capsys):
    argv, want = BAD[case]
    (files / "other.chiplock").write_bytes((files / "m.chiplock").read_bytes())
    before = sorted(p.name for p in files.iterdir())
    code, out, err = _cli(argv, capsys, files)
    assert code == 2, (case, out, err)
    assert "Traceback" not in err and "Usage:" not in err and "╭" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"{case}: {err!r}"
    assert lines[0].startswith("error: ") and want in lines[0], f"{case}: {lines[0]}"
    assert sorted(p.name for p in files.iterdir()) == before, f"{case}: a file was written or removed"
    assert not (files / "new").exists()


def test_options_reach_the_api(files, capsys, monkeypatch):
    """--allow-weak-key and --force are passed to chiplock.lock; a plaintext file is replaced only with --force."""
    import chiplock.api as api

    seen = {}
    monkeypatch.setattr(api, "lock", lambda *a, **kw: seen.update(kw) or {"tensors": {}, "transform": "aes",
                                                                             "total_bytes": 0})
    code, _, err = _cli(["lock", "plain.safetensors", "--profile", "device.json", "-o", "x.chiplock",
                         "--allow-weak-key", "--force"], capsys, files)
    assert code == 0, err
    assert seen["allow_weak_key"] is True and seen["force"] is True
    code, _, err = _cli(["lock", "plain.safetensors", "--profile", "device.json", "-o", "x.chiplock"], capsys, files)
    assert code == 0 and seen["allow_weak_key"] is False and seen["force"] is False


def test_unlock_force_replaces_a_non_safetensors_file(files, capsys, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("not weights")
    argv = ["unlock", files / "m.chiplock", "--secret-file", files / "secret", "-o", target]
    code, _, err = _cli(argv, capsys, files)
    assert code == 2 and "pass --force" in err and target.read_text() == "not weights"
    code, _, err = _cli([*argv, "--force"], capsys, files)
    assert code == 0, err
    assert set(load_file(str(target))) == {"w", "b"}


def test_missing_profile_is_reported(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["chiplock", "lock", str(model_file), "--profile", str(tmp_path / "no.json"),
                                     "-o", str(tmp_path / "m.chiplock")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "chiplock enroll" in capsys.readouterr().err
    assert not (tmp_path / "m.chiplock").exists()


def _console(argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="40", TERM="dumb")
    return subprocess.run([str(CHIPLOCK), *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not CHIPLOCK.exists(), reason="the chiplock console script is not installed in this venv")
@pytest.mark.parametrize("argv, want", [
    (["unlock", "m.chiplock", "--secret-file", "no-such-secret-file-with-a-long-name"], "secret file"),
    (["unlock", "m.chiplock", "--secret-file", "secret", "--verify-key", "rsa.pub"], "RSA"),
    (["unlock", "m.chiplock", "--secret-file", "secret", "-o", "sub"], "is a folder"),
    (["lock", "--bogus"], "--help"),
])
def test_console_script_errors_are_one_unwrapped_line(files, argv, want):
    """Through the installed entry point, on a 40-column non-terminal: no usage box, no wrapping."""
    proc = _console(argv, files)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and len(proc.stderr) > 40, proc.stderr
    assert proc.stderr.startswith("error: ") and want in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_writes_report_with_authorized_and_unauthorized_accuracy(tmp_path):
    from chiplock_demo.demo import run_demo

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


def test_lock_once_then_one_licence_per_device(tmp_path, model_file, profile, wrong_profile, capsys):
    # The vendor flow: lock without a device, issue a licence per device, unlock with it.
    d = tmp_path
    profile.save(d / "dev.json")
    wrong_profile.save(d / "other.json")
    (d / "secret").write_bytes(SECRET)
    code, out, err = _cli(["lock", model_file, "-o", "m.chiplock", "--transform", "aes", "--group",
                           "bias=aes:b"], capsys, d)
    assert code == 0, err
    assert (d / "m.chiplock.keys").stat().st_mode & 0o777 == 0o600
    assert "license issue" in err + out
    code, _, err = _cli(["license", "issue", "m.chiplock", "--profile", "dev.json", "-o", "dev.lic",
                         "--secret-file", "secret"], capsys, d)
    assert code == 0, err
    code, _, err = _cli(["unlock", "m.chiplock", "--profile", "dev.json", "--license", "dev.lic", "--secret-file",
                         "secret", "-o", "w.safetensors"], capsys, d)
    assert code == 0, err
    got = load_file(str(d / "w.safetensors"))
    assert set(got) == {"w", "b"}
    # Another device with this licence is refused (aes: authenticated wrap), in one line.
    code, _, err = _cli(["unlock", "m.chiplock", "--profile", "other.json", "--license", "dev.lic",
                         "--secret-file", "secret"], capsys, d)
    assert code == 2 and err.startswith("error: this licence is for another device") and err.count("\n") == 1
    # Without a licence, the file says what to pass.
    code, _, err = _cli(["unlock", "m.chiplock", "--profile", "dev.json"], capsys, d)
    assert code == 2 and "--license" in err
    # Locking again onto the same keys file is refused: it holds the only copy of the first model's keys.
    code, _, err = _cli(["lock", model_file, "-o", "m2.chiplock", "--keys-out", "m.chiplock.keys"], capsys, d)
    assert code == 2 and ("already exists" in err or "another locked model" in err)
    # A malformed --group is one clear usage error.
    code, _, err = _cli(["lock", model_file, "-o", "m3.chiplock", "--group", "nolabel"], capsys, d)
    assert code == 2 and "LABEL=TRANSFORM:PATTERN" in err
