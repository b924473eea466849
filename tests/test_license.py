"""Licences: content keys, device keys, per-device wraps (chiplock/license.py)."""

from __future__ import annotations

import json
import os
import random
import stat
import warnings

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chiplock.errors import (ChiplockError, ContainerError, FileAccessError, InvalidKey, InvalidTag, KeyFileError,
                             ProfileError, UnsupportedConfig, WeakKey)
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams, MasterKDF
from chiplock.license import (CTR, GCM, MIN_SECRET_BYTES, ContentKeys, GroupKey, License, LowEntropyWarning, Wrap,
                              check_key_strength, device_key, issue_license, open_license)
from chiplock.profile import DeviceKey, DeviceProfile

SECRET = bytes(range(32))


def _fast() -> KdfParams:
    return KdfParams(**INSECURE_FAST)


def _device(material: bytes | None = None, *, bits: float = 80.0, with_key: bool = True) -> DeviceProfile:
    """A synthetic device (as tests/conftest.py builds a "different machine"): random material, known entropy."""
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"},
                   material=material or os.urandom(32), entropy_bits=bits)
    p = DeviceProfile(enrollments=(e,))
    return p.with_device_key(_fast()) if with_key else p


@pytest.fixture(scope="module")
def dev_a() -> DeviceProfile:
    return _device()


@pytest.fixture(scope="module")
def dev_b() -> DeviceProfile:
    return _device()


@pytest.fixture(scope="module")
def keys() -> ContentKeys:
    return ContentKeys.new({"main": "pre-aes", "extra": "pre-aes", "secure": "aes", "perm": "shuffle"})


SILENT, LOUD = ["main", "extra"], ["secure", "perm"]


def _open(lic, keys, **kw):
    kw.setdefault("content_id", keys.content_id)
    kw.setdefault("transforms", keys.transforms)
    return open_license(lic, **kw)


# ---------------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("groups,alg", [(SILENT, CTR), (LOUD, GCM), (["secure"], GCM), (["main"], CTR)])
def test_round_trip_per_alg(tmp_path, keys, dev_a, groups, alg):
    lic = issue_license(keys, dev_a, groups=groups)
    assert lic.groups == tuple(groups) and {w.alg for w in lic.wraps.values()} == {alg}
    assert lic.silent is (alg == CTR)
    lic.save(tmp_path / "d.lic")
    loaded = License.load(tmp_path / "d.lic")
    assert loaded == lic
    got = _open(loaded, keys, profile=dev_a)
    assert got == {g: keys.groups[g].key for g in groups}
    # The device key comes from the stored one or from the material: both give the same keys.
    assert _open(loaded, keys, profile=DeviceProfile(enrollments=dev_a.enrollments)) == got


def test_licence_file_is_public_json(tmp_path, keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD, secret=SECRET)
    lic.save(tmp_path / "d.lic")
    data = json.loads((tmp_path / "d.lic").read_text())
    assert set(data) == {"chiplock_license", "content_id", "sources", "kdf", "secret", "salt", "wraps"}
    assert data["chiplock_license"] == 1 and data["secret"] is True
    assert data["content_id"] == keys.content_id.hex()
    assert data["sources"] == [{"source": "precision", "helper": {"suite": 2, "device": "cpu"}}]
    assert data["kdf"] == dev_a.device_key.kdf.to_json()
    assert {w["alg"] for w in data["wraps"].values()} == {GCM}
    text = (tmp_path / "d.lic").read_text()
    for secret in [dev_a.device_key.key, dev_a.enrollments[0].material, SECRET] + [g.key for g in keys.groups.values()]:
        assert secret.hex() not in text


def test_open_measures_this_device_when_no_profile_is_given(profile, keys):
    # The real precision source: the profile's helper is reproduced on this machine.
    lic = issue_license(keys, profile.with_device_key(_fast()), groups=LOUD, secret=SECRET)
    assert _open(lic, keys, secret=SECRET) == {g: keys.groups[g].key for g in LOUD}


def test_each_licence_and_wrap_is_fresh(keys, dev_a):
    a, b = issue_license(keys, dev_a, groups=LOUD), issue_license(keys, dev_a, groups=LOUD)
    assert a.salt != b.salt and a.wraps["secure"].wrapped != b.wraps["secure"].wrapped
    assert a.wraps["secure"].nonce != a.wraps["perm"].nonce


