"""The narrow, typed channel between the host and the secure-world executor.

One message on the wire::

    >4sII   magic b"CLE1", header length (<= 16 KiB), payload length (<= the receiver's cap)
    header  UTF-8 JSON {"op": str, "tensors": [{"dtype": "float32", "shape": [...]}, ...], "meta": {...}}
    payload the tensors' raw little-endian bytes, in order, with no gap and nothing after the last one

The receiver checks every field before it reads the payload: the magic, both lengths against their caps, the
header's JSON (bounded depth and size), the op name, each dtype against an allowlist, each shape (at most
:data:`MAX_DIMS` non-negative dimensions), and that the tensors' sizes add up to exactly the payload length.
Nothing is ever unpickled. Every violation raises :class:`~chiplock.errors.EnclaveError`.

Resynchronisation: the channel is request/response over a stream socket. When a header is rejected after its
lengths were read and accepted, :func:`recv` reads and discards the declared payload, so the stream stays in step
and the next message is read normally. When the lengths themselves are rejected (bad magic, a length over its
cap) the framing is lost: :func:`recv` discards what has already arrived (:func:`drain`), which works because the
host sends one request and then waits for the answer. A message whose rest does not arrive within ``timeout``
seconds of its first byte is rejected as truncated.

Example:
    >>> a, b = socket.socketpair()                                   # doctest: +SKIP
    >>> send(a, "tail", [torch.zeros(2, 64)])                          # doctest: +SKIP
    >>> recv(b, max_bytes=1 << 20).tensors[0].shape                    # doctest: +SKIP
    torch.Size([2, 64])
"""

from __future__ import annotations

import json
import math
import re
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from chiplock.errors import EnclaveError

__all__ = [
    "DTYPES",
    "MAGIC",
    "MAX_DIMS",
    "MAX_HEADER",
    "MAX_TENSORS",
    "Message",
    "PeerClosed",
    "drain",
    "recv",
    "send",
    "tensor_specs",
]

MAGIC = b"CLE1"
_PREFIX = struct.Struct(">4sII")
#: Largest header (JSON) accepted, in bytes.
MAX_HEADER = 16 * 1024
#: Most tensors in one message, and most dimensions per tensor.
MAX_TENSORS = 64
MAX_DIMS = 8
#: Longest op name; op names are short identifiers.
_OP_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: The wire's dtype names (torch's own spelling) and the only dtypes that cross the channel.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_JSON_DEPTH = 8


class PeerClosed(EnclaveError):
    """The other end closed the channel between two messages (a clean end, not a malformed message)."""


@dataclass
class Message:
    """A received message: its op, its tensors (CPU, contiguous) and its JSON ``meta``."""

    op: str
    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def tensor_specs(tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
    """The header's description of ``tensors`` (dtype name and shape of each)."""
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise EnclaveError(f"only tensors cross the channel, got {type(t).__name__}; pass torch tensors")
        if t.dtype not in _NAMES:
            raise EnclaveError(f"dtype {t.dtype} cannot cross the channel; use one of {', '.join(DTYPES)}")
        out.append({"dtype": _NAMES[t.dtype], "shape": list(t.shape)})
    return out


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian, without a copy when it is already contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if sys.byteorder != "little" and t.element_size() > 1:
        t = t.view(torch.uint8).view(*t.shape, t.element_size()).flip(-1).contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def send(sock: socket.socket, op: str, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...] = (),
         meta: dict[str, Any] | None = None) -> int:
    """Send one message; returns the bytes written (prefix + header + payload).

    Raises:
        EnclaveError: A bad op name, a tensor of an unsupported dtype, a header over :data:`MAX_HEADER`, or the
            peer is gone.
    """
    if not isinstance(op, str) or not _OP_RE.fullmatch(op):
        raise EnclaveError(f"op name {op!r} is not a short identifier (letters, digits, _ . -)")
    tensors = list(tensors)
    if len(tensors) > MAX_TENSORS:
        raise EnclaveError(f"{len(tensors)} tensors in one message, over the cap of {MAX_TENSORS}")
    header = json.dumps({"op": op, "tensors": tensor_specs(tensors), "meta": meta or {}},
                        separators=(",", ":"), allow_nan=False).encode()
    if len(header) > MAX_HEADER:
        raise EnclaveError(f"message header is {len(header)} bytes, over the {MAX_HEADER}-byte cap; "
                           "shorten the meta data")
    bufs = [_raw(t) for t in tensors]
    payload = sum(b.nbytes for b in bufs)
    if payload >= 1 << 32:
        raise EnclaveError(f"payload of {payload:,} bytes does not fit one message; send a smaller batch")
    parts = [memoryview(_PREFIX.pack(MAGIC, len(header), payload) + header), *[b for b in bufs if b.nbytes]]
    try:
        # One gathered write (one wake-up of the peer) for the whole message; sendmsg may stop short, so go on
        # from where it stopped.
        while parts:
            sent = sock.sendmsg(parts)
            while parts and sent >= parts[0].nbytes:
                sent -= parts[0].nbytes
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]
    except OSError as e:
        raise EnclaveError(f"the channel is closed ({e.strerror or e}); restart the executor") from None
    return _PREFIX.size + len(header) + payload


