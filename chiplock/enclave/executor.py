"""The secure-world executor (a hardened process holding the secure part) and its host-side client.

The executor process::

    python -m chiplock.enclave.executor --fd N --container PATH --license PATH [--secret-file F]
        [--profile PROFILE.json] [--budget-mib 64] [--no-harden] [--no-seccomp] [--user NAME]

is spawned by the host (:meth:`Enclave.start`) with one end of a socket pair as fd ``N``. It

1. opens its own licence and decrypts its part (group ``enclave``) itself, one tensor at a time, copying each
   into a :class:`~chiplock.enclave.secure_mem.SecureArena` (``memfd_secret``, else locked memory) and zeroing
   the heap copy; a part over ``--budget-mib`` is refused before anything else happens;
2. builds the secure part on those tensors (:func:`~chiplock.enclave.partition.build_secure`, no copy) and runs
   each op once (so torch's threads, allocations and kernels exist before the filter is installed);
3. drops to ``--user`` if given and hardens itself (:func:`~chiplock.enclave.harden.harden`);
4. sends ``ready`` (its status) and serves requests until the host closes the channel or sends ``close``.

Requests are :mod:`~chiplock.enclave.channel` messages. Ops: the partition's own (inputs checked against the
spec: dtype exact, shape exact but for a leading batch dimension <= ``max_batch``; reply ``result``), ``status``
(reply ``status`` with the hardening flags, memory kind, secure bytes and counters in ``meta``) and ``close``.
Anything malformed gets an ``error`` reply (``meta["message"]`` says what) and the executor keeps serving;
errors never carry secure data. A failure to start is sent as ``error`` (with ``meta["type"]``, the chiplock
error class) before the process exits with status 2.

Example:
    >>> with Enclave.start("model.chiplock", "enclave.license", secret_file="enclave.secret") as enc:  # doctest: +SKIP
    ...     logits = HostModel(spec, public, enc)(x)
    ...     enc.status()["hardening"]["seccomp"]
    2
"""

from __future__ import annotations

import argparse
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from chiplock import errors
from chiplock.enclave import channel
from chiplock.enclave.secure_mem import SecureArena
from chiplock.errors import EnclaveError

__all__ = ["Enclave", "Server", "container_loader", "main", "run_executor"]

#: Cap on the executor's replies as the host reads them (the host trusts the executor only so far).
HOST_MAX_REPLY = 1 << 30
#: The largest request payload the executor accepts when the spec declares no op (status / close only).
_MIN_CAP = 1 << 16

#: A loader asks for an arena of the bytes it needs (``alloc(nbytes)``, refused over the budget) and fills it:
#: ``loader(alloc) -> (spec, {name: tensor in the arena})``.
Loader = Callable[[Callable[[int], SecureArena]], tuple[dict[str, Any], dict[str, torch.Tensor]]]


