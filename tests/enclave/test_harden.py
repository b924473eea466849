"""harden(): an attacker of the SAME unprivileged uid can read an ordinary victim (the control) but not a hardened
one; a hardened process cannot open files, make sockets, fork or exec, even from a thread started before; it leaves
no core dump.

Victims and attackers are children forked from this test process (no new interpreter runs as ``nobody``); the
children use only os/ctypes (no torch) and leave with ``os._exit``. A victim drops to ``nobody`` and then makes
itself dumpable again, as a process that ``nobody`` started normally is (a uid change clears the flag).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import resource
import signal
import socket
import sys
import threading

import pytest

from chiplock.enclave import harden
from chiplock.errors import EnclaveError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl/seccomp are Linux-only")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: victims and attackers drop to another "
                                "user with setresuid, which only root can do")
needs_seccomp = pytest.mark.skipif(not harden.seccomp_available(),
                                   reason="pyseccomp or libseccomp is missing (pip install chiplock[enclave])")
if harden.seccomp_available():
    import pyseccomp  # noqa: F401  -- imported here so forked children need not import it.

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover
    NOBODY = None
needs_nobody = pytest.mark.skipif(NOBODY is None, reason="no user 'nobody' on this system")

MARKER = b"chiplock-victim-marker-" + os.urandom(8).hex().encode()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_PTRACE_ATTACH, _PTRACE_DETACH = 16, 17
_WALL = 0x40000000


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _become_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
    os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)


def _child(fn) -> tuple[int, dict]:
    """Run ``fn() -> dict`` in a forked child; returns (wait status, its dict)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- runs in the child
        code = 0
        try:
            os.close(r)
            out = json.dumps(fn()).encode()
        except BaseException as e:  # noqa: BLE001
            out, code = json.dumps({"crash": repr(e)}).encode(), 1
        try:
            os.write(w, out)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks) or b"{}")
    assert "crash" not in res, res
    return status, res


class _Victim:
    """A forked child holding MARKER at a known address until closed; hardened or not."""

    def __init__(self, hardened: bool) -> None:
        r, w = os.pipe()
        r2, w2 = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover -- runs in the child
            try:
                os.close(r)
                os.close(w2)
                _become_nobody()
                harden._prctl(harden._PR_SET_DUMPABLE, 1)
                marker = ctypes.create_string_buffer(MARKER)
                info = {"dumpable_before": harden._prctl(harden._PR_GET_DUMPABLE)}
                if hardened:
                    info["status"] = harden.harden(seccomp=harden.seccomp_available())
                info["addr"] = ctypes.addressof(marker)
                os.write(w, json.dumps(info).encode())
                os.read(r2, 1)
            finally:
                os._exit(0)
        os.close(w)
        os.close(r2)
        self._hold = w2
        self.info = json.loads(os.read(r, 65536))
        os.close(r)
        self.addr = self.info["addr"]

    def close(self) -> None:
        os.close(self._hold)
        os.waitpid(self.pid, 0)


def _attack(pid: int, addr: int) -> dict:
    """As nobody (same uid as the victim): ptrace attach, /proc/PID/mem, process_vm_readv."""
    def run() -> dict:
        _become_nobody()
        out: dict = {}
        if _libc.ptrace(_PTRACE_ATTACH, pid, None, None) == 0:
            os.waitpid(pid, _WALL)
            _libc.ptrace(_PTRACE_DETACH, pid, None, None)
            out["ptrace"] = 0
        else:
            out["ptrace"] = ctypes.get_errno()
        try:
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(addr)
                out["mem"] = f.read(len(MARKER)).decode("latin-1")
        except OSError as e:
            out["mem"] = e.errno
        buf = ctypes.create_string_buffer(len(MARKER))
        local, remote = _IoVec(ctypes.addressof(buf), len(MARKER)), _IoVec(addr, len(MARKER))
        n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        out["vm_readv"] = buf.raw.decode("latin-1") if n == len(MARKER) else ctypes.get_errno()
        return out
    return _child(run)[1]


@needs_root
@needs_nobody
@pytest.mark.parametrize("hardened", [False, True], ids=["control-unhardened", "hardened"])
def test_same_uid_attacker(hardened):
    victim = _Victim(hardened)
    try:
        assert victim.info["dumpable_before"] == 1
        got = _attack(victim.pid, victim.addr)
    finally:
        victim.close()
    if not hardened:
        # The control proves the attacks work here: an ordinary process of the same user is fully readable.
        assert got == {"ptrace": 0, "mem": MARKER.decode(), "vm_readv": MARKER.decode()}, got
    else:
        assert victim.info["status"]["dumpable"] == 0
        assert got["ptrace"] == errno.EPERM
        assert got["mem"] in (errno.EACCES, errno.EPERM)
        assert got["vm_readv"] == errno.EPERM


def _probe_open() -> int:
    try:
        open("/etc/passwd", "rb").close()
        return 0
    except OSError as e:
        return e.errno


