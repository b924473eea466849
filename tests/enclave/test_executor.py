"""The executor process end to end: a partition packaged into a container, an executor that opens its own part
with its own licence, hardens itself, and serves HostModel exactly as the in-process LocalCall does; malformed
requests get clean "error" replies; a same-uid attacker cannot read it; a kill -9 leaves no plaintext behind."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chiplock.enclave import channel
from chiplock.enclave.executor import Enclave, Server, _start_error, run_executor
from chiplock.enclave.harden import seccomp_available
from chiplock.enclave.models import NetSpec, build
from chiplock.enclave.package import issue, package
from chiplock.enclave.partition import HostModel, LocalCall, build_secure, split
from chiplock.enclave.secure_mem import memfd_secret_available
from chiplock.errors import EnclaveError, InvalidKey
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.license import ContentKeys
from chiplock.profile import DeviceProfile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the executor is Linux-only")
IS_ROOT = os.geteuid() == 0
try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover
    NOBODY = None
USER = "nobody" if IS_ROOT and NOBODY is not None else None
# Without libseccomp the executor can still be hardened, without its filter (and says so).
SECCOMP = seccomp_available()


def _device() -> DeviceProfile:
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("executor")
    net = build(NetSpec(image=8, widths=(4, 8), fc=16), seed=0).eval()
    p = split(net, "last-k", k=2)
    package(p, d / "m.chiplock", content_keys_path=d / "m.keys")
    enclave_dev = _device()
    _, lic = issue(ContentKeys.load(d / "m.keys"), host_profile=None, enclave_profile=enclave_dev,
                   enclave_secret=b"the executor's own vendor secret")
    lic.save(d / "enclave.license")
    enclave_dev.save(d / "enclave.profile")
    (d / "enclave.secret").write_bytes(b"the executor's own vendor secret")
    return SimpleNamespace(dir=d, net=net, p=p, container=d / "m.chiplock", license=d / "enclave.license",
                           profile=d / "enclave.profile", secret=d / "enclave.secret")


@pytest.fixture(scope="module")
def enclave(model):
    enc = Enclave.start(model.container, model.license, profile=model.profile, secret_file=model.secret, user=USER,
                        budget_mib=1, seccomp=SECCOMP)
    yield enc
    enc.close()


def test_serves_host_model_like_local_call(model, enclave):
    local = LocalCall(build_secure(model.p.spec, {k: v.clone() for k, v in model.p.secure.items()}))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    s0, i0, o0 = enclave.switches, enclave.bytes_in, enclave.bytes_out
    got = HostModel(model.p.spec, model.p.public, enclave)(x)
    want = HostModel(model.p.spec, model.p.public, local)(x)
    assert torch.equal(got, want)
    assert torch.allclose(got, model.net(x), atol=1e-5)
    assert (enclave.switches - s0, enclave.bytes_in - i0, enclave.bytes_out - o0) == \
        (local.switches, local.bytes_in, local.bytes_out) != (0, 0, 0)


def test_status_reports_hardening_and_every_thread_is_filtered(model, enclave):
    st = enclave.status()
    h = st["hardening"]
    assert st["hardened"] is True
    assert (h["dumpable"], h["no_new_privs"], h["seccomp"], h["core_limit"]) == (0, 1, 2 if SECCOMP else 0, [0, 0])
    assert st["memory"]["kind"] == ("memfd_secret" if memfd_secret_available() else "mlock")
    want = sum(t.numel() * t.element_size() for t in model.p.secure.values())
    assert want <= st["secure_bytes"] <= want + 64 * len(model.p.secure)
    # The arena is sized from the header, not the whole budget: its pages are all the secret memory there is.
    assert st["secure_bytes"] <= st["memory"]["capacity"] < st["secure_bytes"] + 64
    assert st["memory"]["budget"] == 1 << 20
    assert st["ops"] == ["tail"] and st["pid"] == enclave.pid
    if USER:
        assert h["user"] == "nobody" and h["uid"] == NOBODY.pw_uid
    if not SECCOMP:
        pytest.skip("pyseccomp or libseccomp is missing: the executor runs without its filter")
    # The kernel's view, thread by thread (torch's pool was started before the filter).
    tasks = os.listdir(f"/proc/{enclave.pid}/task")
    for tid in tasks:
        fields = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{enclave.pid}/task/{tid}/status").read_text().splitlines() if ":\t" in line)
        assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1", (tid, fields["Seccomp"])


def _exchange(sock: socket.socket, raw: bytes) -> channel.Message:
    sock.sendall(raw)
    return channel.recv(sock, max_bytes=1 << 20, timeout=10)


def _frame(header: dict | bytes, payload: bytes = b"", *, magic=b"CLE1", plen=None) -> bytes:
    h = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack(">4sII", magic, len(h), len(payload) if plen is None else plen) + h + payload


def _tail(shape, dtype="float32", payload=None):
    n = 1
    for s in shape:
        n *= s
    size = {"float32": 4, "float64": 8, "uint8": 1}[dtype]
    return _frame({"op": "tail", "tensors": [{"dtype": dtype, "shape": shape}], "meta": {}},
                  bytes(n * size) if payload is None else payload)


MALFORMED = [
    ("bad magic", b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    ("huge header", struct.pack(">4sII", b"CLE1", 1 << 30, 0), "over the caps"),
    ("huge payload", struct.pack(">4sII", b"CLE1", 2, 1 << 31) + b"{}", "over the caps"),
    ("bad json", _frame(b'{"op": "tail", "tensors": [}'), "not valid UTF-8 JSON"),
    ("pickle", _frame(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94."), "not valid UTF-8 JSON"),
    ("wrong dtype", _tail([2, 128], "float64"), "input 0 is torch.float64"),
    ("wrong shape", _tail([2, 127]), r"expected float32 \[batch, 128\]"),
    ("no batch dim", _tail([128]), "input 0 is"),
    ("zero batch", _tail([0, 128]), "batch size in 1..1024"),
    ("two inputs", _frame({"op": "tail", "tensors": [{"dtype": "float32", "shape": [1, 128]}] * 2, "meta": {}},
                          bytes(1024)), "takes 1 input"),
    ("unknown op", _frame({"op": "units", "tensors": [], "meta": {}}), "unknown op 'units'"),
    ("length lies", _tail([2, 128], payload=bytes(100)), "add up to 1,024 bytes"),
]


@pytest.mark.parametrize("name, raw, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_error_and_executor_keeps_serving(model, enclave, name, raw, message):
    before = enclave.status()["errors"]
    reply = _exchange(enclave._sock, raw)
    assert reply.op == "error" and not reply.tensors
    assert __import__("re").search(message, reply.meta["message"]), reply.meta["message"]
    x = torch.randn(3, 128)
    assert torch.allclose(enclave("tail", [x])[0], model.net.forward_units(x, 2, 4), atol=1e-5)
    assert enclave.status()["errors"] == before + 1


def test_client_raises_enclave_error_with_the_reason(enclave):
    with pytest.raises(EnclaveError, match=r"refused 'tail': op 'tail' input 0 is torch.int64 \[2\]"):
        enclave("tail", [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(EnclaveError, match=r"over the caps .*send a smaller batch"):
        enclave("tail", [torch.zeros(1025, 128)])


def _same_uid_attack(pid: int) -> dict:
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the child
        try:
            os.setgroups([])
            os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
            os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
            rc = libc.ptrace(16, pid, None, None)
            pt = 0 if rc == 0 else ctypes.get_errno()
            try:
                open(f"/proc/{pid}/mem", "rb").close()
                mem = 0
            except OSError as e:
                mem = e.errno
            os.write(w, struct.pack("ii", pt, mem))
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 8)
    os.close(r)
    os.waitpid(child, 0)
    pt, mem = struct.unpack("ii", got)
    return {"ptrace": pt, "mem": mem}


@pytest.mark.skipif(USER is None, reason="needs root and a 'nobody' user to run the executor and an attacker "
                    "under the same unprivileged uid")
def test_same_uid_attacker_cannot_read_the_executor(enclave):
    assert enclave.status()["hardening"]["uid"] == NOBODY.pw_uid
    assert _same_uid_attack(enclave.pid) == {"ptrace": errno.EPERM, "mem": errno.EACCES}


# -- In-process: the request loop and the start protocol, without a process (fast, any user). ----------------

@pytest.fixture
def server(model):
    part = build_secure(model.p.spec, {k: v.clone() for k, v in model.p.secure.items()})
    a, b = socket.socketpair()
    srv = Server(b, part, timeout=0.3)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    yield a, srv, t
    a.close()
    t.join(5)
    b.close()


def test_truncated_request_times_out_and_loop_continues(server):
    a, _, _ = server
    a.sendall(_tail([2, 128])[:-100])
    reply = channel.recv(a, max_bytes=1 << 20, timeout=5)
    assert reply.op == "error" and "truncated message" in reply.meta["message"]
    channel.send(a, "status", [])
    st = channel.recv(a, max_bytes=1 << 20, timeout=5)
    assert st.op == "status" and st.meta["errors"] == 1


def test_close_op_ends_the_loop(server):
    a, _, t = server
    channel.send(a, "close", [])
    assert channel.recv(a, max_bytes=1 << 20, timeout=5).op == "closed"
    t.join(5)
    assert not t.is_alive()


def test_over_budget_is_refused_before_hardening(model):
    a, b = socket.socketpair()
    harden_called = []

    def loader(alloc):
        arena = alloc(sum(v.numel() * v.element_size() for v in model.p.secure.values()))
        return model.p.spec, {k: arena.put(v.clone()) for k, v in model.p.secure.items()}

    import chiplock.enclave.harden as hd
    real = hd.harden
    hd.harden = lambda **kw: harden_called.append(kw)
    try:
        with torch.enable_grad():  # run_executor turns autograd off for its process; keep this one's as it was
            rc = run_executor(b, loader, budget=4096, harden=True)
    finally:
        hd.harden = real
    assert rc == 2 and harden_called == []
    msg = channel.recv(a, max_bytes=1 << 16, timeout=5)
    assert msg.op == "error" and msg.meta["type"] == "EnclaveError"
    err = _start_error(msg.meta)
    assert type(err) is EnclaveError and "over its budget of 4,096 bytes; raise --budget-mib" in str(err)
    a.close()
    b.close()


def test_start_errors_keep_their_class():
    assert type(_start_error({"type": "InvalidKey", "message": "x"})) is InvalidKey
    # Anything that is not a chiplock error class becomes an EnclaveError.
    for bad in ("SystemExit", "os", "ChiplockError", "", None):
        err = _start_error({"type": bad, "message": "boom"})
        assert type(err) is EnclaveError and "could not start: boom" in str(err)


# -- Separate executor processes (a few seconds each). ---------------------------------------------------------

def _find_plaintext(roots: list[Path], needles: list[bytes], since: float) -> list[str]:
    """Regular files under ``roots`` changed since ``since`` (and under 64 MiB) that contain any needle."""
    found = subprocess.run(["find", *map(str, roots), "-xdev", "-type", "f", "-newermt", f"@{since:.3f}",
                            "-size", "-65536k", "-print0"], capture_output=True, check=False).stdout
    hits = []
    for name in filter(None, found.split(b"\0")):
        try:
            data = Path(os.fsdecode(name)).read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            hits.append(os.fsdecode(name))
    return hits


@pytest.mark.slow
def test_kill9_leaves_no_plaintext(model, tmp_path, monkeypatch):
    w = model.p.secure["units.2.lin.weight"]
    raw = _raw(w)
    needles = [raw[i:i + 32] for i in range(0, len(raw) - 32, len(raw) // 8)]
    # Control: the scanner finds plaintext where there is some.
    since = time.time() - 1
    (tmp_path / "control.bin").write_bytes(b"x" * 100 + raw[:64])
    assert _find_plaintext([tmp_path], needles, since) == [str(tmp_path / "control.bin")]
    (tmp_path / "control.bin").unlink()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    enc = Enclave.start(model.container, model.license, profile=model.profile, secret_file=model.secret, user=USER,
                        budget_mib=1, seccomp=SECCOMP)
    try:
        enc("tail", [torch.randn(4, 128)])
        os.kill(enc.pid, signal.SIGKILL)
        enc._proc.wait(10)
    finally:
        enc.close()
    assert enc._proc.returncode == -signal.SIGKILL
    roots = [work, tmp_path, Path("/dev/shm"), Path("/tmp"), Path("/var/tmp"), model.dir]
    assert _find_plaintext([r for r in roots if r.exists()], needles, since) == []


@pytest.mark.slow
def test_over_budget_executor_refuses_to_start(model):
    with pytest.raises(EnclaveError, match=r"over its budget of 4,096 bytes; raise --budget-mib"):
        Enclave.start(model.container, model.license, profile=model.profile, secret_file=model.secret,
                      budget_mib=4096 / (1 << 20))


@pytest.mark.slow
def test_executor_on_another_device_or_with_another_secret_is_refused(model, tmp_path):
    _device().save(tmp_path / "other.profile")
    with pytest.raises(InvalidKey):
        Enclave.start(model.container, model.license, profile=tmp_path / "other.profile", secret_file=model.secret)
    (tmp_path / "other.secret").write_bytes(b"another secret")
    with pytest.raises(InvalidKey):
        Enclave.start(model.container, model.license, profile=model.profile, secret_file=tmp_path / "other.secret")


@pytest.mark.slow
def test_unhardened_executor_says_so_and_close_exits_cleanly(model):
    enc = Enclave.start(model.container, model.license, profile=model.profile, secret_file=model.secret,
                        harden=False)
    st = enc.status()
    assert st["hardened"] is False and st["hardening"]["seccomp"] == 0
    enc.close()
    assert enc._proc.returncode == 0
    with pytest.raises(EnclaveError, match="closed; start a new one"):
        enc("tail", [torch.zeros(1, 128)])


def test_executor_main_refuses_a_bad_fd_and_bad_budget(capsys):
    from chiplock.enclave.executor import main

    assert main(["--fd", "1023", "--container", "x", "--license", "y"]) == 2
    assert "fd 1023 is not a socket" in capsys.readouterr().err
    a, b = socket.socketpair()
    try:
        assert main(["--fd", str(b.detach()), "--container", "x", "--license", "y", "--budget-mib", "-1"]) == 2
        msg = channel.recv(a, max_bytes=1 << 16, timeout=5)
        assert msg.op == "error" and "--budget-mib -1.0 is out of range" in msg.meta["message"]
    finally:
        a.close()


def test_connect_to_a_served_executor(model, tmp_path):
    """Enclave.connect: the executor end is an accepted Unix-socket connection (as `chiplock enclave serve`)."""
    path = tmp_path / "enclave.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    codes = []

    def loader(alloc):
        arena = alloc(sum(v.numel() * v.element_size() for v in model.p.secure.values()))
        return model.p.spec, {k: arena.put(v.clone()) for k, v in model.p.secure.items()}

    def serve_one():
        conn, _ = server.accept()
        with conn:
            codes.append(run_executor(conn, loader, budget=1 << 20, harden=False))

    t = threading.Thread(target=serve_one, daemon=True)
    t.start()
    try:
        with Enclave.connect(path, timeout=30) as enc:
            assert enc.pid == os.getpid() and enc.ready["ops"] == ["tail"]
            x = torch.randn(2, 128)
            assert torch.allclose(enc("tail", [x])[0], model.net.forward_units(x, 2, 4), atol=1e-5)
            assert enc.switches == 1
        t.join(10)
        assert codes == [0]
    finally:
        server.close()
    with pytest.raises(EnclaveError, match="cannot connect to an executor on .*chiplock enclave serve"):
        Enclave.connect(tmp_path / "nothing.sock")