# ---------------------------------------------------------------------------------------------- the wrong device

def test_other_device_cannot_open_a_gcm_licence(keys, dev_a, dev_b):
    lic = issue_license(keys, dev_a, groups=LOUD)
    with pytest.raises(InvalidKey, match=r"this licence is for another device \(or another vendor secret\)"):
        _open(lic, keys, profile=dev_b)


def test_other_device_gets_a_random_key_from_a_ctr_licence(keys, dev_a, dev_b):
    lic = issue_license(keys, dev_a, groups=SILENT)
    got = _open(lic, keys, profile=dev_b)  # no error: by design nothing tells a wrong device
    assert set(got) == set(SILENT)
    assert all(len(got[g]) == 32 and got[g] != keys.groups[g].key for g in SILENT)
    assert got != _open(issue_license(keys, dev_a, groups=SILENT), keys, profile=dev_b)


def test_secret_required_refused_and_wrong(keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD, secret=SECRET)
    with pytest.raises(ProfileError, match=r"issued with a vendor secret; pass it"):
        _open(lic, keys, profile=dev_a)
    with pytest.raises(InvalidKey):
        _open(lic, keys, profile=dev_a, secret=b"x" * 32)
    assert _open(lic, keys, profile=dev_a, secret=SECRET)["secure"] == keys.groups["secure"].key
    plain = issue_license(keys, dev_a, groups=LOUD)
    with pytest.raises(ProfileError, match=r"issued without a vendor secret; do not pass one"):
        _open(plain, keys, profile=dev_a, secret=SECRET)
    silent = issue_license(keys, dev_a, groups=SILENT, secret=SECRET)
    assert _open(silent, keys, profile=dev_a, secret=b"x" * 32)["main"] != keys.groups["main"].key


# ------------------------------------------------------------------------------------------ moved or edited wraps

def test_licence_for_another_model_file(keys, dev_a):
    other = ContentKeys.new(keys.transforms)
    lic = issue_license(other, dev_a, groups=LOUD)
    with pytest.raises(ContainerError, match=r"this licence is for another model file"):
        _open(lic, keys, profile=dev_a)


def test_gcm_wrap_bound_to_content_id(keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD)
    other_id = os.urandom(16)
    moved = License.from_json(dict(lic.to_json(), content_id=other_id.hex()))
    with pytest.raises(InvalidKey):
        _open(moved, keys, content_id=other_id, profile=dev_a)


def test_gcm_wrap_bound_to_label(keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD)
    data = lic.to_json()
    data["wraps"]["perm"], data["wraps"]["secure"] = data["wraps"]["secure"], data["wraps"]["perm"]
    with pytest.raises(InvalidKey):
        _open(License.from_json(data), keys, profile=dev_a, groups=["secure"])


@pytest.mark.parametrize("field,value", [("salt", "00" * 16), ("secret", True),
                                         ("sources", [{"source": "precision", "helper": {"suite": 1}}])])
def test_gcm_wrap_bound_to_public_fields(keys, dev_a, field, value):
    data = issue_license(keys, dev_a, groups=LOUD).to_json()
    data[field] = value
    with pytest.raises(InvalidKey):
        _open(License.from_json(data), keys, profile=dev_a, secret=SECRET if field == "secret" else None)


def test_gcm_to_ctr_swap_is_refused(keys, dev_a):
    data = issue_license(keys, dev_a, groups=LOUD).to_json()
    for w in data["wraps"].values():
        w.update(alg=CTR, nonce=w["nonce"] + "00" * 4, wrapped=w["wrapped"][:64])
    swapped = License.from_json(data)
    with pytest.raises(ContainerError, match=r"wraps group secure with aes-256-ctr, but the file's transform aes "
                                             r"needs aes-256-gcm; the licence was altered"):
        _open(swapped, keys, profile=dev_a)


