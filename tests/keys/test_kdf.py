"""Key derivation: Argon2id parameters, one-shot MasterKDF, injective material assembly, HKDF sub-keys."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chiplock.errors import AlreadyFinalized, ContainerError, InvalidKey, UnsupportedConfig
from chiplock.keys import INSECURE_FAST, KdfParams, MasterKDF, assemble_material, subkey
from chiplock.keys.kdf import (DEFAULT_MAX_MEMORY_KIB, MAX_ITERATIONS, MAX_LANES, MAX_MEMORY_ENV, MAX_WORK_PASSES,
                               max_memory_kib)

VEC = json.loads((Path(__file__).parents[1] / "vectors" / "kdf.json").read_text())


def test_defaults_match_the_issue():
    p = KdfParams()
    assert p.memory_kib == 64 * 1024 and p.iterations >= 1 and p.lanes >= 1
    assert len(p.salt) == 16 and KdfParams().salt != p.salt  # fresh random salt


@pytest.mark.parametrize("kwargs,match", [
    (dict(salt=b"short"), "salt must be at least 16 bytes"),
    (dict(salt="0" * 32), "salt must be at least 16 bytes"),
    (dict(iterations=0), "iterations and lanes must be >= 1"),
    (dict(lanes=0), "iterations and lanes must be >= 1"),
    (dict(lanes=4, memory_kib=31), r"memory_kib must be >= 8 \* lanes \(32\), got 31"),
])
def test_params_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KdfParams(**kwargs)


def test_params_are_frozen_and_round_trip_through_json():
    p = KdfParams(**INSECURE_FAST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.iterations = 5  # type: ignore[misc]
    d = json.loads(json.dumps(p.to_json()))
    assert d["algorithm"] == "argon2id" and d["salt"] == p.salt.hex()
    assert KdfParams.from_json(d) == p


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(algorithm="scrypt"), "unsupported KDF 'scrypt'; upgrade chiplock"),
    (lambda d: d.pop("salt"), "key-derivation parameters are malformed"),
    (lambda d: d.update(salt="zz"), "key-derivation parameters are malformed"),
    (lambda d: d.update(iterations="many"), "key-derivation parameters are malformed"),
    (lambda d: d.update(lanes=0), "key-derivation parameters are malformed"),
])
def test_from_json_rejects_damaged_parameters(mutate, match):
    d = KdfParams(**INSECURE_FAST).to_json()
    mutate(d)
    with pytest.raises(ContainerError, match=match):
        KdfParams.from_json(d)


def test_master_kdf_matches_argon2id_and_the_vector():
    params = KdfParams(salt=bytes.fromhex(VEC["salt"]), **VEC["params"])
    material = bytes.fromhex(VEC["assembled"])
    key = MasterKDF(params=params).derive(material)
    want = Argon2id(salt=params.salt, length=32, iterations=params.iterations, lanes=params.lanes,
                    memory_cost=params.memory_kib).derive(material)
    assert key == want == bytes.fromhex(VEC["master"])


def test_master_kdf_depends_on_salt_and_material():
    a = KdfParams(**INSECURE_FAST)
    b = KdfParams(**INSECURE_FAST)
    k = MasterKDF(params=a).derive(b"m")
    assert MasterKDF(params=a).derive(b"m") == k
    assert MasterKDF(params=b).derive(b"m") != k
    assert MasterKDF(params=a).derive(b"n") != k


def test_master_kdf_is_one_shot():
    kdf = MasterKDF(params=KdfParams(**INSECURE_FAST))
    kdf.derive(b"m")
    with pytest.raises(AlreadyFinalized, match="once per instance; create a new one"):
        kdf.derive(b"m")


def test_verify_raises_invalid_key_on_mismatch():
    p = KdfParams(**INSECURE_FAST)
    good = MasterKDF(params=p).derive(b"m")
    MasterKDF(params=p).verify(b"m", good)
    with pytest.raises(InvalidKey):
        MasterKDF(params=p).verify(b"other", good)


def test_assemble_material_vector_and_injectivity():
    materials = {k: bytes.fromhex(v) for k, v in VEC["materials"].items()}
    assert assemble_material(materials).hex() == VEC["assembled"]
    assert assemble_material(materials, bytes.fromhex(VEC["secret"])).hex() == VEC["assembled_with_secret"]
    # Order of the mapping does not matter; boundaries between names and values do.
    assert assemble_material(dict(reversed(list(materials.items())))) == assemble_material(materials)
    assert assemble_material({"a": b"bc"}) != assemble_material({"ab": b"c"})
    assert assemble_material({"a": b"x"}, None) != assemble_material({"a": b"x"}, b"")
    assert assemble_material({"a": b"x", "b": b""}) != assemble_material({"a": b"x"})
    assert assemble_material({"a": b"x"}, b"secret") != assemble_material({"a": b"xsecret"})


def test_subkeys_match_hkdf_and_the_vector():
    master = bytes.fromhex(VEC["master"])
    for case in VEC["subkeys"]:
        got = subkey(master, case["purpose"], case["context"])
        info = b"chiplock/v1/" + case["purpose"].encode() + b"\0" + case["context"].encode()
        want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)
        assert got == want == bytes.fromhex(case["key"])


def test_subkeys_are_independent_per_purpose_and_context():
    master = os.urandom(32)
    keys = {subkey(master, p, c) for p in ("tensor/aes", "tensor/pre-aes", "check") for c in ("", "a", "b", "a.b")}
    assert len(keys) == 12
    assert len(subkey(master, "check", length=16)) == 16


# --- caps on what a file may ask (checked in from_json, before any derivation) ---------------------------------


def _file_params(**changes):
    d = KdfParams(**INSECURE_FAST).to_json()
    d.update(changes)
    return d


@pytest.mark.parametrize("changes,match", [
    (dict(iterations=float("inf")), "a cost is not an integer"),
    (dict(memory_kib=float("nan")), "a cost is not an integer"),
    (dict(memory_kib=65536.0), "a cost is not an integer"),
    (dict(lanes=True), "a cost is not an integer"),
    (dict(iterations=None), "a cost is not an integer"),
    (dict(version="1"), "a cost is not an integer"),
    (dict(salt="AB" * 16), "salt is not 16 to 64 bytes of lowercase hex"),
    (dict(salt="ab" * 65), "salt is not 16 to 64 bytes"),
    (dict(salt=["ab"] * 16), "salt is not 16 to 64 bytes"),
    (dict(algorithm=["argon2id"]), r"unsupported KDF \['argon2id'\]"),
    (dict(algorithm="x" * 1000), r"unsupported KDF 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\.\.\."),
    (dict(iterations=MAX_ITERATIONS + 1), "beyond chiplock's caps"),
    (dict(lanes=MAX_LANES + 1, memory_kib=8 * (MAX_LANES + 1)), "beyond chiplock's caps"),
    (dict(memory_kib=DEFAULT_MAX_MEMORY_KIB + 1), r"memory of 1024 MiB x 1 passes, beyond this device's cap "
                                                  r"\(1024 MiB, at most 16 passes over it\)"),
    (dict(memory_kib=2**80), "beyond this device's cap"),
    (dict(iterations=MAX_WORK_PASSES + 1, memory_kib=DEFAULT_MAX_MEMORY_KIB), "x 17 passes, beyond this device"),
])
def test_from_json_types_and_caps(changes, match, monkeypatch):
    monkeypatch.delenv(MAX_MEMORY_ENV, raising=False)
    with pytest.raises(ContainerError, match=match):
        KdfParams.from_json(_file_params(**changes))


def test_from_json_accepts_up_to_the_caps(monkeypatch):
    monkeypatch.delenv(MAX_MEMORY_ENV, raising=False)
    p = KdfParams.from_json(_file_params(iterations=MAX_WORK_PASSES, memory_kib=DEFAULT_MAX_MEMORY_KIB))
    assert p.memory_kib == DEFAULT_MAX_MEMORY_KIB
    assert KdfParams.from_json(_file_params(iterations=MAX_ITERATIONS, lanes=MAX_LANES, memory_kib=8 * MAX_LANES))


def test_memory_cap_from_the_environment_and_the_keyword(monkeypatch):
    d = _file_params(memory_kib=2 << 20)
    monkeypatch.delenv(MAX_MEMORY_ENV, raising=False)
    assert max_memory_kib() == DEFAULT_MAX_MEMORY_KIB == 1 << 20
    with pytest.raises(ContainerError, match="beyond this device's cap"):
        KdfParams.from_json(d)
    assert KdfParams.from_json(d, max_memory_kib=2 << 20).memory_kib == 2 << 20
    monkeypatch.setenv(MAX_MEMORY_ENV, str(2 << 20))
    assert max_memory_kib() == 2 << 20 and KdfParams.from_json(d).memory_kib == 2 << 20
    with pytest.raises(ContainerError, match="beyond this device's cap"):
        KdfParams.from_json(d, max_memory_kib=1 << 20)  # the keyword wins over the environment
    for bad in ("", "  "):
        monkeypatch.setenv(MAX_MEMORY_ENV, bad)
        assert max_memory_kib() == DEFAULT_MAX_MEMORY_KIB
    for bad in ("1GiB", "-5", "4", "9" * 30, "1e6"):
        monkeypatch.setenv(MAX_MEMORY_ENV, bad)
        with pytest.raises(UnsupportedConfig, match=f"{MAX_MEMORY_ENV} must be a number of KiB between 8 and"):
            max_memory_kib()
    with pytest.raises(TypeError, match="max_kdf_memory_kib must be an int"):
        KdfParams.from_json(d, max_memory_kib=1.5)
    with pytest.raises(ValueError, match="max_kdf_memory_kib must be between 8 and"):
        KdfParams.from_json(d, max_memory_kib=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(iterations=2.0), TypeError, "iterations must be an int, got float"),
    (dict(lanes=True), TypeError, "lanes must be an int, got bool"),
    (dict(memory_kib="64"), TypeError, "memory_kib must be an int, got str"),
    (dict(memory_kib=1 << 32), ValueError, r"memory_kib must be <= 4294967295 \(Argon2's limit\)"),
])
def test_constructor_checks_types(kwargs, error, match):
    with pytest.raises(error, match=match):
        KdfParams(**kwargs)