def _read_exact(sock: socket.socket, n: int, deadline: float | None, *, into: bytearray | None = None) -> bytearray:
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            # What has arrived is read without waiting (no select per read: most of a message is there already).
            k = sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT if deadline is not None else 0)
        except (BlockingIOError, InterruptedError):
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and (left <= 0 or not select.select([sock], [], [], left)[0]):
                raise EnclaveError(f"truncated message: {got} of {n} bytes arrived before the timeout; send "
                                   "complete messages") from None
            continue
        except OSError as e:
            raise EnclaveError(f"the channel failed ({e.strerror or e}); restart the executor") from None
        if k == 0:
            raise EnclaveError(f"truncated message: the peer closed the channel after {got} of {n} bytes")
        got += k
    return buf


def drain(sock: socket.socket, *, quiet: float = 0.05, limit: float = 2.0) -> int:
    """Discard what is in flight until the socket has been quiet for ``quiet`` s (at most ``limit`` s)."""
    dropped, end = 0, time.monotonic() + limit
    scratch = bytearray(65536)
    while time.monotonic() < end:
        if not select.select([sock], [], [], quiet)[0]:
            break
        try:
            k = sock.recv_into(scratch)
        except OSError:
            break
        if k == 0:
            break
        dropped += k
    return dropped