def test_ctr_wrap_for_a_detecting_group_is_refused_and_the_reverse(keys, dev_a):
    silent = issue_license(keys, dev_a, groups=["main"])
    with pytest.raises(ContainerError, match="needs aes-256-gcm"):
        _open(silent, keys, transforms={"main": "aes"}, profile=dev_a)
    loud = issue_license(keys, dev_a, groups=["secure"])
    with pytest.raises(ContainerError, match="needs aes-256-ctr"):
        _open(loud, keys, transforms={"secure": "pre-aes"}, profile=dev_a)


def test_mixed_groups_are_refused(keys, dev_a):
    with pytest.raises(UnsupportedConfig, match=r"cannot hold both silent groups \(main, extra.*\) and groups that "
                                                r"detect a wrong key \(secure, perm\).*device-key guesses offline"):
        issue_license(keys, dev_a)
    with pytest.raises(UnsupportedConfig, match="as two licences.*confirms guesses"):
        issue_license(keys, dev_a, groups=["main", "secure"])
    a = issue_license(keys, dev_a, groups=["main"]).to_json()
    a["wraps"].update(issue_license(keys, dev_a, groups=["secure"]).to_json()["wraps"])
    with pytest.raises(ContainerError, match="mixes aes-256-gcm and aes-256-ctr"):
        License.from_json(a)


def test_single_kind_keys_default_to_all_groups(dev_a):
    keys = ContentKeys.new({"a": "aes", "b": "shuffle"})
    assert issue_license(keys, dev_a).groups == ("a", "b")


# ------------------------------------------------------------------------------------------------------ groups

def test_groups_subset_and_missing_group(keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD)
    assert _open(lic, keys, profile=dev_a, groups=["perm"]) == {"perm": keys.groups["perm"].key}
    with pytest.raises(ProfileError, match=r"does not hold group 'main' \(it holds secure, perm\)"):
        _open(lic, keys, profile=dev_a, groups=["main"])
    with pytest.raises(ContainerError, match=r"holds group 'perm', which this model file does not have"):
        _open(lic, keys, profile=dev_a, transforms={"secure": "aes"})
    with pytest.raises(UnsupportedConfig, match=r"unknown group\(s\) 'nope'; these content keys hold main"):
        issue_license(keys, dev_a, groups=["nope"])
    with pytest.raises(TypeError, match="groups must be a list of group labels"):
        issue_license(keys, dev_a, groups="secure")


# --------------------------------------------------------------------------------------------------- signatures

def test_signature(keys, dev_a, tmp_path):
    vendor = Ed25519PrivateKey.generate()
    pub = vendor.public_key()
    lic = issue_license(keys, dev_a, groups=LOUD, signing_key=vendor)
    lic.save(tmp_path / "s.lic")
    lic = License.load(tmp_path / "s.lic")
    assert lic.signature["public_key"] == pub.public_bytes_raw().hex()
    assert _open(lic, keys, profile=dev_a, verify_key=pub)["secure"] == keys.groups["secure"].key
    assert _open(lic, keys, profile=dev_a, verify_key=pub.public_bytes_raw())["perm"] == keys.groups["perm"].key
    with pytest.raises(InvalidTag):
        _open(lic, keys, profile=dev_a, verify_key=Ed25519PrivateKey.generate().public_key())
    data = lic.to_json()
    data["wraps"]["perm"]["nonce"] = "00" * 12
    with pytest.raises(InvalidTag):
        _open(License.from_json(data), keys, profile=dev_a, verify_key=pub)
    data = lic.to_json()
    data["signature"]["sig"] = "00" * 64
    with pytest.raises(InvalidTag):
        _open(License.from_json(data), keys, profile=dev_a, verify_key=pub)
    unsigned = issue_license(keys, dev_a, groups=LOUD)
    with pytest.raises(InvalidTag, match="not signed but a vendor key was given"):
        _open(unsigned, keys, profile=dev_a, verify_key=pub)
    with pytest.raises(KeyFileError, match="not a 32-byte Ed25519 public key"):
        _open(lic, keys, profile=dev_a, verify_key=b"short")


def test_signature_of_a_silent_licence_checks_before_key_work(keys, dev_a, monkeypatch):
    vendor = Ed25519PrivateKey.generate()
    data = issue_license(keys, dev_a, groups=SILENT, signing_key=vendor).to_json()
    data["wraps"]["main"]["wrapped"] = "00" * 32
    monkeypatch.setattr(MasterKDF, "derive", _no_argon2)
    with pytest.raises(InvalidTag):
        _open(License.from_json(data), keys, verify_key=vendor.public_key())