def container_loader(container: str | os.PathLike, license: str | os.PathLike, *, profile: Any = None,
                     secret: bytes | None = None) -> Loader:
    """The executor's production loader: its own licence opens group ``enclave`` of ``container``.

    The arena is sized from the container's header (so a part over the budget is refused before anything is
    decrypted); tensors then stream one at a time from the authenticated container into it, each heap copy zeroed
    as soon as it has been copied. A header that understates a size only makes the arena refuse the tensor.
    """
    def load(alloc: Callable[[int], SecureArena]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        import chiplock
        from chiplock._dtypes import DTYPE_BY_NAME
        from chiplock.enclave import package as pk

        sizes = []
        for name, t in chiplock.inspect(container)["tensors"].items():
            if t.get("group") == pk.ENCLAVE_GROUP and name != pk.ENCLAVE_SPEC and t.get("dtype") in DTYPE_BY_NAME:
                sizes.append(math.prod(t["shape"]) * torch.empty((), dtype=DTYPE_BY_NAME[t["dtype"]]).element_size())
        arena = alloc(SecureArena.size_for(sizes))
        spec = None
        out: dict[str, torch.Tensor] = {}
        for name, t in pk.iter_secure(container, license, profile=profile, secret=secret):
            if name == pk.ENCLAVE_SPEC:
                spec = pk.decode_spec(t, what="the executor's partition spec")
                continue
            if name in out:
                raise EnclaveError(f"tensor {name!r} appears twice in the secure part; obtain an intact model")
            out[name] = arena.put(t)
            t.detach().zero_()
        if spec is None:
            raise EnclaveError(f"the secure part of {os.fspath(container)} holds no spec; package it with "
                               "chiplock.enclave.package.package")
        return spec, out
    return load


def _request_cap(part: Any) -> int:
    """The largest request payload: the biggest op's inputs at ``max_batch``."""
    cap = _MIN_CAP
    for decl in part.ops.values():
        per = sum(math.prod(d["shape"]) * torch.empty((), dtype=channel.DTYPES[d["dtype"]]).element_size()
                  for d in decl["inputs"])
        cap = max(cap, per * part.max_batch)
    return cap


class Server:
    """The executor's request loop over one channel (transport-independent, so it can be tested in-process).

    Args:
        sock: The executor's end of the channel.
        part: The secure part (``ops``, ``max_batch``, ``run(op, inputs)``; see ``SecurePart``).
        info: Extra status fields (memory kind, hardening flags).
        timeout: Seconds a message may take once it started (truncated messages are rejected after it).
    """

    def __init__(self, sock: socket.socket, part: Any, *, info: dict[str, Any] | None = None,
                 timeout: float = 10.0, labels_only: bool = False) -> None:
        self.sock, self.part, self.info, self.timeout = sock, part, dict(info or {}), timeout
        self.labels_only = labels_only
        self.max_bytes = _request_cap(part)
        self.switches = self.bytes_in = self.bytes_out = self.errors = 0

    def status(self) -> dict[str, Any]:
        from chiplock.enclave import harden

        return {**self.info, "hardening": harden.status(), "pid": os.getpid(), "switches": self.switches,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "errors": self.errors,
                "max_batch": self.part.max_batch, "ops": sorted(self.part.ops),
                "outputs": "labels" if self.labels_only else "logits"}

    def _reply_error(self, message: str) -> None:
        self.errors += 1
        channel.send(self.sock, "error", [], {"message": message})

    def handle_one(self) -> bool:
        """Serve one request; returns False when the channel is closed or ``close`` was asked for."""
        try:
            msg = channel.recv(self.sock, max_bytes=self.max_bytes, timeout=self.timeout)
        except channel.PeerClosed:
            return False
        except EnclaveError as e:
            self._reply_error(str(e))
            return True
        except Exception as e:  # noqa: BLE001 -- a message that trips torch itself must not end the executor.
            self._reply_error(f"malformed message ({type(e).__name__}); send messages built by channel.send")
            return True
        if msg.op == "close":
            try:
                channel.send(self.sock, "closed", [], {})
            except EnclaveError:
                pass  # The host did not wait for the answer.
            return False
        if msg.op == "status":
            channel.send(self.sock, "status", [], self.status())
            return True
        if msg.op not in self.part.ops:
            self._reply_error(f"unknown op {msg.op!r}; this executor serves {sorted(self.part.ops)} plus status "
                              "and close")
            return True
        try:
            out = self.part.run(msg.op, msg.tensors)
            if self.labels_only and msg.op in getattr(self.part, "final_ops", ()):
                out = [_one_hot(t) for t in out]
        except EnclaveError as e:
            self._reply_error(str(e))
            return True
        except Exception as e:  # noqa: BLE001 -- never echo what a failed secure op had in hand.
            self._reply_error(f"op {msg.op!r} failed inside the executor ({type(e).__name__}); check the inputs")
            return True
        self.switches += 1
        self.bytes_in += sum(t.numel() * t.element_size() for t in msg.tensors)
        self.bytes_out += sum(t.numel() * t.element_size() for t in out)
        channel.send(self.sock, "result", out, {})
        return True

    def serve(self) -> None:
        """Serve until the host closes the channel or asks to ``close``."""
        while self.handle_one():
            pass


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    """Labels-only answers: the argmax as a one-hot float row (same dtype and shape as the logits, so the host's
    model runs unchanged). Exact logits let a host that chooses inputs solve a hidden linear layer from d + 1
    queries (:func:`chiplock.enclave.extraction.steal_last1`); labels leave it a learning problem."""
    return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)


