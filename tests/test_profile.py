"""Device profiles: enrollment, save/load, and the errors a missing or damaged profile gives."""

from __future__ import annotations

import json
import os
import stat

import pytest

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
    (b"\xff\xfe not json", r"is unreadable \(UnicodeDecodeError\); re-enroll the device"),
    (b"{not json", r"is unreadable \(JSONDecodeError\); re-enroll the device"),
    (b"[1, 2]", r"not a chiplock device profile; create one with `chiplock enroll -o FILE`"),
    (b'{"hello": 1}', r"not a chiplock device profile"),
    (b'{"chiplock_profile": 99, "enrollments": []}', r"version 99 is not supported .*re-enroll the device or upgrade"),
    (b'{"chiplock_profile": 1}', r"malformed \(KeyError\); re-enroll the device"),
    (b'{"chiplock_profile": 1, "enrollments": [{"source": "precision", "helper": {}, "material": "zz"}]}',
     r"malformed \(ValueError\)"),
    (b'{"chiplock_profile": 1, "enrollments": []}', r"malformed"),
])
def test_damaged_profiles(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=match):
        DeviceProfile.load(path)


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


def test_precision_has_no_entropy_estimate(profile):
    assert profile.entropy_bits() is None
    two = DeviceProfile(enrollments=(Enrollment("a", {}, os.urandom(8), 40.0), Enrollment("b", {}, b"x", 30.0)))
    assert two.entropy_bits() == 70.0
