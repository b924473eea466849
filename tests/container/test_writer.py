"""The streaming writer: header room reserved up front, tensors streamed to their final offsets, the real header
written into the room padded with spaces, and the rare header that outgrew its room (the data moved up in place)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import chiplock
from chiplock import ContainerError, InvalidTag
from chiplock.container import writer as writer_mod
from chiplock.container.reader import open_container
from chiplock.container.writer import build_header
from chiplock.transforms import get_transform

pytestmark = pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning")

SECRET = b"vendor secret for the writer tests"
TRANSFORMS = ("aes", "shuffle", "pre-aes")


def _weights(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layer{i}.weight": torch.randn(17 + i, 31, generator=g) for i in range(n)}
    out["bias"] = torch.randn(40, generator=g).half()
    out["steps"] = torch.tensor([3, 1, 4], dtype=torch.int64)
    out["empty"] = torch.zeros(0, 3)
    return out


def _header_len(path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


@pytest.fixture
def move_spy(monkeypatch):
    """Records each call of the writer's in-place move (header outgrew its room) and still performs it."""
    calls = []
    real = writer_mod._move_up

    def spy(fd, start, length, delta):
        calls.append((start, length, delta))
        return real(fd, start, length, delta)

    monkeypatch.setattr(writer_mod, "_move_up", spy)
    return calls


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_reserved_room_holds_the_header_and_is_padded_with_spaces(transform, tmp_path, profile, fast_kdf,
                                                                  move_spy, assert_bit_exact):
    w = _weights()
    path = tmp_path / "m.chiplock"
    chiplock.lock(w, path, profile, transform, secret=SECRET, kdf=fast_kdf)
    assert move_spy == [], "the transform's params_reserve was too small for its own parameters"
    raw = path.read_bytes()
    n = _header_len(path)
    body = raw[8:8 + n]
    assert n % 8 == 0
    text = body.rstrip(b" ")
    json.loads(text)
    # The reserve bounds the parameters from above: the real header is shorter and the rest is spaces.
    assert len(text) < n and set(body[len(text):]) == {ord(" ")}
    got = chiplock.unlock(path, profile=profile, secret=SECRET)
    for name, t in w.items():
        assert_bit_exact(got[name], t, name)


@pytest.mark.parametrize("chunk", [None, 4096, 64])
@pytest.mark.parametrize("signed", [False, True])
def test_header_that_outgrew_its_room_moves_the_data_up(chunk, signed, tmp_path, profile, fast_kdf, monkeypatch,
                                                        move_spy, assert_bit_exact):
    # pre-aes parameters (breakpoints, escapes, nonce) are far larger than the 64 spare characters the writer
    # adds to each reserve: with a reserve of 0 every tensor's parameters overflow the room.
    tf = get_transform("pre-aes")
    monkeypatch.setattr(tf, "params_reserve", lambda dtype, numel: 0)
    if chunk is not None:
        monkeypatch.setattr(writer_mod, "_MOVE_CHUNK", chunk)  # several chunks, smaller than the move distance
    w = _weights(30)
    path = tmp_path / "m.chiplock"
    key = Ed25519PrivateKey.generate() if signed else None
    chiplock.lock(w, path, profile, "pre-aes", secret=SECRET, kdf=fast_kdf, signing_key=key)
    (start, length, delta), = move_spy
    assert length == sum(e.end - e.begin for e in open_container(path).entries) > 0
    if chunk is not None:
        assert length > chunk and (chunk > 64 or delta > chunk)
    # The file is a valid container: no gap, no unaccounted byte, the data right after the header.
    c = open_container(path)
    assert c.data_start == 8 + _header_len(path) == start + delta and c.size == path.stat().st_size
    got = chiplock.unlock(path, profile=profile, secret=SECRET,
                          verify_key=key.public_key() if signed else None)
    assert list(got) == list(w)
    for name, t in w.items():
        assert_bit_exact(got[name], t, name)


def test_header_outgrowing_its_room_for_aes(tmp_path, profile, fast_kdf, monkeypatch, move_spy, assert_bit_exact):
    # aes parameters fit the writer's spare characters even with a reserve of 0; a reserve that leaves no spare
    # room (an under-estimating transform) must still give a valid file.
    tf = get_transform("aes")
    monkeypatch.setattr(tf, "params_reserve", lambda dtype, numel: -64)
    w = _weights(10)
    path = tmp_path / "m.chiplock"
    chiplock.lock(w, path, profile, "aes", secret=SECRET, kdf=fast_kdf)
    assert len(move_spy) == 1
    got = chiplock.unlock(path, profile=profile, secret=SECRET)
    for name, t in w.items():
        assert_bit_exact(got[name], t, name)


def test_move_up_in_place_is_exact(tmp_path):
    # Overlapping moves, last chunk first: distance smaller and larger than a chunk, a partial first chunk.
    import os

    data = bytes(range(256)) * 40 + b"tail"
    for chunk, delta in [(7, 3), (7, 19), (1000, 1), (16, 16), (1 << 20, 500)]:
        path = tmp_path / "f.bin"
        path.write_bytes(b"H" * 10 + data + b"\0" * delta)
        fd = os.open(path, os.O_RDWR)
        try:
            old = writer_mod._MOVE_CHUNK
            writer_mod._MOVE_CHUNK = chunk
            try:
                writer_mod._move_up(fd, 10, len(data), delta)
            finally:
                writer_mod._MOVE_CHUNK = old
        finally:
            os.close(fd)
        assert path.read_bytes()[10 + delta:] == data, (chunk, delta)