def _warm_up(part: Any) -> None:
    """Run each op at batch 1 and a mid batch, and one channel round trip with an error path, before hardening.

    Torch creates its thread pool, allocator arenas and kernels on first use, and Python imports some modules
    lazily (JSON, error formatting); after the seccomp filter none of that could open a file.
    """
    for op, decl in part.ops.items():
        for b in sorted({1, min(part.max_batch, 32)}):
            inputs = [torch.zeros((b, *d["shape"]), dtype=channel.DTYPES[d["dtype"]]) for d in decl["inputs"]]
            for t in part.run(op, inputs):
                if t.dim() == 2:
                    _one_hot(t)
    a, b = socket.socketpair()
    try:
        a.sendall(b"XXXX" + bytes(8))
        try:
            channel.recv(b, max_bytes=_MIN_CAP, timeout=1.0)
        except EnclaveError:
            pass
        channel.send(a, "status", [torch.zeros(2)], {"x": [1, "y", None, 1.5]})
        channel.recv(b, max_bytes=_MIN_CAP, timeout=1.0)
    finally:
        a.close()
        b.close()


def _build(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    from chiplock.enclave.partition import build_secure

    return build_secure(spec, tensors)


def run_executor(sock: socket.socket, loader: Loader, *, budget: int, harden: bool = True, seccomp: bool = True,
                 user: str | None = None, memory: str = "auto",
                 build: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any] = _build,
                 labels_only: bool = False, allow_swap: bool = False) -> int:
    """The executor's life after argument parsing: load, build, warm up, harden, serve. Returns an exit status.

    Args:
        sock: The executor's end of the channel.
        loader: Fills the arena (:func:`container_loader` in production).
        budget: Secure-memory budget in bytes.
        harden: Harden before serving (``False`` only for debugging; status reports it).
        seccomp: Install the syscall filter as part of hardening.
        user: Drop to this user before hardening.
        memory: Arena kind (``auto``, ``memfd_secret`` or ``mlock``).
        build: Builds the secure part from ``(spec, tensors)`` (``build_secure``).
        labels_only: Answer the ops that return logits with the argmax only (one-hot rows).
        allow_swap: Serve even when the arena could not be locked in RAM (otherwise a hardening executor refuses).
    """
    try:
        # Nothing forked later may carry the weights; the executor never forks (the filter forbids it too).
        torch.set_grad_enabled(False)
        arenas: list[SecureArena] = []

        def alloc(nbytes: int) -> SecureArena:
            if arenas:
                raise EnclaveError("the loader asked for a second arena; a loader allocates once")
            if nbytes > budget:
                raise EnclaveError(f"the secure part needs at least {nbytes:,} bytes, over its budget of "
                                   f"{budget:,} bytes; raise --budget-mib or use a smaller partition")
            arenas.append(SecureArena(max(nbytes, 1), kind=memory))
            return arenas[0]

        spec, tensors = loader(alloc)
        if not arenas:
            raise EnclaveError("the loader put nothing in secure memory; use container_loader")
        arena = arenas[0]
        if harden and not arena.locked and not allow_swap:
            raise EnclaveError("the secure part could not be locked in RAM (over RLIMIT_MEMLOCK, which secret memory "
                               "also counts against): raise the limit for the executor's user (ulimit -l, "
                               "LimitMEMLOCK= in a systemd unit) or pass --allow-swap to accept swappable weights")
        part = build(spec, tensors)
        info = {"memory": {**arena.info(), "capacity": arena.budget, "budget": budget},
                "secure_bytes": arena.used, "hardened": False}
        _warm_up(part)
        if harden:
            from chiplock.enclave import harden as hd

            hd.harden(user=user, seccomp=seccomp)
            info["hardened"] = True
    except errors.ChiplockError as e:
        _send_start_error(sock, e)
        return 2
    except Exception as e:  # noqa: BLE001 -- a start failure is reported, without a traceback of secure state.
        _send_start_error(sock, EnclaveError(f"the executor failed to start ({type(e).__name__}: {e})"))
        return 2
    server = Server(sock, part, info=info, labels_only=labels_only)
    try:
        channel.send(sock, "ready", [], server.status())
    except EnclaveError:
        return 1  # The host went away before the executor was ready.
    try:
        server.serve()
    except EnclaveError:
        return 1  # The host went away mid-reply.
    return 0