def _no_const(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(x: Any, d: int = 0) -> int:
    if d > _JSON_DEPTH:
        return d
    if isinstance(x, dict):
        return max([_depth(v, d + 1) for v in x.values()], default=d + 1)
    if isinstance(x, list):
        return max([_depth(v, d + 1) for v in x], default=d + 1)
    return d


def _parse_header(raw: bytes | bytearray, payload: int) -> tuple[str, list[tuple[torch.dtype, tuple[int, ...]]],
                                                                    dict[str, Any]]:
    try:
        h = json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_const)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnclaveError("message header is not valid UTF-8 JSON; send a header built by channel.send") from None
    if not isinstance(h, dict) or set(h) - {"op", "tensors", "meta"} or "op" not in h:
        raise EnclaveError('message header must be a JSON object with "op", "tensors" and "meta" only')
    op, specs, meta = h["op"], h.get("tensors", []), h.get("meta", {})
    if not isinstance(op, str) or not _OP_RE.fullmatch(op):
        raise EnclaveError("message op is not a short identifier (letters, digits, _ . -)")
    if not isinstance(meta, dict) or _depth(meta) > _JSON_DEPTH:
        raise EnclaveError(f"message meta must be a JSON object nested at most {_JSON_DEPTH} deep")
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise EnclaveError(f"message tensors must be a list of at most {MAX_TENSORS} entries")
    out, total = [], 0
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or set(s) != {"dtype", "shape"}:
            raise EnclaveError(f'tensor {i}: expected {{"dtype": ..., "shape": [...]}}')
        dt, shape = s["dtype"], s["shape"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise EnclaveError(f"tensor {i}: dtype {str(dt)[:32]!r} is not one of {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d < 1 << 32 for d in shape)):
            raise EnclaveError(f"tensor {i}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if math.prod(max(d, 1) for d in shape) >= 1 << 62:
            # An empty tensor with huge other dimensions still overflows torch's stride computation.
            raise EnclaveError(f"tensor {i}: shape {shape[:MAX_DIMS]} is too large even when empty")
        dtype = DTYPES[dt]
        total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if total > payload:
            break
        out.append((dtype, tuple(shape)))
    if total != payload:
        raise EnclaveError(f"the tensors' sizes add up to {total:,} bytes but the payload is {payload:,}; "
                           "the header does not describe the payload")
    return op, out, meta


def recv(sock: socket.socket, *, max_bytes: int, timeout: float | None = 10.0) -> Message:
    """Receive one message, checking it fully before trusting any of it.

    Args:
        sock: A connected stream socket.
        max_bytes: The largest payload accepted (the receiver's cap).
        timeout: Seconds the rest of a message may take once its first byte arrived (``None``: no limit).
            Waiting for the first byte has no limit.

    Returns:
        The :class:`Message`; its tensors are fresh CPU tensors over the received bytes.

    Raises:
        PeerClosed: The peer closed the channel between messages.
        EnclaveError: Anything malformed (the message says what); the stream is back in step afterwards
            (see the module docstring).
    """
    first = bytearray(_PREFIX.size)
    while True:
        try:
            # Waits for the first byte without limit; takes as much of the prefix as has arrived.
            k = sock.recv_into(first, _PREFIX.size)
            break
        except InterruptedError:
            continue
        except OSError as e:
            raise PeerClosed(f"the channel failed ({e.strerror or e})") from None
    if k == 0:
        raise PeerClosed("the peer closed the channel")
    deadline = None if timeout is None else time.monotonic() + timeout
    if k < _PREFIX.size:
        first[k:] = _read_exact(sock, _PREFIX.size - k, deadline)
    magic, hlen, plen = _PREFIX.unpack(bytes(first))
    if magic != MAGIC:
        drain(sock)
        raise EnclaveError("bad magic: this is not a chiplock enclave message (expected b'CLE1')")
    if hlen > MAX_HEADER or plen > max_bytes:
        drain(sock)
        raise EnclaveError(f"message of {hlen:,} header and {plen:,} payload bytes is over the caps "
                           f"({MAX_HEADER:,} / {max_bytes:,}); send a smaller batch")
    header = _read_exact(sock, hlen, deadline)
    try:
        op, specs, meta = _parse_header(header, plen)
    except EnclaveError:
        # The lengths were sane: skip the payload so the next message is read in step.
        left = plen
        scratch = bytearray(min(plen, 1 << 20) or 1)
        while left:
            n = min(left, len(scratch))
            _read_exact(sock, n, deadline, into=scratch)
            left -= n
        raise
    payload = _read_exact(sock, plen, deadline) if plen else bytearray()
    tensors, off = [], 0
    for dtype, shape in specs:
        size = torch.empty((), dtype=dtype).element_size()
        n = math.prod(shape)
        if n == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        if off % size == 0 and sys.byteorder == "little":
            t = torch.frombuffer(payload, dtype=dtype, count=n, offset=off)
        else:
            # An unaligned or big-endian tensor gets its own (aligned, native-order) copy.
            t = torch.frombuffer(payload, dtype=torch.uint8, count=n * size, offset=off).clone()
            if sys.byteorder != "little" and size > 1:
                t = t.view(n, size).flip(-1).contiguous().view(-1)
            t = t.view(dtype)
        tensors.append(t.view(shape))
        off += n * size
    return Message(op, tensors, meta, _PREFIX.size + hlen + plen)
