"""The neuron lock's password key rides the licence hierarchy: right device -> same password, wrong -> silent."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import pytest

from chiplock.errors import ContainerError, KeyFileError, ProfileError
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.license import CTR, GCM, ContentKeys, License, Wrap
from chiplock.neuronlock import NeuronStats, PasswordSpec, derive_password
from chiplock.neuronlock.keys import (LABEL, check_keys, issue, new_keys, password_key,
                                      password_key_from_keys)
from chiplock.profile import DeviceProfile


def _device(material: bytes | None = None) -> DeviceProfile:
    """A synthetic device with 80 estimated bits and a fast stored device key (as in the core v2 red team)."""
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"},
                   material=material if material is not None else os.urandom(32), entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


def _stats() -> list[NeuronStats]:
    """Public statistics of two layers (16 conv channels, 32 linear units), as rank_neurons would give."""
    def layer(name: str, n: int) -> NeuronStats:
        return NeuronStats(layer=name, importance=tuple(1.0 + (i * 7 % n) / n for i in range(n)),
                           mean=tuple(0.1 * (i % 5) for i in range(n)), std=tuple(0.5 + 0.01 * i for i in range(n)))
    return [layer("features.0", 16), layer("fc1", 32)]


@pytest.fixture(scope="module")
def keys() -> ContentKeys:
    return new_keys()


@pytest.fixture(scope="module")
def dev_a() -> DeviceProfile:
    return _device()


def test_new_keys_hold_one_silent_neuronlock_group(keys):
    assert list(keys.groups) == [LABEL]
    assert keys.groups[LABEL].transform == "pre-aes" and keys.silent(LABEL)
    assert len(password_key_from_keys(keys)) == 32
    # Fresh randomness per model.
    assert password_key_from_keys(new_keys()) != password_key_from_keys(keys)


def test_right_device_gets_the_vendor_key_and_password(keys, dev_a):
    lic = issue(keys, dev_a)
    assert lic.groups == (LABEL,) and lic.silent and lic.wraps[LABEL].alg == CTR
    key = password_key(lic, content_id=keys.content_id, profile=dev_a)
    assert key == password_key_from_keys(keys)
    spec = PasswordSpec()
    assert derive_password(key, _stats(), spec) == derive_password(password_key_from_keys(keys), _stats(), spec)


def test_wrong_device_gets_a_wrong_key_and_password_without_error(keys, dev_a):
    lic = issue(keys, dev_a)
    other = _device()
    wrong = password_key(lic, content_id=keys.content_id, profile=other)  # No exception: silent by design.
    assert len(wrong) == 32 and wrong != password_key_from_keys(keys)
    right_pw = derive_password(password_key_from_keys(keys), _stats())
    wrong_pw = derive_password(wrong, _stats())
    assert wrong_pw != right_pw
    # Plausible: the same layers and neuron counts, only the secret parts differ.
    assert [(lp.layer, len(lp.neurons)) for lp in wrong_pw.layers] == \
        [(lp.layer, len(lp.neurons)) for lp in right_pw.layers]


def test_one_flipped_bit_of_material_is_a_wrong_device(keys):
    material = os.urandom(32)
    lic = issue(keys, _device(material))
    near = bytes([material[0] ^ 1]) + material[1:]
    assert password_key(lic, profile=_device(material)) == password_key_from_keys(keys)
    assert password_key(lic, profile=_device(near)) != password_key_from_keys(keys)


def test_vendor_secret_is_needed_and_a_wrong_one_is_silent(keys, dev_a):
    secret = os.urandom(32)
    lic = issue(keys, dev_a, secret=secret)
    assert password_key(lic, profile=dev_a, secret=secret) == password_key_from_keys(keys)
    assert password_key(lic, profile=dev_a, secret=os.urandom(32)) != password_key_from_keys(keys)
    with pytest.raises(ProfileError, match="vendor secret"):
        password_key(lic, profile=dev_a)


def test_licence_round_trips_through_its_file(keys, dev_a, tmp_path):
    issue(keys, dev_a).save(tmp_path / "dev.lic")
    lic = License.load(tmp_path / "dev.lic")
    assert password_key(lic, content_id=keys.content_id, profile=dev_a) == password_key_from_keys(keys)


def test_keys_file_is_private_and_round_trips(keys, tmp_path):
    path = tmp_path / "model.keys"
    keys.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert password_key_from_keys(ContentKeys.load(path)) == password_key_from_keys(keys)


def test_without_a_profile_the_device_is_measured(keys, dev_a, monkeypatch):
    """profile=None reproduces each source's material on this machine (here a stand-in source), as unlock does."""
    import chiplock.license as license_mod

    material = dev_a.enrollments[0].material

    class FakeSource:
        def reproduce(self, helper):
            assert helper == {"suite": 2, "device": "cpu"}
            return material

    monkeypatch.setattr(license_mod, "get_source", lambda name: FakeSource())
    lic = issue(keys, dev_a)
    assert password_key(lic) == password_key_from_keys(keys)
    material = os.urandom(32)  # Now "this machine" is another device.
    assert password_key(lic) != password_key_from_keys(keys)


def test_licence_of_another_model_is_refused_when_the_content_id_is_known(keys, dev_a):
    lic = issue(keys, dev_a)
    with pytest.raises(ContainerError, match="another model"):
        password_key(lic, content_id=new_keys().content_id, profile=dev_a)


def test_licence_without_the_neuronlock_group_is_refused(dev_a):
    other = ContentKeys.new({"main": "pre-aes"})
    from chiplock.license import issue_license

    lic = issue_license(other, dev_a)
    with pytest.raises(ProfileError, match="does not hold group 'neuronlock'"):
        password_key(lic, profile=dev_a)


def test_a_licence_edited_to_an_authenticated_wrap_is_refused(keys, dev_a):
    lic = issue(keys, dev_a)
    edited = replace(lic, wraps={LABEL: Wrap(GCM, os.urandom(12), os.urandom(48))})
    with pytest.raises(ContainerError, match="altered"):
        password_key(edited, profile=dev_a)


def test_keys_of_another_kind_are_refused(dev_a):
    with pytest.raises(KeyFileError, match="no 'neuronlock' group"):
        check_keys(ContentKeys.new({"main": "pre-aes"}))
    loud = ContentKeys.new({LABEL: "aes"})
    with pytest.raises(KeyFileError, match="detects a wrong key"):
        password_key_from_keys(loud)
    with pytest.raises(KeyFileError, match="detects a wrong key"):
        issue(loud, dev_a)
    with pytest.raises(TypeError, match="ContentKeys"):
        check_keys(b"\0" * 32)
    with pytest.raises(TypeError, match="License"):
        password_key({"chiplock_license": 1})