# ------------------------------------------------------------------------------------------ device key and cost

def _no_argon2(self, material):
    raise AssertionError("Argon2id ran")


def test_issuing_runs_no_argon2id_when_the_profile_has_its_device_key(keys, dev_a, monkeypatch):
    monkeypatch.setattr(MasterKDF, "derive", _no_argon2)
    lic = issue_license(keys, dev_a, groups=LOUD, secret=SECRET)
    assert lic.kdf == dev_a.device_key.kdf
    assert _open(lic, keys, profile=dev_a, secret=SECRET)["secure"] == keys.groups["secure"].key


def test_profile_without_device_key_derives_it(keys, monkeypatch):
    calls = []
    real = MasterKDF.derive
    monkeypatch.setattr(MasterKDF, "derive", lambda self, m: calls.append(1) or real(self, m))
    bare = _device(with_key=False)
    lic = issue_license(keys, bare, groups=LOUD, kdf=_fast())
    assert calls == [1]
    assert _open(lic, keys, profile=bare)["secure"] == keys.groups["secure"].key
    assert calls == [1, 1]


def test_device_key_uses_the_stored_key_only_for_its_params(dev_a):
    assert device_key(dev_a) is dev_a.device_key
    assert device_key(dev_a, dev_a.device_key.kdf) is dev_a.device_key
    other = device_key(dev_a, _fast())
    assert other.key != dev_a.device_key.key
    assert other == DeviceKey.derive(dev_a.materials(), other.kdf)
    assert "key=" not in repr(other) and other.key.hex() not in repr(dev_a)


def test_kdf_cap_is_checked_before_any_work(keys, dev_a, monkeypatch):
    data = issue_license(keys, dev_a, groups=LOUD).to_json()
    data["kdf"].update(memory_kib=1 << 21, iterations=1, lanes=1)
    lic = License.from_json(data)  # loads: only Argon2id's own limits apply to the file
    monkeypatch.setattr(MasterKDF, "derive", _no_argon2)
    with pytest.raises(ContainerError, match=r"beyond this device's cap"):
        _open(lic, keys, profile=dev_a, max_kdf_memory_kib=1 << 20)


def test_profile_lacking_a_source(keys, dev_a):
    lic = issue_license(keys, dev_a, groups=LOUD)
    other = DeviceProfile(enrollments=(Enrollment("sram", {}, os.urandom(32), 100.0),))
    with pytest.raises(ProfileError, match=r"lacks source\(s\) precision that this licence needs"):
        _open(lic, keys, profile=other)


def test_crafted_helper_is_a_container_error(keys, dev_a, monkeypatch):
    from chiplock.fingerprint import get_source

    lic = issue_license(keys, dev_a, groups=LOUD)
    src = type(get_source("precision"))

    def reproduce(self, helper):
        raise KeyError("suite")

    monkeypatch.setattr(src, "reproduce", reproduce)
    with pytest.raises(ContainerError, match=r"public helper data for fingerprint source 'precision' is malformed"):
        _open(lic, keys)


# ---------------------------------------------------------------------------------------------- key strength

