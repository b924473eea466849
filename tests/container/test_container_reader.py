"""The validating reader: every metadata field type-checked, caps enforced before work, one error type each.

Each case rewrites a valid container as a tamperer would (recomputing the unkeyed header digest) and checks
that ``inspect`` and ``unlock`` refuse it with a ChiplockError whose message says what is wrong.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import chiplock
from chiplock import ContainerError, InvalidTag, UnsupportedConfig
from chiplock.container.reader import open_container
from chiplock.container.schema import MAX_DIMS, MAX_NAME_BYTES, header_digest

pytestmark = pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning")
SECRET = b"vendor secret for reader tests"
VENDOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(10, 33, generator=g), "fc.bias": torch.randn(10, generator=g).half()}


@pytest.fixture(params=["aes", "shuffle", "pre-aes"])
def signed(request, tmp_path, profile, fast_kdf, weights):
    path = tmp_path / f"{request.param}.chiplock"
    chiplock.lock(weights, path, profile, request.param, secret=SECRET, kdf=fast_kdf, signing_key=VENDOR)
    return path


def _split(path: Path) -> tuple[dict, dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return json.loads(header["__metadata__"]["chiplock"]), header, raw[8 + n:]


def _write(path: Path, header: dict, data: bytes, meta_text: str | None = None, raw_header: str | None = None):
    if meta_text is not None:
        header = dict(header, __metadata__={"chiplock": meta_text})
    body = (raw_header if raw_header is not None else json.dumps(header, separators=(",", ":"))).encode(
        "utf-8", "surrogatepass")
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _tamper(path: Path, mutate) -> Path:
    """Apply ``mutate(meta)`` and recompute the header digest, as anyone can for an unsigned file."""
    meta, header, data = _split(path)
    mutate(meta)
    meta["header_digest"] = header_digest(meta)
    bad = path.with_name("bad.chiplock")
    _write(bad, header, data, meta_text=json.dumps(meta, sort_keys=True))
    return bad


def _refused(path: Path, profile, error=ContainerError, match: str | None = None) -> list[str]:
    messages = []
    for fn in (lambda: chiplock.inspect(path), lambda: chiplock.unlock(path, profile=profile, secret=SECRET)):
        with pytest.raises(error, match=match) as exc:
            fn()
        messages.append(str(exc.value))
    return messages


# --- the signature --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate", [
    lambda s: "ed25519",
    lambda s: [s],
    lambda s: 1,
    lambda s: {},
    lambda s: {k: v for k, v in s.items() if k != "sig"},
    lambda s: {("sif" if k == "sig" else k): v for k, v in s.items()},  # a one-bit flip of a key
    lambda s: dict(s, alg="rsa"),
    lambda s: dict(s, alg=["ed25519"]),
    lambda s: dict(s, public_key=s["public_key"][:-2]),
    lambda s: dict(s, public_key=s["public_key"].upper()),
    lambda s: dict(s, sig=s["sig"] + "00"),
    lambda s: dict(s, sig="zz" * 64),
    lambda s: dict(s, sig="\ud800" * 128),
    lambda s: dict(s, extra=1),
], ids=["str", "list", "int", "empty", "no-sig", "sif", "rsa", "alg-list", "short-key", "upper-key", "long-sig",
        "non-hex", "surrogates", "extra-field"])
def test_malformed_signature_is_a_container_error(mutate, signed, profile):
    bad = _tamper(signed, lambda m: m.__setitem__("signature", mutate(m["signature"])))
    for msg in _refused(bad, profile, match="the signature is malformed|holds a lone surrogate"):
        assert "ed25519 with a 32-byte public key and a 64-byte signature" in msg or "surrogate" in msg
    with pytest.raises(ContainerError):
        chiplock.unlock(bad, profile=profile, secret=SECRET, verify_key=VENDOR.public_key())


def test_signature_null_means_unsigned(signed, profile):
    bad = _tamper(signed, lambda m: m.__setitem__("signature", None))
    assert chiplock.inspect(bad)["signed"] is False
    with pytest.raises(InvalidTag, match="not signed"):
        chiplock.unlock(bad, profile=profile, secret=SECRET, verify_key=VENDOR.public_key())


# --- other fields ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("content_id", "\ud800" * 16, "the chiplock metadata holds a lone surrogate"),
    ("content_id", "ab" * 15, "the content id is not 16 bytes"),
    ("content_id", "AB" * 16, "the content id is not 16 bytes"),
    ("content_id", 12, "the content id is not 16 bytes"),
    ("created_by", "x" * 300, "created_by is not a short string"),
    ("groups", {"main": {"transform": 7, "mac": None}}, "group 'main' is malformed"),
    ("groups", {"main": {"transform": "aes"}}, "group 'main' is malformed"),
    ("groups", {"a b": {"transform": "aes", "mac": None}}, "group label 'a b' is not 1 to 64 characters"),
    ("groups", {}, "the groups are not an object of 1 to 64 entries"),
    ("groups", {f"g{i}": {"transform": "pre-aes", "mac": None} for i in range(65)},
     "the groups are not an object of 1 to 64 entries"),
    ("shard", {"index": 0}, "the shard field is malformed"),
    ("license", [], "this is not a chiplock licence"),
    ("tensors", {}, "the metadata and the stored tensors disagree"),
    ("extra", 1, r"unknown field\(s\) \['extra'\]"),
    ("transform", "aes", r"unknown field\(s\) \['transform'\]"),  # the version-2 fields are gone
    ("header_mac", "cd" * 32, r"unknown field\(s\) \['header_mac'\]"),
])
def test_malformed_fields(field, value, match, signed, profile):
    bad = _tamper(signed, lambda m: m.__setitem__(field, value))
    _refused(bad, profile, match=match)


@pytest.mark.parametrize("field,value,match", [
    ("secret", "yes", "secret is not true or false"),
    ("salt", "ab" * 15, "salt is not 16 bytes"),
    ("content_id", "ab" * 15, "content_id is not 16 bytes"),
    ("sources", [], "sources is not a list of 1 to 16"),
    ("sources", [{"source": "precision", "helper": {}}] * 2, "listed twice"),
    ("sources", [{"source": "a b", "helper": {}}], "fingerprint source entry is not"),
    ("sources", [{"source": "precision", "helper": {"x": "\ud800"}}], "lone surrogate"),
    ("sources", [{"source": "precision", "helper": []}], "fingerprint source entry is not"),
    ("wraps", {}, "wraps is not an object of 1 to 64 groups"),
    ("wraps", {"main": {"alg": "aes-256-ecb", "nonce": "00", "wrapped": "00"}}, "the wrap of group main is not"),
    ("chiplock_license", 2, "licence version 2 is not supported"),
    ("extra", 1, "missing or unknown fields"),
])
def test_malformed_embedded_licence(field, value, match, signed, profile):
    # The embedded licence is checked as a licence file is, when the header is read.
    bad = _tamper(signed, lambda m: m["license"].__setitem__(field, value))
    _refused(bad, profile, match=match)


@pytest.mark.parametrize("field", ["content_id", "groups", "tensors"])
def test_missing_required_field(field, signed, profile):
    bad = _tamper(signed, lambda m: m.pop(field))
    _refused(bad, profile, match=f"the chiplock metadata lacks {field}")


def test_missing_header_digest(signed, profile):
    meta, header, data = _split(signed)
    del meta["header_digest"]
    bad = signed.with_name("nodigest.chiplock")
    _write(bad, header, data, meta_text=json.dumps(meta, sort_keys=True))
    _refused(bad, profile, match="the chiplock metadata lacks header_digest")


@pytest.mark.parametrize("field", ["sources", "kdf", "secret", "salt", "wraps"])
def test_missing_licence_field(field, signed, profile):
    bad = _tamper(signed, lambda m: m["license"].pop(field))
    _refused(bad, profile, match="missing or unknown fields")


def test_group_mac_must_match_the_transform_kind(signed, profile):
    # aes and shuffle groups carry a 32-byte MAC; a pre-aes group must carry none (it would be a key oracle).
    meta = _split(signed)[0]
    transform = meta["groups"]["main"]["transform"]
    if transform == "pre-aes":
        bad = _tamper(signed, lambda m: m["groups"]["main"].__setitem__("mac", "cd" * 32))
        _refused(bad, profile, match=r"group 'main' \(pre-aes\) carries a header MAC")
    else:
        for mac in (None, "cd" * 31, "CD" * 32, 5):
            bad = _tamper(signed, lambda m, mac=mac: m["groups"]["main"].__setitem__("mac", mac))
            _refused(bad, profile, match=rf"group 'main' \({transform}\) lacks its 32-byte header MAC")


def test_licence_removed_from_the_header_needs_a_licence(signed, profile):
    # Without an embedded licence the file is a content-mode file: inspect says so and unlock asks for one.
    bad = _tamper(signed, lambda m: m.pop("license"))
    assert chiplock.inspect(bad)["license"].startswith("separate")
    with pytest.raises(chiplock.ProfileError, match="this file carries no licence; pass the device's licence"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)


def test_licence_of_another_model_is_refused(signed, profile, tmp_path, fast_kdf, weights):
    # A licence moved in from another file (its content id differs) is refused before any key work.
    other = tmp_path / "other.chiplock"
    transform = chiplock.inspect(signed)["transform"]
    chiplock.lock(weights, other, profile, transform, secret=SECRET, kdf=fast_kdf)
    foreign = _split(other)[0]["license"]
    bad = _tamper(signed, lambda m: m.__setitem__("license", foreign))
    chiplock.inspect(bad)
    with pytest.raises(ContainerError, match="this licence is for another model file"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)


def test_licence_wrap_kind_must_match_the_groups_transform(signed, profile):
    # An edited licence cannot turn an aes group's authenticated wrap into an unauthenticated one (or back).
    meta = _split(signed)[0]
    transform = meta["groups"]["main"]["transform"]
    wrap = ({"alg": "aes-256-gcm", "nonce": "00" * 12, "wrapped": "00" * 48} if transform == "pre-aes"
            else {"alg": "aes-256-ctr", "nonce": "00" * 16, "wrapped": "00" * 32})
    bad = _tamper(signed, lambda m: m["license"]["wraps"].__setitem__("main", wrap))
    chiplock.inspect(bad)
    with pytest.raises(ContainerError, match=f"the licence wraps group main with {wrap['alg']}, but the file's "
                                             f"transform {transform} needs"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)


def test_licence_for_a_group_the_file_lacks(signed, profile, weights, assert_bit_exact):
    # A wrap for a group the file lacks opens nothing: unlock opens only the file's groups, and asking for the
    # other group names what the file has.
    bad = _tamper(signed, lambda m: m["license"]["wraps"].__setitem__("ghost", m["license"]["wraps"]["main"]))
    chiplock.inspect(bad)
    got = chiplock.unlock(bad, profile=profile, secret=SECRET)
    for name, t in weights.items():
        assert_bit_exact(got[name], t, name)
    with pytest.raises(UnsupportedConfig, match="the file has no group\\(s\\) 'ghost'; it has 'main'"):
        chiplock.unlock(bad, profile=profile, secret=SECRET, groups=["ghost"])


def test_unknown_transform_says_upgrade(signed, profile):
    bad = _tamper(signed, lambda m: m["groups"]["main"].__setitem__("transform", "aes-gcm-v9"))
    for msg in _refused(bad, profile, error=UnsupportedConfig):
        assert msg.startswith("the file uses transform 'aes-gcm-v9', which this chiplock does not know")
        assert msg.endswith("upgrade chiplock")


@pytest.mark.parametrize("params", [
    {"nonce": {"nested": "x"}}, {"nonce": [[1]]}, {"nonce": "0" * ((1 << 20) + 1)}, {f"k{i}": 0 for i in range(33)},
], ids=["nested", "list-of-list", "long-string", "many-keys"])
def test_params_must_be_a_small_flat_map(params, signed, profile):
    bad = _tamper(signed, lambda m: m["tensors"]["fc.bias"].__setitem__("params", params))
    _refused(bad, profile, match="the public parameters of tensor 'fc.bias' are malformed")


@pytest.mark.parametrize("field,value", [("digest", "ab" * 31), ("digest", None), ("dtype", "C64"),
                                         ("shape", "10"), ("extra", 1), ("group", 5), ("group", ["main"])])
def test_tensor_metadata_fields(field, value, signed, profile):
    bad = _tamper(signed, lambda m: m["tensors"]["fc.bias"].__setitem__(field, value))
    _refused(bad, profile, match="the metadata of tensor 'fc.bias' is malformed")


def test_stored_dtype_is_what_the_transform_stores(signed, profile):
    # The metadata claims another original dtype of the same width: the stored entry no longer matches what the
    # transform stores for it.
    bad = _tamper(signed, lambda m: m["tensors"]["fc.bias"].__setitem__("dtype", "I16"))
    if chiplock.inspect(signed)["transform"] == "pre-aes":
        # pre-aes stores every 16-bit dtype with the same code width: the reader cannot tell, the key can't either.
        chiplock.inspect(bad)
    else:
        _refused(bad, profile, match=r"tensor 'fc.bias' is stored as F16, but transform \w+ stores I16 as I16")


# --- KDF parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,match", [
    ({"memory_kib": 4 << 20}, "beyond this device's cap"),
    ({"iterations": 1001}, "beyond chiplock's caps"),
    ({"lanes": 65, "memory_kib": 1024}, "beyond chiplock's caps"),
    ({"iterations": 17, "memory_kib": 1 << 20}, "1024 MiB x 17 passes, beyond this device's cap"),
    ({"memory_kib": 2**64}, "beyond this device's cap"),
    ({"memory_kib": 10**39}, "beyond this device's cap"),
    ({"iterations": 2.0}, "a cost is not an integer"),
    ({"iterations": True}, "a cost is not an integer"),
    ({"iterations": "16"}, "a cost is not an integer"),
    ({"lanes": 0}, "a cost is below Argon2id's minimum"),
    ({"salt": "00" * 8}, "salt is not 16 to 64 bytes"),
    ({"salt": "\ud800" * 32}, "holds a lone surrogate"),
    ({"algorithm": "scrypt"}, "unsupported KDF 'scrypt'"),
    ({"version": 2}, "KDF parameter version 2 is not supported"),
    ({"extra": 1}, "missing or unknown fields"),
])
def test_kdf_parameters_are_checked_before_any_work(changes, match, signed, profile):
    bad = _tamper(signed, lambda m: m["license"]["kdf"].update(changes))
    start = time.perf_counter()
    with pytest.raises(ContainerError, match=match):
        chiplock.unlock(bad, profile=profile, secret=SECRET)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999", "9" * 5000])
def test_kdf_number_literals_json_cannot_hold(literal, signed, profile):
    meta, header, data = _split(signed)
    meta["license"]["kdf"]["memory_kib"] = "@@"
    text = json.dumps(meta, sort_keys=True).replace('"@@"', literal)
    bad = signed.with_name("lit.chiplock")
    _write(bad, header, data, meta_text=text)
    for msg in _refused(bad, profile):
        assert msg.startswith("the chiplock metadata holds ")


def test_kdf_cap_is_configurable(signed, profile, monkeypatch):
    bad = _tamper(signed, lambda m: m["license"]["kdf"].__setitem__("memory_kib", 64))
    monkeypatch.setenv("CHIPLOCK_MAX_KDF_MEMORY_KIB", "32")
    with pytest.raises(ContainerError, match=r"memory of 0.0625 MiB x 1 passes, beyond this device's cap "
                                             r"\(0.03125 MiB"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)
    # The keyword overrides the environment: the key is derived (a wrong one, the KDF changed), so aes and
    # shuffle say InvalidKey and pre-aes decodes useless weights.
    try:
        chiplock.unlock(bad, profile=profile, secret=SECRET, max_kdf_memory_kib=64)
    except chiplock.InvalidKey:
        assert chiplock.inspect(bad)["transform"] != "pre-aes"
    assert chiplock.inspect(bad)["kdf"]["memory_kib"] == 64
    monkeypatch.setenv("CHIPLOCK_MAX_KDF_MEMORY_KIB", "lots")
    with pytest.raises(UnsupportedConfig, match="CHIPLOCK_MAX_KDF_MEMORY_KIB must be a number of KiB"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)


def test_a_file_asking_4_gib_is_shown_by_inspect_and_refused_by_unlock_at_once(signed, profile):
    bad = _tamper(signed, lambda m: m["license"]["kdf"].update(memory_kib=4 << 20, iterations=1))
    assert chiplock.inspect(bad)["kdf"]["memory_kib"] == 4 << 20
    start = time.perf_counter()
    with pytest.raises(ContainerError, match="4096 MiB x 1 passes, beyond this device's cap"):
        chiplock.unlock(bad, profile=profile, secret=SECRET)
    assert time.perf_counter() - start < 2.0


# --- the safetensors entries (outside the digest) -------------------------------------------------------------


def test_sixty_thousand_huge_dims_fail_in_microseconds(signed, profile):
    meta, header, data = _split(signed)
    header["extra"] = {"dtype": "U8", "shape": [2**47 - 1] * 60_000, "data_offsets": [0, 0]}
    bad = signed.with_name("dims.chiplock")
    _write(bad, header, data)
    start = time.perf_counter()
    with pytest.raises(ContainerError, match=f"malformed shape \\(at most {MAX_DIMS} dims"):
        open_container(bad)
    assert time.perf_counter() - start < 0.5  # the JSON parse dominates; the shape check itself is O(64)


@pytest.mark.parametrize("shape", [[1] * (MAX_DIMS + 1), [2**48], [2**24, 2**24], [-1], [True], [1.0]])
def test_bad_shapes(shape, signed, profile):
    meta, header, data = _split(signed)
    header["fc.bias"]["shape"] = shape
    bad = signed.with_name("shape.chiplock")
    _write(bad, header, data)
    _refused(bad, profile, match="malformed shape")


@pytest.mark.parametrize("name,match", [
    ("", "a tensor name is empty"), ("a\u0000b", "contains a NUL"), ("x" * (MAX_NAME_BYTES + 1), "longer than"),
    ("\ud800", "lone surrogate"),
])
def test_bad_tensor_names_in_the_header(name, match, signed, profile):
    meta, header, data = _split(signed)
    header[name] = header.pop("fc.bias")
    meta["tensors"][name] = meta["tensors"].pop("fc.bias")
    meta["header_digest"] = header_digest(meta)
    bad = signed.with_name("name.chiplock")
    _write(bad, header, data, meta_text=json.dumps(meta, sort_keys=True))
    _refused(bad, profile, match=match if name != "\ud800" else "holds a lone surrogate")


@pytest.mark.parametrize("header_text,match", [
    ('{"a":' + "9" * 5000 + "}", "holds a number literal longer than 40 characters"),
    ("[" * 10_000 + "]" * 10_000, "is nested deeper than 64 levels"),
    ('{"a":NaN}', "holds NaN, which is not JSON"),
    ("[" + ",".join(["{}"] * 2_000_001) + "]", "holds more than 2000000 JSON objects and arrays"),
])
def test_header_json_caps(header_text, match, tmp_path, profile):
    bad = tmp_path / "json.chiplock"
    _write(bad, {}, b"", raw_header=header_text)
    _refused(bad, profile, match="the header " + match)


def test_entry_with_extra_field_or_bad_offsets(signed, profile):
    for mutate in (lambda e: e.__setitem__("extra", 1), lambda e: e.__setitem__("data_offsets", [5, 1]),
                   lambda e: e.__setitem__("data_offsets", [0, 2**64])):
        meta, header, data = _split(signed)
        mutate(header["fc.bias"])
        bad = signed.with_name("entry.chiplock")
        _write(bad, header, data)
        _refused(bad, profile, match="tensor entry 'fc.bias'")


def test_extra_safetensors_metadata_is_refused(signed, profile):
    meta, header, data = _split(signed)
    header["__metadata__"]["format"] = "pt"
    bad = signed.with_name("md.chiplock")
    _write(bad, header, data)
    _refused(bad, profile, match="the header has no chiplock metadata")


# --- input validation before any write (load_weights) ---------------------------------------------------------


@pytest.mark.parametrize("name,match", [
    ("", "is empty"), ("__metadata__", "is __metadata__, which safetensors reserves"), ("a\u0000b", "NUL"),
    ("w\ud800", "lone surrogate"), ("x" * (MAX_NAME_BYTES + 1), f"longer than {MAX_NAME_BYTES} bytes"),
])
def test_lock_refuses_unfit_tensor_names_before_writing(name, match, tmp_path, profile, fast_kdf):
    out = tmp_path / "out.chiplock"
    with pytest.raises(UnsupportedConfig, match=match) as exc:
        chiplock.lock({"ok": torch.ones(2), name: torch.ones(2)}, out, profile, "aes", secret=SECRET, kdf=fast_kdf)
    assert "rename the tensor" in str(exc.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lock_refuses_sparse_and_meta_tensors(tmp_path, profile, fast_kdf):
    out = tmp_path / "out.chiplock"
    for t in (torch.eye(3).to_sparse(), torch.empty(3, device="meta")):
        with pytest.raises(UnsupportedConfig, match="is not a dense tensor in memory"):
            chiplock.lock({"t": t}, out, profile, "aes", secret=SECRET, kdf=fast_kdf)
    assert list(tmp_path.iterdir()) == []


def test_lock_asks_the_transform_about_each_dtype(tmp_path, profile, fast_kdf, monkeypatch):
    from chiplock.transforms import get_transform

    tf = get_transform("shuffle")

    def refuse(dtype_name: str) -> str:
        if dtype_name == "F16":
            raise UnsupportedConfig("shuffle cannot store F16 here; convert it to F32")
        return dtype_name

    monkeypatch.setattr(tf, "stored_dtype", refuse)
    out = tmp_path / "out.chiplock"
    with pytest.raises(UnsupportedConfig, match=r"^tensor 'h': shuffle cannot store F16 here; convert it to F32$"):
        chiplock.lock({"f": torch.ones(2), "h": torch.ones(2).half()}, out, profile, "shuffle", secret=SECRET,
                      kdf=fast_kdf)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("transform", ["aes", "shuffle", "pre-aes"])
def test_every_dtype_locks_or_is_refused_up_front(transform, tmp_path, profile, fast_kdf, assert_bit_exact):
    from chiplock.transforms import DTYPE_NAMES

    for dtype in DTYPE_NAMES:
        t = torch.arange(300, dtype=torch.float32).reshape(3, 100).to(dtype)
        out = tmp_path / f"{transform}-{DTYPE_NAMES[dtype]}.chiplock"
        try:
            chiplock.lock({"t": t}, out, profile, transform, secret=SECRET, kdf=fast_kdf)
        except UnsupportedConfig:
            assert not out.exists()
            continue
        assert_bit_exact(chiplock.unlock(out, profile=profile, secret=SECRET)["t"], t, f"{transform} {dtype}")


# --- a large legitimate model fits the caps -------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_of_100000_tensors_reads_within_the_caps(tmp_path):
    from chiplock.container.writer import build_header

    n = 100_000
    meta = {"format": "chiplock", "version": 3, "created_by": "test", "content_id": "ab" * 16,
            "groups": {"main": {"transform": "aes", "mac": "cd" * 32}},
            "tensors": {f"model.layers.{i}.mlp.weight": {"group": "main", "dtype": "F32", "shape": [0, 4096],
                                                        "params": {"nonce": "0" * 32}, "digest": "e" * 64}
                        for i in range(n)}}
    meta["header_digest"] = header_digest(meta)
    path = tmp_path / "big.chiplock"
    path.write_bytes(build_header(meta, [(k, "F32", (0, 4096), 0) for k in meta["tensors"]]))
    start = time.perf_counter()
    assert len(chiplock.inspect(path)["tensors"]) == n
    # Not a speed target (those live in benchmarks): a bound far above the ~5 s it takes on a busy 2-core machine,
    # so only quadratic work per tensor fails it.
    assert time.perf_counter() - start < 60.0


def test_build_header_refuses_a_header_the_reader_would_refuse(monkeypatch):
    from chiplock.container import writer as fmt

    meta = {"format": "chiplock"}
    entries = [(f"t{i}", "F32", (1, 1), 4) for i in range(100)]
    fmt.build_header(meta, entries)
    monkeypatch.setattr(fmt, "HEADER_LIMITS", fmt._json.Limits(max_bytes=fmt.MAX_HEADER, max_containers=200))
    with pytest.raises(UnsupportedConfig, match="header for these 100 tensors would exceed the reader's caps"):
        fmt.build_header(meta, entries)
