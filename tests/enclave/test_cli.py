"""`chiplock enclave package|run|serve`: package -> licences -> run through a real executor, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from chiplock.cli import run
from cli_helpers import one_line_error, run_cli, synthetic_device


_cli, _one_line_error = run_cli, one_line_error


def _device(path: Path) -> Path:
    synthetic_device(path)
    return path


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A tiny TEESlice model on the 8x8 digits, packaged, with a host and an executor licence on two devices."""
    d = tmp_path_factory.mktemp("enclave-cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run(["enclave", "package", "-o", str(d / "m.chiplock"), "--strategy", "teeslice", "--data", "digits8",
                    "--epochs", "1", "--json"])
    assert code == 0
    host, executor = _device(d / "host.json"), _device(d / "executor.json")
    for group, dev in (("main", host), ("enclave", executor)):
        with contextlib.redirect_stdout(io.StringIO()):
            assert run(["license", "issue", str(d / "m.chiplock"), "--group", group, "--profile", str(dev),
                        "-o", str(d / f"{group}.lic")]) == 0
    return d, json.loads(out.getvalue())


@pytest.mark.slow
def test_package_then_run_through_the_executor(packaged, capsys):
    d, summary = packaged
    assert summary["strategy"] == "teeslice" and summary["secure_parameters"] > 0 and summary["ops"] == ["slices"]
    assert (os.stat(d / "m.chiplock.keys").st_mode & 0o777) == 0o600
    code, out, err = _cli(["enclave", "run", d / "m.chiplock", "--license", d / "main.lic", "--profile",
                           d / "host.json", "--enclave-license", d / "enclave.lic", "--enclave-profile",
                           d / "executor.json", "--data", "digits8", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    # The partitioned model through the real executor is the packaged model: same test accuracy.
    assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1 / result["images"])
    assert result["switches"] == -(-result["images"] // result["batch"])
    assert result["executor"]["hardened"] is True and result["executor"]["hardening"]["dumpable"] == 0


@pytest.mark.slow
def test_run_with_the_hosts_licence_as_the_executors_fails(packaged, capsys):
    d, _ = packaged
    code, _, err = _cli(["enclave", "run", d / "m.chiplock", "--license", d / "main.lic", "--profile",
                         d / "host.json", "--enclave-license", d / "main.lic", "--enclave-profile", d / "host.json",
                         "--data", "digits8"], capsys)
    _one_line_error(code, err, "enclave")


@pytest.mark.slow
def test_run_needs_an_executor(packaged, capsys):
    d, _ = packaged
    code, _, err = _cli(["enclave", "run", d / "m.chiplock", "--license", d / "main.lic", "--profile",
                         d / "host.json", "--data", "digits8"], capsys)
    _one_line_error(code, err, "--enclave-license", "--connect")


def test_unknown_strategy_is_one_line(tmp_path, capsys):
    code, _, err = _cli(["enclave", "package", "-o", tmp_path / "m.chiplock", "--strategy", "magic"], capsys)
    _one_line_error(code, err, "magic", "teeslice")
    assert not (tmp_path / "m.chiplock").exists()


def test_serve_refuses_a_socket_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "m.chiplock").write_bytes(b"x")
    (tmp_path / "e.lic").write_bytes(b"x")
    (tmp_path / "sock").write_text("keep me")
    code, _, err = _cli(["enclave", "serve", tmp_path / "m.chiplock", "--license", tmp_path / "e.lic", "--socket",
                         tmp_path / "sock"], capsys)
    _one_line_error(code, err, "not a socket")
    assert (tmp_path / "sock").read_text() == "keep me"


@pytest.mark.slow
def test_serve_then_run_with_connect(packaged, capsys, tmp_path):
    """`serve --once` on a Unix socket (mode 0600), `run --connect`: the same accuracy as a started executor."""
    import subprocess
    import sys
    import time

    d, summary = packaged
    sock = tmp_path / "enclave.sock"
    chiplock = str(Path(sys.executable).with_name("chiplock"))  # the console script of this environment
    proc = subprocess.Popen([chiplock, "enclave", "serve", str(d / "m.chiplock"),
                             "--license", str(d / "enclave.lic"), "--profile", str(d / "executor.json"), "--socket",
                             str(sock), "--once"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        assert (os.stat(sock).st_mode & 0o777) == 0o600
        code, out, err = _cli(["enclave", "run", d / "m.chiplock", "--license", d / "main.lic", "--profile",
                               d / "host.json", "--connect", sock, "--data", "digits8", "--json"], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1 / result["images"])
        assert result["executor"]["hardened"] is True and result["executor"]["pid"] != proc.pid
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def test_package_refuses_existing_keys_before_training(tmp_path, capsys):
    from chiplock.license import ContentKeys

    ContentKeys.new({"main": "pre-aes"}).save(tmp_path / "other.keys")
    code, _, err = _cli(["enclave", "package", "-o", tmp_path / "m.chiplock", "--keys-out", tmp_path / "other.keys",
                         "--data", "digits8", "--epochs", "50"], capsys)
    _one_line_error(code, err, "content keys of another")
    assert not (tmp_path / "m.chiplock").exists()


def test_serve_refuses_a_live_socket(tmp_path, capsys):
    import socket

    (tmp_path / "m.chiplock").write_bytes(b"x")
    (tmp_path / "e.lic").write_bytes(b"x")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "sock"))
    live.listen(1)
    try:
        code, _, err = _cli(["enclave", "serve", tmp_path / "m.chiplock", "--license", tmp_path / "e.lic", "--socket",
                             tmp_path / "sock"], capsys)
        _one_line_error(code, err, "served by a running")
        assert (tmp_path / "sock").is_socket()
    finally:
        live.close()