def test_key_strength_policy_moved_here(keys):
    weak = _device(bits=12.5)
    with pytest.raises(WeakKey, match=r"refusing to lock: .*allow_weak_key=True"):
        issue_license(keys, weak, groups=LOUD)
    with pytest.raises(WeakKey, match=rf"the vendor secret has 3 bytes \(< {MIN_SECRET_BYTES}\)"):
        issue_license(keys, weak, groups=LOUD, secret=b"abc")
    assert issue_license(keys, weak, groups=LOUD, secret=SECRET).secret
    with pytest.warns(LowEntropyWarning, match="locking with a weak key"):
        issue_license(keys, weak, groups=LOUD, allow_weak_key=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_key_strength(_device(bits=80), None, False)


# ------------------------------------------------------------------------------------------------ content keys

def test_content_keys_file_round_trip_private(tmp_path, keys):
    path = tmp_path / "m.keys"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ContentKeys.load(path) == keys
    data = json.loads(path.read_text())
    assert data["chiplock_content_keys"] == 1 and data["content_id"] == keys.content_id.hex()
    assert data["groups"]["secure"] == {"transform": "aes", "key": keys.groups["secure"].key.hex()}
    assert keys.groups["secure"].key.hex() not in repr(keys)


def test_content_keys_new_and_silent():
    k = ContentKeys.new({"a": "pre-aes", "b": "aes", "c": "shuffle"})
    assert len(k.content_id) == 16 and len({g.key for g in k.groups.values()}) == 3
    assert [k.silent(x) for x in "abc"] == [True, False, False]
    assert ContentKeys.new({"a": "aes"}).content_id != k.content_id
    with pytest.raises(UnsupportedConfig, match="nope"):
        ContentKeys.new({"a": "nope"})
    with pytest.raises(ValueError, match="must be 1 to 64 characters"):
        ContentKeys.new({"a/b": "aes"})
    with pytest.raises(ValueError, match="1 to 64 labels"):
        ContentKeys.new({})
    with pytest.raises(ValueError, match=r"no group 'z'"):
        k.silent("z")
    with pytest.raises(ValueError, match="32 bytes"):
        GroupKey("aes", b"short")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(chiplock_content_keys=2), r"version 2 is not supported"),
    (lambda d: d.pop("chiplock_content_keys"), r"not a chiplock content keys file"),
    (lambda d: d.update(extra=1), r"missing or unknown fields"),
    (lambda d: d.update(content_id="AB" * 16), r"content_id is not 16 bytes"),
    (lambda d: d.update(groups={}), r"groups is not an object of 1 to 64"),
    (lambda d: d.update(groups={"a b": {"transform": "aes", "key": "00" * 32}}), r"group label 'a b'"),
    (lambda d: d.update(groups={"a": {"transform": "aes", "key": "00" * 31}}), r"group a is not"),
    (lambda d: d.update(groups={"a": {"transform": "rot13", "key": "00" * 32}}), r"unknown to this chiplock"),
    (lambda d: d.update(groups=[1]), r"groups is not an object"),
])
def test_damaged_content_keys(tmp_path, keys, change, match):
    data = keys.to_json()
    change(data)
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError, match=match):
        ContentKeys.load(path)


def test_content_keys_file_errors(tmp_path):
    with pytest.raises(KeyFileError, match=r"not found; pass the keys file that `chiplock lock` wrote"):
        ContentKeys.load(tmp_path / "nope.keys")
    (tmp_path / "big").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(KeyFileError, match=r"is unreadable \(it is larger than"):
        ContentKeys.load(tmp_path / "big")
    with pytest.raises(KeyFileError, match="unreadable"):
        ContentKeys.load(tmp_path)


# --------------------------------------------------------------------------------------------- malformed licences

@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(chiplock_license=2), r"licence version 2 is not supported"),
    (lambda d: d.update(chiplock_license=True), r"licence version True"),
    (lambda d: d.pop("chiplock_license"), r"not a chiplock licence"),
    (lambda d: d.pop("salt"), r"missing or unknown fields"),
    (lambda d: d.update(extra=1), r"missing or unknown fields"),
    (lambda d: d.update(content_id="00" * 15), r"content_id is not 16 bytes"),
    (lambda d: d.update(salt="ZZ" * 16), r"salt is not 16 bytes"),
    (lambda d: d.update(secret=1), r"secret is not true or false"),
    (lambda d: d.update(sources=[]), r"sources is not a list of 1 to 16"),
    (lambda d: d.update(sources=[{"source": "precision", "helper": {}}] * 17), r"sources is not a list of 1 to 16"),
    (lambda d: d.update(sources=[{"source": "precision", "helper": []}]), r"source entry is not"),
    (lambda d: d.update(sources=[{"source": "a/b", "helper": {}}]), r"source entry is not"),
    (lambda d: d.update(sources=[{"source": "p", "helper": {}}] * 2), r"'p' is listed twice"),
    (lambda d: d.update(sources=[{"source": "p", "helper": {"x": "\ud800"}}]), r"lone surrogate"),
    (lambda d: d.update(kdf={"algorithm": "scrypt"}), r"unsupported KDF"),
    (lambda d: d["kdf"].update(iterations="1"), r"key-derivation parameters are malformed"),
    (lambda d: d.update(wraps={}), r"wraps is not an object of 1 to 64"),
    (lambda d: d.update(wraps={f"g{i}": {} for i in range(65)}), r"wraps is not an object of 1 to 64"),
    (lambda d: d.update(wraps={"": {}}), r"group label ''"),
    (lambda d: d["wraps"]["secure"].update(alg="aes-128-gcm"), r"the wrap of group secure is not"),
    (lambda d: d["wraps"]["secure"].update(nonce="00" * 16), r"the wrap of group secure is not"),
    (lambda d: d["wraps"]["secure"].update(wrapped="00" * 32), r"the wrap of group secure is not"),
    (lambda d: d["wraps"]["secure"].update(extra=1), r"the wrap of group secure is not"),
    (lambda d: d.update(signature={"alg": "rsa"}), r"the signature is not ed25519"),
])
def test_every_licence_field_is_checked(keys, dev_a, change, match):
    data = issue_license(keys, dev_a, groups=LOUD).to_json()
    change(data)
    with pytest.raises(ContainerError, match=match):
        License.from_json(data)


