"""Device profiles: enrollment, save/load, and the errors a missing or damaged profile gives."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import chiplock
from chiplock import DeviceProfile, ProfileError, UnsupportedConfig
from chiplock.fingerprint import Enrollment


def test_enroll_measures_the_precision_source(profile):
    assert profile.sources == ["precision"]
    e = profile.enrollments[0]
    assert isinstance(e.material, bytes) and len(e.material) >= 16
    assert profile.materials() == {"precision": e.material}
    assert profile.helpers() == {"precision": e.helper}
    json.dumps(e.helper)  # public helper data is JSON


def test_enrolling_twice_in_one_process_gives_the_same_material(profile):
    assert chiplock.enroll().materials() == profile.materials()


def test_save_and_load_round_trip_private_file(tmp_path, profile):
    path = tmp_path / "device.json"
    profile.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = DeviceProfile.load(path)
    assert loaded.materials() == profile.materials() and loaded.helpers() == profile.helpers()
    assert loaded.sources == profile.sources and loaded.host == profile.host


def test_missing_profile_says_how_to_create_one(tmp_path):
    with pytest.raises(ProfileError, match=r"device profile '.*nope.json' not found; create it on the device "
                                           r"with `chiplock enroll -o FILE`"):
        DeviceProfile.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe not json", r"is unreadable \(it is not valid UTF-8\); re-enroll the device"),
    (b"{not json", r"is unreadable \(it is not valid JSON\); re-enroll the device"),
    (b"[1, 2]", r"not a chiplock device profile; create one with `chiplock enroll -o FILE`"),
    (b'{"hello": 1}', r"not a chiplock device profile"),
    (b'{"chiplock_profile": 99, "enrollments": []}', r"version 99 is not supported .*re-enroll the device or upgrade"),
    (b'{"chiplock_profile": true, "enrollments": []}', r"version True is not supported"),
    (b'{"chiplock_profile": 1}', r"malformed \(missing enrollments\); re-enroll the device"),
    (b'{"chiplock_profile": 1, "enrollments": [{"source": "precision", "helper": {}, "material": "zz"}]}',
     r"malformed \(the material of source precision is not 1 to 4096 bytes of hex\)"),
    (b'{"chiplock_profile": 1, "enrollments": []}', r"malformed \(enrollments is not a list of 1 to 16 entries\)"),
])
def test_damaged_profiles(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=match):
        DeviceProfile.load(path)


def _enrollment(**changes):
    e = {"source": "precision", "helper": {"suite": 2}, "material": "ab" * 16, "entropy_bits": None, "info": {}}
    e.update(changes)
    return {k: v for k, v in e.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("doc,match", [
    ({"enrollments": [_enrollment(source="nope")]}, r"source 'nope' is not one of .*precision"),
    ({"enrollments": [_enrollment(source=["precision"])]}, r"source \['precision'\] is not one of"),
    ({"enrollments": [_enrollment(helper="suite 2")]}, r"the helper of source precision is not an object"),
    ({"enrollments": [_enrollment(helper={"x": [[[]]]})]}, None),  # a nested helper is fine
    ({"enrollments": [_enrollment(info=[1])]}, r"the info of source precision is not an object"),
    ({"enrollments": [_enrollment(material="")]}, r"material of source precision is not 1 to 4096 bytes of hex"),
    ({"enrollments": [_enrollment(material="abc")]}, r"material of source precision"),
    ({"enrollments": [_enrollment(material=1234)]}, r"material of source precision"),
    ({"enrollments": [_enrollment(material="ab" * 4097)]}, r"material of source precision"),
    ({"enrollments": [_enrollment(entropy_bits="64")]}, r"entropy_bits of source precision is not null or a number"),
    ({"enrollments": [_enrollment(entropy_bits=True)]}, r"entropy_bits of source precision"),
    ({"enrollments": [_enrollment(entropy_bits=-1)]}, r"entropy_bits of source precision"),
    ({"enrollments": [_enrollment(entropy_bits=40)]}, None),
    ({"enrollments": [_enrollment(material=_DROP)]}, r"lacks source, helper or material"),
    ({"enrollments": [_enrollment(extra=1)]}, r"unknown fields"),
    ({"enrollments": [_enrollment(), _enrollment()]}, r"a source is enrolled twice"),
    ({"enrollments": [_enrollment()] * 17}, r"enrollments is not a list of 1 to 16"),
    ({"enrollments": {"precision": _enrollment()}}, r"enrollments is not a list"),
    ({"enrollments": [_enrollment()], "created": "yesterday"}, r"created is not a finite number"),
    ({"enrollments": [_enrollment()], "host": 7}, r"host is not a string"),
    ({"enrollments": [_enrollment()], "host": "h" * 1025}, r"host is not a string of at most 1024"),
    ({"enrollments": [_enrollment()], "extra": 1}, r"unknown field\(s\) \['extra'\]"),
])
def test_every_profile_field_is_type_checked(tmp_path, doc, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(dict(doc, chiplock_profile=1)))
    if match is None:
        DeviceProfile.load(path)
        return
    with pytest.raises(ProfileError, match=match) as exc:
        DeviceProfile.load(path)
    assert str(exc.value).endswith("re-enroll the device with `chiplock enroll -o FILE`")


@pytest.mark.parametrize("text,match", [
    ('"created": Infinity', r"holds Infinity, which is not JSON"),
    ('"created": NaN', r"holds NaN, which is not JSON"),
    ('"created": 1e999', r"holds a number too large for a float"),
    ('"created": ' + "1" * 5000, r"holds a number literal longer than 40 characters"),
    (r'"host": "\\ud800"', None),  # an escaped backslash, not a surrogate
    (r'"host": "\ud800"', r"holds a lone surrogate"),
    ('"host": ' + "[" * 5000 + "]" * 5000, r"is nested deeper than 64 levels"),
])
def test_profile_json_caps(tmp_path, text, match):
    doc = json.dumps({"chiplock_profile": 1, "enrollments": [_enrollment()]})
    path = tmp_path / "p.json"
    path.write_text(doc[:-1] + ", " + text + "}")
    if match is None:
        assert DeviceProfile.load(path).host == r"\ud800"
        return
    with pytest.raises(ProfileError, match=r"is unreadable \(it " + match):
        DeviceProfile.load(path)


def test_profile_over_the_size_cap(tmp_path):
    from chiplock.profile import MAX_PROFILE_BYTES

    path = tmp_path / "p.json"
    path.write_bytes(b" " * (MAX_PROFILE_BYTES + 1))
    with pytest.raises(ProfileError, match=f"is larger than {MAX_PROFILE_BYTES} bytes"):
        DeviceProfile.load(path)


def test_a_profile_that_loads_can_lock(tmp_path, fast_kdf):
    # Unusual but valid values (int created, int entropy, nested helper) load, then lock and unlock work.
    path = tmp_path / "p.json"
    e = _enrollment(entropy_bits=80, helper={"suite": 2, "device": "cpu", "extra": {"deep": [1, [2, {"x": None}]]}})
    path.write_text(json.dumps({"chiplock_profile": 1, "created": 0, "host": "\u00e9", "enrollments": [e]}))
    loaded = DeviceProfile.load(path)
    assert loaded.entropy_bits() == 80.0 and isinstance(loaded.created, float)
    w = {"w": torch.arange(4.0)}
    chiplock.lock(w, tmp_path / "m.chiplock", loaded, "aes", secret=b"s" * 16, kdf=fast_kdf)
    assert torch.equal(chiplock.unlock(tmp_path / "m.chiplock", profile=loaded, secret=b"s" * 16)["w"], w["w"])


def test_profile_folder_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="unreadable"):
        DeviceProfile.load(tmp_path)


def test_material_is_not_in_repr_or_errors(tmp_path, profile):
    hexm = profile.enrollments[0].material.hex()
    assert hexm not in repr(profile) and hexm not in str(profile.enrollments[0])
    data = profile.to_json()
    data["enrollments"][0]["helper"] = "not a dict"
    with pytest.raises(ProfileError) as exc:
        DeviceProfile.from_json(data)
    assert hexm not in str(exc.value)


def test_empty_and_unknown_sources():
    with pytest.raises(ValueError, match=r"sources is empty; pass at least one source name"):
        chiplock.enroll(sources=())
    with pytest.raises(UnsupportedConfig, match=r"unknown fingerprint source 'nope'; choose one of .*precision"):
        chiplock.enroll(sources=("nope",))
    with pytest.raises(ValueError, match="needs at least one enrollment"):
        DeviceProfile(enrollments=())


def test_entropy_bits_sum_or_none():
    two = DeviceProfile(enrollments=(Enrollment("a", {}, os.urandom(8), 40.0), Enrollment("b", {}, b"x", 30.0)))
    assert two.entropy_bits() == 70.0
    unknown = DeviceProfile(enrollments=(Enrollment("a", {}, b"x", 40.0), Enrollment("b", {}, b"y", None)))
    assert unknown.entropy_bits() is None


@pytest.mark.parametrize("helper,problem", [
    ({"x": float("nan")}, "a number is NaN or infinite"),
    ({"x": "\ud800"}, "lone surrogate"),
    ({"x": b"raw"}, "which is not a JSON type"),
    ("not a dict", "not a dict"),
])
def test_profile_refuses_helper_data_a_container_could_not_hold(helper, problem):
    # Caught when the profile is built, so lock never writes a container its reader would refuse.
    with pytest.raises(ValueError, match=f"the helper data of source 'a' is not a plain JSON object .*{problem}"):
        DeviceProfile(enrollments=(Enrollment("a", helper, b"x"),))


def test_save_refuses_non_finite_info(tmp_path):
    p = DeviceProfile(enrollments=(Enrollment("precision", {}, b"x", info={"seconds": float("inf")}),))
    with pytest.raises(ProfileError, match="NaN or an infinity in a source's info"):
        p.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


# The device key (issue 9): stored at enrollment so that issuing a licence never runs Argon2id.

def _fast_kdf():
    from chiplock.keys import INSECURE_FAST, KdfParams

    return KdfParams(**INSECURE_FAST)


def test_enroll_stores_the_device_key(tmp_path):
    from chiplock.profile import DeviceKey

    kdf = _fast_kdf()
    p = chiplock.enroll(kdf=kdf)
    assert p.device_key == DeviceKey.derive(p.materials(), kdf)
    assert p.device_key.key != DeviceKey.derive(p.materials(), _fast_kdf()).key  # the salt is per device
    p.save(tmp_path / "p.json")
    loaded = DeviceProfile.load(tmp_path / "p.json")
    assert loaded.device_key == p.device_key and loaded == p
    assert p.device_key.key.hex() not in repr(p)
    with pytest.raises(TypeError, match="kdf must be a KdfParams"):
        chiplock.enroll(kdf={"iterations": 1})


def test_profiles_without_a_device_key_still_load_and_build(tmp_path):
    doc = {"chiplock_profile": 1, "enrollments": [_enrollment()]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    old = DeviceProfile.load(path)
    assert old.device_key is None and "device_key" not in old.to_json()
    upgraded = old.with_device_key(_fast_kdf())
    assert upgraded.device_key is not None and upgraded.enrollments == old.enrollments
    assert DeviceProfile(enrollments=old.enrollments).device_key is None
    with pytest.raises(TypeError, match="device_key must be a DeviceKey"):
        DeviceProfile(enrollments=old.enrollments, device_key=b"k" * 32)


@pytest.mark.parametrize("dk,match", [
    ("ab" * 32, r"device_key is not an object with kdf and key"),
    ({"key": "ab" * 32}, r"device_key is not an object with kdf and key"),
    ({"kdf": {}, "key": "ab" * 31}, r"the device key is not 32 bytes of hex"),
    ({"kdf": {}, "key": 7}, r"the device key is not 32 bytes of hex"),
    ({"kdf": {"algorithm": "scrypt"}, "key": "ab" * 32}, r"the device key's kdf: unsupported KDF 'scrypt'"),
    ({"kdf": {"algorithm": "argon2id", "salt": "00" * 16, "iterations": "1", "lanes": 1, "memory_kib": 8},
      "key": "ab" * 32}, r"the device key's kdf: the file's key-derivation parameters are malformed"),
])
def test_device_key_field_is_checked(tmp_path, dk, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"chiplock_profile": 1, "enrollments": [_enrollment()], "device_key": dk}))
    with pytest.raises(ProfileError, match=match) as exc:
        DeviceProfile.load(path)
    assert str(exc.value).endswith("re-enroll the device with `chiplock enroll -o FILE`")
