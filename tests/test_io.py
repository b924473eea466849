"""Crash-safe writes (chiplock._io.atomic_writer) and the output checks that prevent data loss."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import chiplock
import chiplock._io as io
from chiplock.container.writer import build_header
from chiplock.errors import FileAccessError, OutputError
from chiplock.keys import INSECURE_FAST, KdfParams


def _o_tmpfile_works(folder) -> bool:
    if not io.USE_O_TMPFILE:
        return False
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = io._open_unnamed(dfd)
    finally:
        os.close(dfd)
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.fixture(params=["o_tmpfile", "fallback"])
def write_path(request, tmp_path, monkeypatch):
    """Run a test once with the O_TMPFILE writer and once with the portable fallback (forced)."""
    if request.param == "o_tmpfile":
        if not _o_tmpfile_works(tmp_path):
            pytest.skip("O_TMPFILE is not supported on this OS or file system")
    else:
        monkeypatch.setattr(io, "USE_O_TMPFILE", False)
    return request.param


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _container(path) -> None:
    path.write_bytes(build_header({"format": "chiplock", "version": 3}, []))


def _plain(path) -> None:
    save_file({"w": torch.zeros(4)}, str(path))


# --------------------------------------------------------------------------------------------------------------
# The writer.

def test_o_tmpfile_write_has_no_name_until_complete(tmp_path):
    if not _o_tmpfile_works(tmp_path):
        pytest.skip("O_TMPFILE is not supported on this OS or file system")
    out = tmp_path / "plain.safetensors"
    with io.atomic_writer(out, mode=0o600) as fh:
        fh.write(b"x" * 100_000)
        fh.flush()
        assert _names(tmp_path) == [], "a directory entry exists while the file is being written"
        # The data is in an unnamed inode the kernel reclaims if the process dies.
        assert os.readlink(f"/proc/self/fd/{fh.fileno()}").endswith("(deleted)")
    assert _names(tmp_path) == ["plain.safetensors"]
    assert out.read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_o_tmpfile_replaces_an_existing_file_atomically(tmp_path):
    if not _o_tmpfile_works(tmp_path):
        pytest.skip("O_TMPFILE is not supported on this OS or file system")
    out = tmp_path / "m.chiplock"
    out.write_bytes(b"old")
    inode = out.stat().st_ino
    with io.atomic_writer(out) as fh:
        fh.write(b"new")
        assert _names(tmp_path) == ["m.chiplock"] and out.read_bytes() == b"old"
    assert _names(tmp_path) == ["m.chiplock"]
    assert out.read_bytes() == b"new" and out.stat().st_ino != inode
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_fallback_writes_a_private_hidden_part_then_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "USE_O_TMPFILE", False)
    out = tmp_path / "plain.safetensors"
    out.write_bytes(b"old")
    with io.atomic_writer(out, mode=0o600) as fh:
        fh.write(b"secret weights")
        parts = [n for n in _names(tmp_path) if n != "plain.safetensors"]
        assert len(parts) == 1 and parts[0].startswith(".plain.safetensors.") and parts[0].endswith(io.PART_SUFFIX)
        assert stat.S_IMODE((tmp_path / parts[0]).stat().st_mode) == 0o600
        assert str(tmp_path / parts[0]) in io._live_parts  # Removed at interpreter exit if still there.
        assert out.read_bytes() == b"old"
    assert _names(tmp_path) == ["plain.safetensors"]
    assert out.read_bytes() == b"secret weights" and not io._live_parts


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path, write_path, exc):
    out = tmp_path / "m.chiplock"
    out.write_bytes(b"old")
    with pytest.raises(exc):
        with io.atomic_writer(out) as fh:
            fh.write(b"partial")
            raise exc()
    assert _names(tmp_path) == ["m.chiplock"] and out.read_bytes() == b"old"
    new = tmp_path / "new.chiplock"
    with pytest.raises(exc):
        with io.atomic_writer(new) as fh:
            fh.write(b"partial")
            raise exc()
    assert _names(tmp_path) == ["m.chiplock"]


def test_disk_full_becomes_output_error_and_leaves_nothing(tmp_path, write_path):
    out = tmp_path / "m.chiplock"
    with pytest.raises(OutputError, match="no space left to write .*m.chiplock.*free some space"):
        with io.atomic_writer(out) as fh:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _names(tmp_path) == []


def test_writer_never_creates_a_missing_folder(tmp_path, write_path):
    with pytest.raises(OutputError, match=r"folder .*missing.* does not exist; create it first"):
        io.atomic_write_bytes(tmp_path / "missing" / "sub" / "x.json", b"{}")
    assert _names(tmp_path) == []


def test_writer_refuses_a_folder_or_an_impossible_name_before_writing(tmp_path, write_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        io.atomic_write_bytes(tmp_path / "d", b"x")
    with pytest.raises(OutputError, match="too long"):
        io.atomic_write_bytes(tmp_path / ("a" * 300), b"x")
    assert _names(tmp_path) == ["d"]


def test_unsupported_o_tmpfile_falls_back(tmp_path, monkeypatch):
    """A file system without O_TMPFILE (EOPNOTSUPP) silently uses the fallback; the result is the same."""
    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this OS")
    real_open = os.open
    tried = []

    def fake_open(path, flags, *args, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            tried.append(path)
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(io, "USE_O_TMPFILE", True)
    monkeypatch.setattr(os, "open", fake_open)
    with io.atomic_writer(tmp_path / "x.bin") as fh:
        fh.write(b"data")
        assert len(_names(tmp_path)) == 1 and _names(tmp_path)[0].endswith(io.PART_SUFFIX)
    assert tried and _names(tmp_path) == ["x.bin"]


def test_stale_parts_of_dead_processes_are_swept(tmp_path, write_path):
    """What a kill -9 during a fallback write leaves is removed by the next write of the same target."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    try:
        os.kill(dead, 0)
        pytest.skip("the pid was reused already")
    except ProcessLookupError:
        pass
    stale = tmp_path / f".x.bin.{dead}.0123456789ab{io.PART_SUFFIX}"
    alive = tmp_path / f".x.bin.{os.getppid()}.0123456789ab{io.PART_SUFFIX}"
    other = tmp_path / f".y.bin.{dead}.0123456789ab{io.PART_SUFFIX}"
    for p in (stale, alive, other):
        p.write_bytes(b"partial")
    io.atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert not stale.exists(), "a dead process's partial file was left"
    assert alive.exists() and other.exists(), "a live writer's or another target's file was removed"