def test_licence_file_errors(tmp_path, keys, dev_a):
    from chiplock.license import MAX_LICENSE_BYTES

    with pytest.raises(FileAccessError, match=r"licence file .* not found; ask the vendor"):
        License.load(tmp_path / "nope.lic")
    (tmp_path / "big").write_bytes(b" " * (MAX_LICENSE_BYTES + 1))
    with pytest.raises(ContainerError, match=r"is unreadable \(it is larger than"):
        License.load(tmp_path / "big")
    (tmp_path / "bad").write_bytes(b'{"chiplock_license": 1, "x": NaN}')
    with pytest.raises(ContainerError, match=r"holds NaN"):
        License.load(tmp_path / "bad")
    with pytest.raises(ContainerError, match=r"not a chiplock licence"):
        License.from_json([1])


def _mutate(value, rng):
    choices = [None, True, 0, -1, 2 ** 40, 1.5, "", "00", "zz" * 16, "00" * 16, [], {}, [value], {"x": value}]
    return rng.choice(choices)


def test_fuzzed_licences_raise_only_chiplock_errors(tmp_path, keys, dev_a):
    # Random edits at every level of a signed licence: loading and opening either works or raises a
    # ChiplockError, never another exception.
    rng = random.Random(1234)
    vendor = Ed25519PrivateKey.generate()
    base = {alg: issue_license(keys, dev_a, groups=g, signing_key=vendor).to_json()
            for alg, g in ((GCM, LOUD), (CTR, SILENT))}
    outcomes = set()
    for i in range(300):
        data = json.loads(json.dumps(base[GCM if i % 2 else CTR]))
        for _ in range(rng.randint(1, 3)):
            node, key = data, None
            path = []
            while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
                key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
                path.append((node, key))
                node = node[key]
            if not path:
                continue
            parent, key = path[-1]
            if rng.random() < 0.2 and isinstance(parent, dict):
                del parent[key]
            else:
                parent[key] = _mutate(parent[key], rng)
        try:
            lic = License.from_json(data)
            _open(lic, keys, profile=dev_a, verify_key=vendor.public_key() if i % 3 == 0 else None)
            outcomes.add("opened")
        except ChiplockError as exc:
            outcomes.add(type(exc).__name__)
    assert "ContainerError" in outcomes and len(outcomes) >= 3, outcomes


def test_fuzzed_licence_bytes_raise_only_chiplock_errors(tmp_path, keys, dev_a):
    rng = random.Random(99)
    raw = bytearray(json.dumps(issue_license(keys, dev_a, groups=LOUD).to_json()).encode())
    path = tmp_path / "f.lic"
    for _ in range(200):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        path.write_bytes(bytes(b))
        try:
            _open(License.load(path), keys, profile=dev_a)
        except ChiplockError:
            pass


def test_wrap_and_licence_constructors_check_their_fields():
    with pytest.raises(ValueError, match="12-byte nonce"):
        Wrap(GCM, b"\0" * 16, b"\0" * 48)
    with pytest.raises(ValueError, match="alg must be"):
        Wrap("rot13", b"", b"")
