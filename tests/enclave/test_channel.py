"""The executor's channel: typed tensors round-trip bit-exactly; every malformed message is refused cleanly and the
stream stays in step (the next, valid message is read normally)."""

from __future__ import annotations

import json
import pickle
import socket
import struct
import threading

import pytest
import torch

from chiplock.enclave import channel
from chiplock.enclave.channel import MAGIC, MAX_HEADER, PeerClosed, recv, send
from chiplock.errors import EnclaveError

CAP = 1 << 20


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _frame(header: bytes, payload: bytes = b"", *, magic: bytes = MAGIC, hlen: int | None = None,
           plen: int | None = None) -> bytes:
    return struct.pack(">4sII", magic, len(header) if hlen is None else hlen,
                       len(payload) if plen is None else plen) + header + payload


def _hdr(op="tail", tensors=(), meta=None) -> bytes:
    return json.dumps({"op": op, "tensors": list(tensors), "meta": meta or {}}).encode()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _still_in_step(a, b):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    send(a, "next", [x])
    m = recv(b, max_bytes=CAP, timeout=2.0)
    assert m.op == "next" and torch.equal(m.tensors[0], x)


def test_round_trip_every_dtype(pair):
    a, b = pair
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g).half(), torch.randn(3, generator=g).bfloat16(),
          torch.randn(2, generator=g).double(), torch.tensor([-3, 7], dtype=torch.int8),
          torch.tensor([-300, 5], dtype=torch.int16), torch.tensor([1 << 30], dtype=torch.int32),
          torch.tensor([-(1 << 60)], dtype=torch.int64), torch.arange(5, dtype=torch.uint8),
          torch.tensor([True, False]), torch.zeros(0, 5), torch.tensor(2.5), torch.randn(3, 4, generator=g).t()]
    n = send(a, "x.y-z_1", ts, {"k": [1, "a", None]})
    m = recv(b, max_bytes=CAP)
    assert m.op == "x.y-z_1" and m.meta == {"k": [1, "a", None]} and m.nbytes == n
    assert len(m.tensors) == len(ts)
    for got, want in zip(m.tensors, ts):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _raw(got) == _raw(want)


def test_nan_payload_and_signed_zero_survive(pair):
    a, b = pair
    x = torch.tensor([0x7FC00001, -0x80000000], dtype=torch.int32).view(torch.float32)
    send(a, "t", [x])
    assert torch.equal(recv(b, max_bytes=CAP).tensors[0].view(torch.int32), x.view(torch.int32))


def test_send_refuses_what_cannot_cross(pair):
    a, _ = pair
    with pytest.raises(EnclaveError, match="dtype torch.complex64 cannot cross"):
        send(a, "t", [torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(EnclaveError, match="not a short identifier"):
        send(a, "../etc", [])
    with pytest.raises(EnclaveError, match="only tensors cross"):
        send(a, "t", [[1.0, 2.0]])
    with pytest.raises(EnclaveError, match="header is .* over the 16384-byte cap"):
        send(a, "t", [], {"x": "y" * MAX_HEADER})


@pytest.mark.parametrize("frame, message", [
    (_frame(_hdr(), magic=b"XXXX"), "bad magic"),
    (_frame(b"{}", hlen=MAX_HEADER + 1), "over the caps"),
    (_frame(b"{}", plen=CAP + 1), "over the caps"),
    (_frame(b"\xff\xfe"), "not valid UTF-8 JSON"),
    (_frame(b"{'op': 'x'}"), "not valid UTF-8 JSON"),
    (_frame(b"[1, 2]"), "must be a JSON object"),
    (_frame(pickle.dumps({"op": "tail"})), "not valid UTF-8 JSON"),
    (_frame(b'{"op": "x", "tensors": [], "meta": {}, "code": 1}'), "must be a JSON object"),
    (_frame(b'{"op": "x", "meta": {"a": NaN}}'), "not valid UTF-8 JSON"),
    (_frame(_hdr(op="")), "not a short identifier"),
    (_frame(_hdr(op=7)), "not a short identifier"),
    (_frame(_hdr(meta=None) .replace(b'"meta": {}', b'"meta": [1]')), "meta must be a JSON object"),
    (_frame(_hdr(meta={"a": [[[[[[[[[[1]]]]]]]]]]})), "nested at most"),
    (_frame(_hdr(tensors=[{"dtype": "object", "shape": [1]}]), b"\0" * 8), "dtype 'object' is not one of"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [-1]}]), b""), "non-negative integers"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [1.5]}]), b""), "non-negative integers"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [True]}]), b"\0" * 4), "non-negative integers"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [1] * 9}]), b"\0" * 4), "non-negative integers"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [2]}]), b"\0" * 12), "add up to 8 bytes"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [4]}]), b"\0" * 12), "payload is 12"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [1 << 31, 1 << 31]}]), b"\0" * 12), "too large"),
    # Empty, but torch's stride computation overflows: must be refused, not crash the executor (review finding).
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [0] + [(1 << 32) - 1] * 7}]), b""), "too large"),
    (_frame(_hdr(tensors=[{"dtype": "float32", "shape": [1], "x": 1}]), b"\0" * 4), "expected"),
    (_frame(_hdr(tensors=[{"dtype": "uint8", "shape": [1]}] * 65), b"\0" * 65), "at most 64 entries"),
])
def test_malformed_message_is_refused_and_stream_stays_in_step(pair, frame, message):
    a, b = pair
    a.sendall(frame)
    with pytest.raises(EnclaveError, match=message):
        recv(b, max_bytes=CAP, timeout=2.0)
    _still_in_step(a, b)


def test_truncated_message_times_out(pair):
    a, b = pair
    a.sendall(_frame(_hdr(tensors=[{"dtype": "float32", "shape": [4]}]), b"\0" * 16)[:-5])
    with pytest.raises(EnclaveError, match="truncated message: 11 of 16 bytes"):
        recv(b, max_bytes=CAP, timeout=0.2)
    a.sendall(b"\0" * 5)  # The rest arrives late: it is discarded with the broken message's tail.
    channel.drain(b)
    _still_in_step(a, b)


def test_truncated_prefix_times_out(pair):
    a, b = pair
    a.sendall(MAGIC[:3])
    with pytest.raises(EnclaveError, match="truncated message"):
        recv(b, max_bytes=CAP, timeout=0.2)


def test_peer_closed_between_and_within_messages(pair):
    a, b = pair
    a.close()
    with pytest.raises(PeerClosed):
        recv(b, max_bytes=CAP)
    c, d = socket.socketpair()
    c.sendall(_frame(_hdr(tensors=[{"dtype": "uint8", "shape": [10]}]), b"\0" * 4, plen=10))
    c.close()
    with pytest.raises(EnclaveError, match="peer closed the channel after 4 of 10") as e:
        recv(d, max_bytes=CAP)
    assert not isinstance(e.value, PeerClosed)
    d.close()


def test_large_message_streams_through(pair):
    a, b = pair
    x = torch.randn(256, 1, 28, 28)
    t = threading.Thread(target=send, args=(a, "big", [x]))
    t.start()
    m = recv(b, max_bytes=x.numel() * 4)
    t.join()
    assert torch.equal(m.tensors[0], x)
    # The cap is the receiver's: one byte less is refused.
    t = threading.Thread(target=send, args=(a, "big", [x]))
    t.start()
    with pytest.raises(EnclaveError, match="over the caps"):
        recv(b, max_bytes=x.numel() * 4 - 1)
    t.join()