# --------------------------------------------------------------------------------------------------------------
# check_output.

def test_file_kind(tmp_path):
    _container(tmp_path / "c")
    _plain(tmp_path / "p")
    (tmp_path / "e").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, tmp_path / "t.pt")
    (tmp_path / "j").write_bytes(b"\x10\0\0\0\0\0\0\0" + b"[" * 16)
    got = {n: io.file_kind(tmp_path / n) for n in ("c", "p", "e", "t.pt", "j")}
    assert got == {"c": "container", "p": "safetensors", "e": "empty", "t.pt": "other", "j": "other"}


def test_output_that_is_the_input_is_refused_even_with_force(tmp_path):
    src = tmp_path / "m.safetensors"
    _plain(src)
    os.link(src, tmp_path / "hard.safetensors")
    os.symlink(src, tmp_path / "soft.safetensors")
    for out in ("m.safetensors", "hard.safetensors", "soft.safetensors"):
        with pytest.raises(OutputError, match="is the input file"):
            io.check_output(tmp_path / out, kind="weights", inputs=[src], force=True)
    with pytest.raises(OutputError, match="is the input file"):
        io.check_output(tmp_path / "." / "m.safetensors", kind="container", inputs=[str(src)], force=True)


def test_output_folder_and_path_errors(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    cases = {
        tmp_path / "dir": "is a folder; pass a file path inside it",
        str(tmp_path / "dir") + os.sep: "names a folder",
        tmp_path / "file" / "out": "runs through .*file.*, which is a file",
        tmp_path / "file" / "sub" / "out": "runs through .*file.*not a folder",
        tmp_path / "missing" / "out": r"folder .*missing.* does not exist; create it first \(mkdir -p",
        tmp_path / ("a" * 300): "too long",
    }
    for out, why in cases.items():
        with pytest.raises(OutputError, match=why):
            io.check_output(out, kind="container")
    assert not (tmp_path / "missing").exists()


def test_output_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="not a regular file"):
        io.check_output(tmp_path / "fifo", kind="weights", force=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            io.check_output(ro / "x.chiplock", kind="container")
    finally:
        ro.chmod(0o700)


def test_lock_output_may_replace_a_container_but_not_a_plaintext_model(tmp_path):
    _container(tmp_path / "old.chiplock")
    _plain(tmp_path / "plain.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "empty").write_bytes(b"")
    io.check_output(tmp_path / "old.chiplock", kind="container")
    io.check_output(tmp_path / "empty", kind="container")
    io.check_output(tmp_path / "new.chiplock", kind="container")
    with pytest.raises(OutputError, match="is a plaintext safetensors model; .*--force"):
        io.check_output(tmp_path / "plain.safetensors", kind="container")
    with pytest.raises(OutputError, match="is not a chiplock container; .*--force"):
        io.check_output(tmp_path / "plain.pt", kind="container")
    io.check_output(tmp_path / "plain.safetensors", kind="container", force=True)
    io.check_output(tmp_path / "plain.pt", kind="container", force=True)


def test_unlock_output_may_replace_plaintext_but_never_a_container(tmp_path):
    _container(tmp_path / "old.chiplock")
    _plain(tmp_path / "plain.safetensors")
    (tmp_path / "notes.txt").write_text("keep me")
    io.check_output(tmp_path / "plain.safetensors", kind="weights")
    for force in (False, True):
        with pytest.raises(OutputError, match="is a chiplock container; unlocked weights never replace one"):
            io.check_output(tmp_path / "old.chiplock", kind="weights", force=force)
    with pytest.raises(OutputError, match="not a safetensors file; .*--force"):
        io.check_output(tmp_path / "notes.txt", kind="weights")
    io.check_output(tmp_path / "notes.txt", kind="weights", force=True)


def test_os_error_messages_name_the_path_and_what_to_do():
    cases = {errno.ENOENT: "does not exist; check the path", errno.EACCES: "permission denied",
             errno.ENAMETOOLONG: "too long", errno.ENOTDIR: "runs through a file", errno.EISDIR: "is a folder",
             errno.ENOSPC: "no space left", errno.EROFS: "read-only", errno.EIO: "cannot read"}
    for code, why in cases.items():
        err = io.os_error(OSError(code, os.strerror(code)), "/some/path", "read")
        assert isinstance(err, FileAccessError) and not isinstance(err, OutputError)
        assert why in str(err) and "/some/path" in str(err)
    assert isinstance(io.os_error(OSError(errno.ENOSPC, "full"), "x", "write"), OutputError)


# --------------------------------------------------------------------------------------------------------------
# chiplock.lock uses the checks before any expensive work.

@pytest.fixture
def no_key_derivation(monkeypatch):
    import chiplock.api as api
    import chiplock.profile

    def boom(*a, **kw):
        raise AssertionError("key work ran before the output was checked")

    # Drawing content keys, issuing the embedded licence, or any Argon2id run.
    monkeypatch.setattr(api.ContentKeys, "new", classmethod(boom))
    monkeypatch.setattr(api, "issue_license", boom)
    monkeypatch.setattr(chiplock.profile.DeviceKey, "derive", classmethod(boom))


def test_lock_refuses_to_overwrite_its_input_before_deriving_a_key(tmp_path, profile, no_key_derivation):
    src = tmp_path / "m.safetensors"
    _plain(src)
    before = src.read_bytes()
    with pytest.raises(OutputError, match="is the input file"):
        chiplock.lock(src, src, profile, "aes", b"vendor secret for io tests", force=True)
    _plain(tmp_path / "other.safetensors")
    with pytest.raises(OutputError, match="plaintext safetensors model"):
        chiplock.lock(src, tmp_path / "other.safetensors", profile, "aes", b"vendor secret for io tests")
    with pytest.raises(OutputError, match="does not exist; create it first"):
        chiplock.lock(src, tmp_path / "no" / "m.chiplock", profile, "aes", b"vendor secret for io tests")
    assert src.read_bytes() == before
    assert _names(tmp_path) == ["m.safetensors", "other.safetensors"]


def test_lock_replaces_a_container_or_with_force_a_plaintext_file(tmp_path, profile):
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(src))
    kdf = KdfParams(**INSECURE_FAST)
    out = tmp_path / "m.chiplock"
    _container(out)
    chiplock.lock(src, out, profile, "aes", b"vendor secret for io tests", kdf=kdf)
    assert io.file_kind(out) == "container" and out.stat().st_size > 100
    target = tmp_path / "other.safetensors"
    _plain(target)
    chiplock.lock(src, target, profile, "aes", b"vendor secret for io tests", kdf=kdf, force=True)
    assert io.file_kind(target) == "container"
    assert _names(tmp_path) == ["m.chiplock", "m.safetensors", "other.safetensors"]