def _send_start_error(sock: socket.socket, e: errors.ChiplockError) -> None:
    try:
        channel.send(sock, "error", [], {"message": str(e), "type": type(e).__name__})
    except EnclaveError:
        pass


def _read_secret(path: str) -> bytes:
    """The vendor secret file's raw bytes (at most 1 MiB)."""
    try:
        with open(path, "rb") as f:
            data = f.read((1 << 20) + 1)
    except OSError as e:
        raise errors.FileAccessError(f"cannot read the secret file {path!r} ({e.strerror}); pass the file that "
                                     "holds the executor's vendor secret (raw bytes)") from None
    if len(data) > 1 << 20:
        raise EnclaveError(f"the secret file {path!r} is larger than 1 MiB; pass the file that holds the vendor "
                           "secret (raw bytes)")
    return data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chiplock.enclave.executor",
                                description="chiplock's secure-world executor (spawned by Enclave.start).")
    p.add_argument("--fd", type=int, required=True, help="the channel's socket fd (inherited)")
    p.add_argument("--container", required=True, help="the partitioned model (chiplock container)")
    p.add_argument("--license", required=True, help="the executor's licence (group enclave)")
    p.add_argument("--secret-file", help="the executor's vendor secret (raw bytes)")
    p.add_argument("--profile", help="the executor's device profile (JSON); default: measure this device")
    p.add_argument("--budget-mib", type=float, default=64.0, help="secure-memory budget in MiB (default 64)")
    p.add_argument("--memory", choices=("auto", "memfd_secret", "mlock"), default="auto",
                   help="secure memory kind (default: memfd_secret where the kernel has it, else mlock)")
    p.add_argument("--no-harden", action="store_true", help="do not harden (debugging only: unprotected)")
    p.add_argument("--no-seccomp", action="store_true", help="harden without the seccomp filter")
    p.add_argument("--user", help="drop to this user before hardening (needs root)")
    p.add_argument("--allow-swap", action="store_true",
                   help="serve even if the secure part cannot be locked in RAM (RLIMIT_MEMLOCK too low)")
    p.add_argument("--labels-only", action="store_true",
                   help="answer the ops that return logits with the argmax only (one-hot rows)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m chiplock.enclave.executor``."""
    args = _parser().parse_args(argv)
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        print(f"chiplock executor: fd {args.fd} is not a socket ({e}); start it with Enclave.start",
              file=sys.stderr)
        return 2
    try:
        if not math.isfinite(args.budget_mib):
            raise EnclaveError(f"--budget-mib {args.budget_mib} is not a number; pass a positive size in MiB")
        budget = int(args.budget_mib * (1 << 20))
        if not 0 < budget <= 1 << 40:
            raise EnclaveError(f"--budget-mib {args.budget_mib} is out of range; pass a positive size in MiB")
        if not args.no_harden:
            from chiplock.enclave.harden import protect_early

            protect_early()  # before the secret or the licence is read
        secret = None
        if args.secret_file:
            secret = _read_secret(args.secret_file)
        profile = None
        if args.profile:
            from chiplock.profile import DeviceProfile

            profile = DeviceProfile.load(args.profile)
    except errors.ChiplockError as e:
        _send_start_error(sock, e)
        return 2
    loader = container_loader(args.container, args.license, profile=profile, secret=secret)
    return run_executor(sock, loader, budget=budget, harden=not args.no_harden, seccomp=not args.no_seccomp,
                        labels_only=args.labels_only, allow_swap=args.allow_swap,
                        user=args.user, memory=args.memory)


def executor_args(container: str | os.PathLike, license: str | os.PathLike, *,
                  secret_file: str | os.PathLike | None = None, profile: str | os.PathLike | None = None,
                  budget_mib: float = 64, harden: bool = True, seccomp: bool = True, user: str | None = None,
                  memory: str = "auto", labels_only: bool = False) -> list[str]:
    """The executor's command-line arguments (after ``--fd N``) for these settings: what :meth:`Enclave.start`
    and ``chiplock enclave serve`` pass to ``python -m chiplock.enclave.executor``."""
    args = ["--container", os.fspath(container), "--license", os.fspath(license),
            "--budget-mib", str(budget_mib), "--memory", memory]
    if secret_file is not None:
        args += ["--secret-file", os.fspath(secret_file)]
    if profile is not None:
        args += ["--profile", os.fspath(profile)]
    if not harden:
        args.append("--no-harden")
    if not seccomp:
        args.append("--no-seccomp")
    if user is not None:
        args += ["--user", str(user)]
    if labels_only:
        args.append("--labels-only")
    return args


class Enclave:
    """Host-side client of one executor process; call it like ``LocalCall``: ``enc(op, inputs) -> outputs``.

    Attributes:
        pid: The executor's process id.
        switches: Calls made (world switches). ``bytes_in``/``bytes_out``: tensor bytes sent in / returned.
        ready: The executor's status as it started (hardening flags, memory kind, ops).
    """

    def __init__(self, proc: subprocess.Popen | None, sock: socket.socket, *, timeout: float | None = None) -> None:
        self._proc, self._sock, self._timeout = proc, sock, timeout
        # One request at a time: the channel is request/response.
        self._lock = threading.Lock()
        self.pid = proc.pid if proc is not None else 0
        self.switches = self.bytes_in = self.bytes_out = 0
        self.ready: dict[str, Any] = {}

    @classmethod
    def start(cls, container: str | os.PathLike, license: str | os.PathLike, *,
              secret_file: str | os.PathLike | None = None, profile: str | os.PathLike | None = None,
              budget_mib: float = 64, harden: bool = True, seccomp: bool = True, user: str | None = None,
              memory: str = "auto", labels_only: bool = False, timeout: float = 60.0) -> Enclave:
        """Spawn an executor for ``container`` with its own licence, wait until it is loaded and hardened.

        Args:
            container: The partitioned model.
            license: The executor's licence file (group ``enclave``).
            secret_file: The executor's vendor secret file (the host never reads it).
            profile: The executor's device profile file (default: the executor measures its device).
            budget_mib: Secure-memory budget.
            harden, seccomp, user, memory, labels_only: As the executor's ``--no-harden``, ``--no-seccomp``,
                ``--user``, ``--memory``, ``--labels-only``.
            timeout: Seconds to wait for the executor to be ready.

        Raises:
            EnclaveError: The executor could not start (the message says why), or did not get ready in time.
            InvalidKey, ProfileError, ...: The executor's licence does not open its part on this device.
        """
        args = executor_args(container, license, secret_file=secret_file, profile=profile, budget_mib=budget_mib,
                             harden=harden, seccomp=seccomp, user=user, memory=memory, labels_only=labels_only)
        return cls._spawn(["-m", "chiplock.enclave.executor"], args, timeout=timeout)

    @classmethod
    def _spawn(cls, prefix: list[str], args: list[str], *, timeout: float, env: dict[str, str] | None = None
               ) -> Enclave:
        """Start ``python <prefix> --fd N <args>`` on a fresh socket pair and wait for ``ready``."""
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen([sys.executable, *prefix, "--fd", str(child.fileno()), *args],
                                    pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            host.close()
            raise EnclaveError(f"cannot start the executor ({e}); check the Python installation") from None
        finally:
            child.close()
        enc = cls(proc, host)
        enc._await_ready(timeout)
        return enc

    @classmethod
    def connect(cls, path: str | os.PathLike, *, timeout: float = 60.0) -> Enclave:
        """Use an executor served on a Unix socket (``chiplock enclave serve``): one executor per connection.

        Raises:
            EnclaveError: Nothing serves on ``path``, or its executor could not start (the message says why).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            raise EnclaveError(f"cannot connect to an executor on {os.fspath(path)!r} ({e.strerror or e}); start "
                               "`chiplock enclave serve` there first") from None
        enc = cls(None, sock)
        enc._await_ready(timeout)
        return enc

    def _await_ready(self, timeout: float) -> None:
        """Wait for the executor's ``ready`` (it loads and hardens first); close and raise if it fails."""
        proc, host = self._proc, self._sock
        deadline = time.monotonic() + timeout
        try:
            while not select.select([host], [], [], 0.2)[0]:
                exited = proc is not None and proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    what = (f"exited with status {proc.returncode}" if exited
                            else f"was not ready after {timeout:g} s")
                    raise EnclaveError(f"the executor {what} without saying why; run it by hand to see its "
                                       "output")
            try:
                msg = channel.recv(host, max_bytes=_MIN_CAP, timeout=max(1.0, deadline - time.monotonic()))
            except channel.PeerClosed:
                code = proc.wait() if proc is not None else "unknown"
                raise EnclaveError(f"the executor exited (status {code}) before it was ready") from None
            if msg.op == "error":
                raise _start_error(msg.meta)
            if msg.op != "ready":
                raise EnclaveError(f"the executor answered {msg.op!r} instead of 'ready'; restart it")
        except BaseException:
            self.close()
            raise
        self.ready = msg.meta
        if proc is None:
            self.pid = int(msg.meta.get("pid", 0))

    def _request(self, op: str, inputs: list[torch.Tensor], meta: dict[str, Any] | None = None
                 ) -> channel.Message:
        with self._lock:
            if self._sock is None:
                raise EnclaveError("the executor is closed; start a new one with Enclave.start")
            channel.send(self._sock, op, inputs, meta)
            try:
                msg = channel.recv(self._sock, max_bytes=HOST_MAX_REPLY, timeout=self._timeout)
            except channel.PeerClosed:
                code = self._proc.poll() if self._proc is not None else "unknown"
                raise EnclaveError(f"the executor died (status {code}); restart it with Enclave.start") from None
        if msg.op == "error":
            raise EnclaveError(f"the executor refused {op!r}: {msg.meta.get('message', 'no reason given')}")
        return msg

    def __call__(self, op: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run secure op ``op`` on ``inputs`` inside the executor; same signature as ``LocalCall``.

        Raises:
            EnclaveError: The executor refused the request (wrong op, dtype, shape or batch) or died.
        """
        inputs = list(inputs)
        msg = self._request(op, inputs)
        if msg.op != "result":
            raise EnclaveError(f"the executor answered {msg.op!r} to {op!r}; restart it")
        self.switches += 1
        self.bytes_in += sum(t.numel() * t.element_size() for t in inputs)
        self.bytes_out += sum(t.numel() * t.element_size() for t in msg.tensors)
        return msg.tensors

    def status(self) -> dict[str, Any]:
        """The executor's status: ``hardening`` flags, ``memory`` (kind, budget, used), counters, ops."""
        return self._request("status", []).meta

    def close(self) -> None:
        """Ask the executor to exit; kill it if it does not within 5 s."""
        with self._lock:
            self._close_channel()
        if self._proc is None:
            return  # A served executor: it exits when its connection closes.
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _close_channel(self) -> None:
        if self._sock is not None:
            try:
                channel.send(self._sock, "close", [], {})
                if select.select([self._sock], [], [], 5.0)[0]:
                    channel.recv(self._sock, max_bytes=_MIN_CAP, timeout=5.0)
            except EnclaveError:
                pass  # Already gone (or the channel is broken): the process is waited for or killed below.
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Enclave:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_error(meta: dict[str, Any]) -> errors.ChiplockError:
    """Re-create the executor's start error on the host: its chiplock class, its message."""
    message = str(meta.get("message", "no reason given"))
    cls = getattr(errors, str(meta.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, errors.ChiplockError) and cls is not errors.ChiplockError:
        try:
            return cls(message)
        except TypeError:
            pass
    return EnclaveError(f"the executor could not start: {message}")


if __name__ == "__main__":
    sys.exit(main())
