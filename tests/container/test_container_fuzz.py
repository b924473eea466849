"""Fuzz the container reader: any mutation of a valid file either still opens or raises a ChiplockError
subclass, never another exception, and never hangs."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import chiplock
from chiplock import ChiplockError

pytestmark = pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning")
TIME_LIMIT_S = 5.0


@pytest.fixture(scope="module")
def valid_files(profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    w = {"a": torch.randn(150), "b": torch.randn(3, 5).half(), "c": torch.tensor([1, 2, 3], dtype=torch.int8)}
    files = {}
    for tf in ("aes", "shuffle", "pre-aes"):
        path = folder / f"{tf}.chiplock"
        chiplock.lock(w, path, profile, tf, kdf=chiplock.keys.KdfParams(**chiplock.keys.INSECURE_FAST))
        files[tf] = path.read_bytes()
    return files


def _exercise(data: bytes, profile) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.chiplock"
        path.write_bytes(data)
        start = time.perf_counter()
        for fn in (lambda: chiplock.inspect(path), lambda: chiplock.unlock(path, profile=profile)):
            try:
                fn()
            except ChiplockError:
                pass
            # Anything else propagates and fails the test with the mutation hypothesis found.
        assert time.perf_counter() - start < TIME_LIMIT_S, "the reader took too long on a mutated file"


mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(("aes", "shuffle", "pre-aes")), flips=mutations,
       in_header=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1)),
       extra=st.binary(max_size=16))
def test_byte_mutations(which, flips, in_header, cut, extra, valid_files, profile):
    data = bytearray(valid_files[which])
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    span = 8 + n if in_header else len(data)
    for where, xor in flips:
        data[int(where * span)] ^= xor
    if cut is not None:
        data = data[:int(cut * len(data))]
    _exercise(bytes(data) + extra, profile)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(("aes", "shuffle", "pre-aes")), tensor=st.sampled_from(("a", "b", "c")),
       field=st.sampled_from(("dtype", "shape", "data_offsets", "extra", "whole")), value=json_values)
def test_header_entry_mutations(which, tensor, field, value, valid_files, profile):
    # The safetensors part of the header is outside the header digest: anything may be written there.
    raw = valid_files[which]
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if field == "whole":
        header[tensor] = value
    else:
        header[tensor][field] = value
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    _exercise(struct.pack("<Q", len(body)) + body + raw[8 + n:], profile)


small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(("aes", "shuffle", "pre-aes")),
       path=st.sampled_from((("transform",), ("sources",), ("secret",), ("tensors",), ("tensors", "a"),
                             ("tensors", "a", "dtype"), ("tensors", "a", "shape"), ("tensors", "a", "params"),
                             ("tensors", "b", "params", "nonce"), ("tensors", "b", "params", "breaks"),
                             ("tensors", "a", "digest"), ("kdf",), ("kdf", "salt"), ("kdf", "algorithm"),
                             ("sources", 0), ("sources", 0, "helper"), ("key_check",))),
       value=small_json)
def test_tampered_metadata_with_recomputed_digest(which, path, value, valid_files, profile, container_io):
    # An attacker can rewrite an unsigned file's metadata and recompute the (unkeyed) header digest. Values
    # are kept small so a mutation cannot ask for terabytes; KDF cost caps are a separate question.
    read, write = container_io
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.chiplock"
        src.write_bytes(valid_files[which])
        meta, header, data = read(src)
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        write(src, meta, header, data)
        mutated = src.read_bytes()
    _exercise(mutated, profile)