def _probe() -> dict:
    """Try what a hardened process must not do; errno (or 0) per action."""
    def attempt(fn) -> int:
        try:
            res = fn()
            if isinstance(res, socket.socket):
                res.close()
            if res == 0 and fn is os.fork:  # pragma: no cover -- a fork that got through
                os._exit(0)
            return 0
        except OSError as e:
            return e.errno
        except ValueError:  # setrlimit reports EPERM as ValueError.
            return errno.EPERM
    return {
        "open": _probe_open(),
        "socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        "fork": attempt(os.fork),
        "exec": attempt(lambda: os.execv("/bin/true", ["true"])),
        "stat": attempt(lambda: os.stat("/etc/passwd")),
        "dumpable": 0 if harden._prctl(harden._PR_SET_DUMPABLE, 1) == 0 else ctypes.get_errno(),
        "core": attempt(lambda: resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))),
    }


@needs_seccomp
def test_hardened_process_cannot_open_fork_or_exec():
    def run() -> dict:
        before = {"open": _probe_open(), "stat": os.stat("/etc/passwd") is not None}
        go, done, seen = threading.Event(), threading.Event(), {}

        def worker():  # A thread that exists before hardening, like torch's pool.
            go.wait()
            seen.update(_probe())
            done.set()

        t = threading.Thread(target=worker)
        t.start()
        st = harden.harden()
        after = _probe()
        go.set()
        done.wait(10)
        return {"before": before, "after": after, "thread": seen, "status": st,
                "fstat_ok": os.fstat(1) is not None}
    _, res = _child(run)
    assert res["before"] == {"open": 0, "stat": True}  # Control: the same probe succeeds before hardening.
    for who in ("after", "thread"):
        probe = res[who]
        for action in ("open", "socket", "fork", "exec", "stat", "dumpable"):
            assert probe[action] == errno.EPERM, (who, action, probe)
        assert probe["core"] in (errno.EPERM,), (who, probe)
    st = res["status"]
    assert st["dumpable"] == 0 and st["no_new_privs"] == 1 and st["seccomp"] == 2 and st["core_limit"] == [0, 0]
    assert res["fstat_ok"]


def test_status_of_an_ordinary_process():
    st = harden.status()
    assert st["seccomp"] == 0 and st["mlockall"] is None and st["user"] is None
    assert st["uid"] == os.getuid()
    assert st["dumpable"] == harden._prctl(harden._PR_GET_DUMPABLE)


@needs_root
@needs_nobody
def test_drop_to_user():
    def run() -> dict:
        st = harden.harden(user="nobody", seccomp=False)
        try:
            os.setresuid(0, 0, 0)
            back = 0
        except PermissionError as e:
            back = e.errno
        return {"status": st, "back": back, "ids": [os.getresuid(), os.getresgid(), os.getgroups()]}
    _, res = _child(run)
    assert res["status"]["user"] == "nobody" and res["status"]["uid"] == NOBODY.pw_uid
    assert res["back"] == errno.EPERM
    assert res["ids"] == [[NOBODY.pw_uid] * 3, [NOBODY.pw_gid] * 3, []]


def test_unknown_user_is_refused_before_any_change():
    with pytest.raises(EnclaveError, match="no such user 'no-such-user-chiplock'"):
        harden.harden(user="no-such-user-chiplock")
    assert harden.status()["seccomp"] == 0


def _core_pattern() -> str:
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            return f.read().strip()
    except OSError:
        return ""


@needs_root
def test_no_core_dump(tmp_path):
    pattern = _core_pattern()
    if not pattern or pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write a core file into the working folder")

    def crash(hardened: bool) -> int:
        d = tmp_path / ("hardened" if hardened else "control")
        d.mkdir()
        pid = os.fork()
        if pid == 0:  # pragma: no cover -- runs in the child
            try:
                os.chdir(d)
                resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                with open("/proc/self/coredump_filter", "w") as f:
                    f.write("0")  # Keep the control's core small: registers and notes, no memory.
                if hardened:
                    harden.harden(seccomp=harden.seccomp_available())
                signal.signal(signal.SIGQUIT, signal.SIG_DFL)
                signal.raise_signal(signal.SIGQUIT)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGQUIT
        return status, sorted(p.name for p in d.iterdir())

    status, files = crash(False)
    if not os.WCOREDUMP(status):
        pytest.skip("the kernel wrote no core dump even for an ordinary process here (container limits?)")
    assert files, "control: a core was reported but no file appeared"
    status, files = crash(True)
    assert not os.WCOREDUMP(status) and files == []


def test_missing_libseccomp_is_refused_not_ignored():
    def run() -> dict:
        sys.modules["pyseccomp"] = None  # type: ignore[assignment]  -- as if it were not installed
        try:
            harden.harden()
        except EnclaveError as e:
            return {"error": str(e), "seccomp": harden.status()["seccomp"]}
        return {"error": None}
    _, res = _child(run)
    assert res["error"] and "pyseccomp or libseccomp is missing" in res["error"] and "--no-seccomp" in res["error"]
    assert res["seccomp"] == 0