def test_header_padded_with_extra_spaces_is_accepted(tmp_path, profile, fast_kdf, container_io, assert_bit_exact):
    # A streaming writer may leave any amount of space padding after the JSON; the data starts after it.
    w = _weights(2)
    path = tmp_path / "m.chiplock"
    chiplock.lock(w, path, profile, "aes", secret=SECRET, kdf=fast_kdf)
    raw = path.read_bytes()
    n = _header_len(path)
    for pad in (8, 4096, 100_000):
        padded = tmp_path / f"pad{pad}.chiplock"
        padded.write_bytes(struct.pack("<Q", n + pad) + raw[8:8 + n] + b" " * pad + raw[8 + n:])
        assert chiplock.inspect(padded)["tensors"] == chiplock.inspect(path)["tensors"]
        got = chiplock.unlock(padded, profile=profile, secret=SECRET)
        for name, t in w.items():
            assert_bit_exact(got[name], t, name)
    # Padding that is not JSON whitespace is not a header.
    bad = tmp_path / "nul.chiplock"
    bad.write_bytes(struct.pack("<Q", n + 8) + raw[8:8 + n] + b"\0" * 8 + raw[8 + n:])
    with pytest.raises(ContainerError, match="not valid JSON"):
        chiplock.inspect(bad)
    # Space padding taken from the data (a header length that swallows tensor bytes) is not accepted either.
    bad.write_bytes(struct.pack("<Q", n + 8) + raw[8:])
    with pytest.raises(ContainerError):
        chiplock.unlock(bad, profile=profile, secret=SECRET)


def test_build_header_pads_to_the_room_and_to_8():
    meta = {"format": "chiplock", "version": 3}
    entries = [("a", "F32", (2, 3), 24), ("b", "U8", (5,), 5)]
    plain = build_header(meta, entries)
    (n,) = struct.unpack("<Q", plain[:8])
    assert n == len(plain) - 8 and n % 8 == 0
    header = json.loads(plain[8:])
    assert header["a"]["data_offsets"] == [0, 24] and header["b"]["data_offsets"] == [24, 29]
    assert json.loads(header["__metadata__"]["chiplock"]) == meta
    roomy = build_header(meta, entries, room=n + 1001)
    (m,) = struct.unpack("<Q", roomy[:8])
    assert m >= n + 1001 and m % 8 == 0 and roomy[8:8 + n].rstrip(b" ") == plain[8:].rstrip(b" ")
    assert set(roomy[8 + len(plain[8:].rstrip(b" ")):]) == {ord(" ")}
    # A room smaller than the header never truncates it.
    assert build_header(meta, entries, room=10) == plain


def test_writer_refuses_a_tensor_that_does_not_match_the_plan(tmp_path):
    import numpy as np

    from chiplock.container.schema import Group, Metadata
    from chiplock.container.writer import ContainerWriter, Planned

    meta = Metadata(content_id="ab" * 16, groups={"main": Group("shuffle", "")}, tensors={})
    plan = [Planned("a", "main", "F32", (4,), "F32", 64), Planned("b", "main", "F32", (2,), "F32", 64)]
    with open(tmp_path / "x", "wb+") as fh:
        w = ContainerWriter(fh, meta, plan)
        with pytest.raises(RuntimeError, match="does not match the plan"):
            w.add("b", np.zeros(2, np.float32), {})
        w.add("a", np.zeros(4, np.float32), {})
        with pytest.raises(RuntimeError, match="does not match the plan"):
            w.add("b", np.zeros(3, np.float32), {})
        with pytest.raises(RuntimeError, match="not every planned tensor was written"):
            w.finish()


def test_stored_maps_exactly_one_tensor(tmp_path, profile, fast_kdf):
    import numpy as np

    w = _weights(3)
    path = tmp_path / "m.chiplock"
    chiplock.lock(w, path, profile, "shuffle", secret=SECRET, kdf=fast_kdf)
    c = open_container(path)
    raw = path.read_bytes()
    for e in c.entries:
        with c.stored(e) as arr:
            assert arr.dtype == np.uint8 and (arr.size == 0 or not arr.flags.writeable)
            assert arr.tobytes() == raw[c.data_start + e.begin:c.data_start + e.end], e.name


def test_data_moved_without_its_header_is_caught(tmp_path, profile, fast_kdf, monkeypatch):
    # A move that went wrong (here: a move that does nothing) must not give a file that unlocks to garbage.
    tf = get_transform("pre-aes")
    monkeypatch.setattr(tf, "params_reserve", lambda dtype, numel: 0)
    monkeypatch.setattr(writer_mod, "_move_up", lambda fd, start, length, delta: None)
    path = tmp_path / "m.chiplock"
    with pytest.raises(ContainerError, match="truncated or has trailing bytes"):
        # lock reads back what it wrote (its return value is inspect's): the header no longer fits the data.
        chiplock.lock(_weights(4), path, profile, "pre-aes", secret=SECRET, kdf=fast_kdf)
    with pytest.raises((ContainerError, InvalidTag)):
        chiplock.unlock(path, profile=profile, secret=SECRET)
