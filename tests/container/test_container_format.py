"""The container: a safetensors file readable by the safetensors library, and every kind of bad file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import chiplock
from chiplock import ContainerError, InvalidTag
from chiplock._digest import TREE_CHUNK, tree_digest
from chiplock.container.schema import FORMAT_VERSION, MAX_HEADER, canonical, header_digest

pytestmark = pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning")

TRANSFORMS = ("aes", "shuffle", "pre-aes")
VECTORS = Path(__file__).parents[1] / "vectors"
FIX = r"re-download it, or lock the model again with `chiplock lock`"
SECRET = b"vendor secret for container tests"


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 1, 3, 3, generator=g), "fc.weight": torch.randn(10, 33, generator=g),
            "fc.bias": torch.randn(10, generator=g).half(), "scale": torch.tensor(2.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 4), "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
            "mask": torch.tensor([True, False, True])}


@pytest.fixture(params=TRANSFORMS)
def locked(request, tmp_path, profile, fast_kdf, weights):
    path = tmp_path / f"{request.param}.chiplock"
    chiplock.lock(weights, path, profile, request.param, secret=SECRET, kdf=fast_kdf)
    return path, request.param


# --- readable by safetensors ----------------------------------------------------------------------------------


def test_safetensors_lists_names_shapes_and_dtypes(locked, weights):
    from safetensors import safe_open

    path, transform = locked
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(weights)
        meta = json.loads(f.metadata()["chiplock"])
        assert meta["format"] == "chiplock" and meta["version"] == FORMAT_VERSION
        assert {k: g["transform"] for k, g in meta["groups"].items()} == {"main": transform}
        for name, t in weights.items():
            sl = f.get_slice(name)
            assert sl.get_shape() == list(t.shape), name
            stored = sl.get_dtype()
            if transform == "pre-aes":
                code_width = {1: "U16", 2: "U32", 4: "U64", 8: "U64"}[t.element_size()]
                assert stored == code_width, name
            else:
                assert stored == chiplock.transforms.DTYPE_NAMES[t.dtype], name


def test_safetensors_load_file_returns_the_stored_not_the_plain_weights(locked, weights):
    # The torch loader: aes and shuffle store bf16 tensors as BF16, which numpy cannot represent.
    from safetensors.torch import load_file

    path, transform = locked
    stored = load_file(str(path))
    assert set(stored) == set(weights)
    w = weights["fc.weight"]
    if transform != "shuffle":  # shuffle keeps the values, only their order changes
        assert stored["fc.weight"].numpy().tobytes() != w.numpy().tobytes()
    assert stored["fc.weight"].shape == tuple(w.shape)


def test_layout_is_aligned_and_has_no_unaccounted_bytes(locked):
    path, _ = locked
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert 8 + n + ends[-1][1] == len(raw)


def test_header_digest_and_canonical_cover_everything_but_themselves(locked, container_io):
    path, _ = locked
    meta, _, _ = container_io[0](path)
    assert meta["header_digest"] == header_digest(meta)
    body = json.loads(canonical(meta))
    assert "header_digest" not in body and set(body) == set(meta) - {"header_digest", "signature"}
    # The embedded licence and the group MACs are inside what the digest covers.
    assert body["license"] == meta["license"] and body["groups"] == meta["groups"]


def test_tree_digest_vectors_and_definition():
    vec = json.loads((VECTORS / "tree_digest.json").read_text())
    for n, want in vec.items():
        data = (np.arange(int(n), dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
        assert tree_digest(data) == want
        # The definition in docs/FORMAT.md, recomputed independently of the pooled implementation.
        from blake3 import blake3

        h = blake3(b"chiplock/tree/v1")
        for s in range(0, data.nbytes, TREE_CHUNK):
            h.update(blake3(data[s:s + TREE_CHUNK].tobytes()).digest())
        assert h.hexdigest() == want


# --- bad files ------------------------------------------------------------------------------------------------


def _both(path, profile):
    """inspect (header only) and unlock must both refuse."""
    errors = []
    for fn in (lambda: chiplock.inspect(path), lambda: chiplock.unlock(path, profile=profile, secret=SECRET)):
        with pytest.raises(ContainerError) as exc:
            fn()
        errors.append(str(exc.value))
    return errors


@pytest.mark.parametrize("cut", ["empty", 4, 8, "mid-header", "end-header", "mid-data", "minus-1"])
def test_truncated_file(cut, locked, profile, tmp_path):
    path, _ = locked
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    at = {"empty": 0, "mid-header": 8 + n // 2, "end-header": 8 + n, "mid-data": 8 + n + (len(raw) - 8 - n) // 2,
          "minus-1": len(raw) - 1}.get(cut, cut)
    bad = tmp_path / "cut.chiplock"
    bad.write_bytes(raw[:at])
    for msg in _both(bad, profile):
        assert "truncated" in msg or "shorter than a header" in msg
        assert "re-download" in msg


def test_trailing_bytes(locked, profile, tmp_path):
    path, _ = locked
    bad = tmp_path / "tail.chiplock"
    bad.write_bytes(path.read_bytes() + b"\0" * 8)
    for msg in _both(bad, profile):
        assert "truncated or has trailing bytes" in msg and "re-download" in msg


def test_bit_flipped_tensor_bytes_raise_invalid_tag_without_detail(locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    for name, entry in header.items():
        if name == "__metadata__" or entry["data_offsets"][0] == entry["data_offsets"][1]:
            continue
        for pos in {entry["data_offsets"][0], entry["data_offsets"][1] - 1}:
            flipped = bytearray(data)
            flipped[pos] ^= 0x80
            bad = tmp_path / "flip.chiplock"
            write(bad, meta, header, bytes(flipped), redigest=False)
            chiplock.inspect(bad)  # the header is intact
            with pytest.raises(InvalidTag) as exc:
                chiplock.unlock(bad, profile=profile, secret=SECRET)
            assert str(exc.value) == str(InvalidTag()), "authentication failures carry no detail"
            assert name not in str(exc.value)


def test_bit_flipped_metadata_raises_invalid_tag(locked, profile, tmp_path):
    # A digit of the embedded licence's KDF cost: the header digest covers the licence too.
    path, _ = locked
    raw = bytearray(path.read_bytes())
    i = raw.index(b"memory_kib") + len(b'memory_kib\\": ')
    assert chr(raw[i]).isdigit()
    raw[i] = ord("9") if raw[i] != ord("9") else ord("7")
    bad = tmp_path / "meta.chiplock"
    bad.write_bytes(bytes(raw))
    for fn in (lambda: chiplock.inspect(bad), lambda: chiplock.unlock(bad, profile=profile, secret=SECRET)):
        with pytest.raises(InvalidTag):
            fn()


def test_bit_flipped_header_structure_raises_container_error(locked, profile, tmp_path):
    path, _ = locked
    raw = bytearray(path.read_bytes())
    raw[8] ^= 0x01  # the opening brace of the JSON header
    bad = tmp_path / "hdr.chiplock"
    bad.write_bytes(bytes(raw))
    for msg in _both(bad, profile):
        assert msg.startswith("the header is not valid JSON") and FIX in msg


@pytest.mark.parametrize("version", [4, 0, "2", None, 2.0, [2], 1, 2, True])
def test_wrong_version(version, locked, profile, tmp_path, container_io):
    # Versions 1 and 2 (one key per file, no licences) are refused, with what to do. JSON true is not the
    # integer 1, nor 2.0 the integer 2: they get the plain message.
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    meta["version"] = version
    bad = tmp_path / "v.chiplock"
    write(bad, meta, header, data)
    if version in (1, 2) and type(version) is int:
        expected = (f"this container (version {version}) was written by an older chiplock; this one reads version "
                    "3 (per-group keys and licences): lock the model again")
    else:
        expected = (f"container version {version!r} is not supported by this chiplock (it reads version 3); "
                    "upgrade chiplock or re-lock the model")
    for msg in _both(bad, profile):
        assert msg == expected


def test_plain_safetensors_file_is_not_a_container(tmp_path, profile, weights):
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "plain.safetensors", metadata={"format": "pt"})
    for msg in _both(tmp_path / "plain.safetensors", profile):
        assert msg == f"the header has no chiplock metadata; this is not an intact chiplock container ({FIX})"


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"hello world, not a model", b"\x10" + b"\0" * 7 + b"[]"
                                     + b" " * 14, struct.pack("<Q", MAX_HEADER + 1) + b"{}"])
def test_non_chiplock_bytes(content, tmp_path, profile):
    path = tmp_path / "junk.chiplock"
    path.write_bytes(content)
    for msg in _both(path, profile):
        assert FIX in msg


def test_random_bytes(tmp_path, profile):
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"r{i}.chiplock"
        path.write_bytes(rng.bytes(int(rng.integers(0, 4096))))
        _both(path, profile)


def test_pytorch_pickle_is_not_a_container(tmp_path, profile, weights):
    torch.save(weights, tmp_path / "w.pt")
    _both(tmp_path / "w.pt", profile)


def test_missing_file_and_folder(tmp_path, profile):
    for msg in _both(tmp_path / "missing.chiplock", profile):
        assert msg.endswith("does not exist; check the path")
    # A folder is a sharded model to the verbs; an empty one says what is missing.
    for msg in _both(tmp_path, profile):
        assert "holds no *.chiplock container" in msg
    from chiplock.container.reader import open_container

    with pytest.raises(ContainerError, match="is a folder, not a chiplock file$"):
        open_container(tmp_path)


def test_metadata_and_stored_tensors_must_agree(locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    meta["tensors"]["ghost"] = meta["tensors"]["fc.bias"]
    write(tmp_path / "ghost.chiplock", meta, header, data)
    for msg in _both(tmp_path / "ghost.chiplock", profile):
        assert "the metadata and the stored tensors disagree" in msg


def test_header_entries_with_bad_offsets_or_dtypes(locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    cases = {
        "overlap": lambda h: h["fc.weight"].__setitem__("data_offsets", [0, h["fc.weight"]["data_offsets"][1]]),
        "dtype": lambda h: h["fc.weight"].__setitem__("dtype", "C64"),
        "shape": lambda h: h["fc.weight"].__setitem__("shape", [10, 34]),
        "negative": lambda h: h["fc.weight"].__setitem__("shape", [-10, -33]),
        "float": lambda h: h["fc.weight"].__setitem__("shape", [10.0, 33]),
        "offsets": lambda h: h["fc.weight"].__setitem__("data_offsets", [0]),
        "not a dict": lambda h: h.__setitem__("fc.weight", [1, 2]),
    }
    for label, fn in cases.items():
        h = json.loads(json.dumps(header))
        fn(h)
        write(tmp_path / "h.chiplock", meta, h, data, redigest=False)
        for msg in _both(tmp_path / "h.chiplock", profile):
            assert FIX in msg, label


# Crash paths found while writing these tests: each must become a ContainerError (or InvalidTag).


def test_header_dtype_that_is_not_a_string(locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    header["fc.weight"]["dtype"] = ["F32"]
    write(tmp_path / "h.chiplock", meta, header, data, redigest=False)
    _both(tmp_path / "h.chiplock", profile)


def test_header_shape_beyond_int64(locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    header["fc.weight"]["shape"] = [10**30]
    write(tmp_path / "h.chiplock", meta, header, data, redigest=False)
    _both(tmp_path / "h.chiplock", profile)


@pytest.mark.parametrize("field,value", [
    ("shape", [331]), ("shape", [2**62, 4]), ("dtype", "I8"), ("dtype", "F64"), ("dtype", "BOOL"),
])
def test_metadata_shape_or_dtype_that_disagrees_with_the_stored_bytes(field, value, locked, profile, tmp_path,
                                                                     container_io):
    # The header digest is unkeyed: anyone can rewrite the metadata of an unsigned file and recompute it. The
    # reader must then refuse the file, not crash, and never return a tensor with uninitialised memory.
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    meta["tensors"]["fc.weight"][field] = value
    write(tmp_path / "m.chiplock", meta, header, data)
    with pytest.raises(ContainerError):
        chiplock.unlock(tmp_path / "m.chiplock", profile=profile, secret=SECRET)


@pytest.mark.parametrize("mutate", [
    lambda m: m["license"].__setitem__("kdf", "argon2id"),
    lambda m: m.__setitem__("tensors", sorted(m["tensors"])),
    lambda m: m["license"].__setitem__("sources", "precision"),
    lambda m: m["groups"]["main"].__setitem__("transform", ["aes"]),
    lambda m: m.__setitem__("groups", [{"transform": "aes", "mac": None}]),
    lambda m: m.__setitem__("groups", {}),
    lambda m: m["tensors"]["fc.weight"].__setitem__("group", "other"),
    lambda m: m["tensors"]["fc.weight"].__setitem__("group", None),
    lambda m: m.__setitem__("license", "embedded"),
    lambda m: m["license"].__setitem__("wraps", {}),
    lambda m: m.__setitem__("content_id", m["content_id"][:-2]),
    lambda m: m.__setitem__("shard", {"index": 1, "count": 1}),
], ids=["kdf-not-dict", "tensors-list", "sources-str", "transform-list", "groups-list", "groups-empty",
        "unknown-group", "group-null", "license-str", "wraps-empty", "short-content-id", "shard-out-of-range"])
def test_metadata_of_the_wrong_type(mutate, locked, profile, tmp_path, container_io):
    path, _ = locked
    read, write = container_io
    meta, header, data = read(path)
    mutate(meta)
    write(tmp_path / "m.chiplock", meta, header, data)
    for fn in (lambda: chiplock.inspect(tmp_path / "m.chiplock"),
               lambda: chiplock.unlock(tmp_path / "m.chiplock", profile=profile, secret=SECRET)):
        with pytest.raises(ContainerError):
            fn()


def test_params_emptied_is_refused_on_unlock(locked, profile, tmp_path, container_io):
    # The reader checks only the shape of the public parameters; the transform refuses missing ones when
    # decoding (for aes and shuffle the group MAC refuses the rewritten header first).
    path, transform = locked
    read, write = container_io
    meta, header, data = read(path)
    meta["tensors"]["fc.weight"]["params"] = {}
    write(tmp_path / "m.chiplock", meta, header, data)
    chiplock.inspect(tmp_path / "m.chiplock")
    with pytest.raises(InvalidTag if transform != "pre-aes" else ContainerError):
        chiplock.unlock(tmp_path / "m.chiplock", profile=profile, secret=SECRET)


def test_a_version_2_file_is_refused_with_what_to_do(tmp_path, profile, weights, capsys):
    # A file as chiplock 2 wrote it: one key per file, its KDF, sources, key check and header MAC at the top level.
    from chiplock.container.writer import build_header

    meta = {"format": "chiplock", "version": 2, "transform": "aes", "created_by": "chiplock 0.0.9",
            "kdf": {"algorithm": "argon2id", "version": 1, "salt": "00" * 16, "iterations": 1, "lanes": 1,
                    "memory_kib": 8},
            "sources": [{"source": "precision", "helper": {"suite": 2, "device": "cpu"}}], "secret": False,
            "key_check": "ab" * 16, "header_mac": "cd" * 32,
            "tensors": {"w": {"dtype": "F32", "shape": [4], "params": {"nonce": "00" * 16}, "digest": "e" * 64}}}
    meta["header_digest"] = header_digest(meta)
    path = tmp_path / "v2.chiplock"
    path.write_bytes(build_header(meta, [("w", "F32", (4,), 16)]) + b"\0" * 16)
    for msg in _both(path, profile):
        assert msg == ("this container (version 2) was written by an older chiplock; this one reads version 3 "
                       "(per-group keys and licences): lock the model again")
    # The CLI says the same, in one line.
    from chiplock.cli import run

    capsys.readouterr()
    assert run(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "older chiplock" in err and "lock the model again" in err
