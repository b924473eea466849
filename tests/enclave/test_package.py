"""A partition as one container: the host's licence opens only the public part, the executor's only the secure one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import chiplock
from chiplock.enclave.package import (ENCLAVE_GROUP, ENCLAVE_SPEC, HOST_GROUP, HOST_SPEC, decode_spec, encode_spec,
                                      issue, load_host, load_secure)
from chiplock.enclave.package import package as package_partition
from chiplock.errors import EnclaveError, InvalidKey, ProfileError, UnsupportedConfig
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.license import ContentKeys
from chiplock.profile import DeviceProfile
from cli_helpers import synthetic_device
from swtpm_helper import Swtpm, needs_swtpm


_device = synthetic_device


def _partition(secure: bool = True) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    public = {"units.0.lin.weight": torch.randn(8, 1, 3, 3, generator=g), "units.0.lin.bias": torch.randn(8, generator=g)}
    sec = {"units.1.lin.weight": torch.randn(10, 8, generator=g), "units.1.lin.bias": torch.randn(10, generator=g)}
    spec = {"version": 1, "strategy": "last-k" if secure else "all-out", "k": 1,
            "ops": {"tail": {"inputs": [{"dtype": "float32", "shape": [8]}],
                             "outputs": [{"dtype": "float32", "shape": [10]}]}} if secure else {}}
    return SimpleNamespace(spec=spec, public=public, secure=sec if secure else {})


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg")
    p = _partition()
    package_partition(p, d / "m.chiplock", content_keys_path=d / "m.keys")
    host_dev, enclave_dev = _device(), _device()
    host_lic, enclave_lic = issue(ContentKeys.load(d / "m.keys"), host_profile=host_dev, enclave_profile=enclave_dev)
    return SimpleNamespace(path=d / "m.chiplock", p=p, host_dev=host_dev, enclave_dev=enclave_dev, host_lic=host_lic,
                           enclave_lic=enclave_lic)


def test_groups_and_transforms(packaged):
    meta = chiplock.inspect(packaged.path)
    groups = {label: g["transform"] for label, g in meta["groups"].items()}
    assert groups == {HOST_GROUP: "pre-aes", ENCLAVE_GROUP: "aes"}
    where = {name: t["group"] for name, t in meta["tensors"].items()}
    assert {n for n, g in where.items() if g == ENCLAVE_GROUP} == {*packaged.p.secure, ENCLAVE_SPEC}
    assert {n for n, g in where.items() if g == HOST_GROUP} == {*packaged.p.public, HOST_SPEC}


def test_each_licence_opens_its_own_part(packaged):
    spec, public = load_host(packaged.path, packaged.host_lic, profile=packaged.host_dev)
    assert spec == packaged.p.spec
    assert public.keys() == packaged.p.public.keys()
    assert all(torch.equal(public[n], packaged.p.public[n]) for n in public)
    spec2, secure = load_secure(packaged.path, packaged.enclave_lic, profile=packaged.enclave_dev)
    assert spec2 == packaged.p.spec
    assert all(torch.equal(secure[n], packaged.p.secure[n]) for n in packaged.p.secure)


def test_host_licence_does_not_open_the_secure_part(packaged):
    with pytest.raises(ProfileError):
        load_secure(packaged.path, packaged.host_lic, profile=packaged.host_dev)


def test_executor_licence_on_another_device_is_refused(packaged):
    with pytest.raises(InvalidKey):
        load_secure(packaged.path, packaged.enclave_lic, profile=_device())


def test_no_secure_plaintext_in_the_file(packaged):
    raw = packaged.path.read_bytes()
    for t in packaged.p.secure.values():
        assert t.numpy().tobytes()[:32] not in raw


def test_all_out_has_no_executor_part(tmp_path):
    p = _partition(secure=False)
    package_partition(p, tmp_path / "m.chiplock", content_keys_path=tmp_path / "m.keys")
    keys = ContentKeys.load(tmp_path / "m.keys")
    with pytest.raises(UnsupportedConfig):
        issue(keys, host_profile=None, enclave_profile=_device())
    host_dev = _device()
    host_lic, _ = issue(keys, host_profile=host_dev, enclave_profile=None)
    with pytest.raises(EnclaveError, match="no secure part"):
        load_secure(tmp_path / "m.chiplock", host_lic, profile=host_dev)
    spec, public = load_host(tmp_path / "m.chiplock", host_lic, profile=host_dev)
    assert spec["strategy"] == "all-out" and public.keys() == p.public.keys()


def test_name_clash_is_refused(tmp_path):
    p = _partition()
    p.secure["units.0.lin.weight"] = torch.zeros(1)
    with pytest.raises(UnsupportedConfig, match="both parts"):
        package_partition(p, tmp_path / "m.chiplock", content_keys_path=tmp_path / "m.keys")
    assert not (tmp_path / "m.chiplock").exists() and not (tmp_path / "m.keys").exists()


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b"{\"a\": ", b"\xff\xfe", b"{" * 100 + b"}" * 100])
def test_malformed_spec_is_an_enclave_error(raw):
    with pytest.raises(EnclaveError):
        decode_spec(torch.frombuffer(bytearray(raw + b" "), dtype=torch.uint8))


def test_spec_round_trip_and_wrong_kinds():
    spec = {"version": 1, "ops": {"x": {"inputs": [], "outputs": []}}}
    assert decode_spec(encode_spec(spec)) == spec
    with pytest.raises(EnclaveError):
        decode_spec(torch.zeros(3, dtype=torch.float32))
    with pytest.raises(UnsupportedConfig):
        encode_spec({"w": torch.zeros(1)})


@needs_swtpm
def test_executor_key_sealed_to_the_tpm_and_boot_state(tmp_path, monkeypatch):
    """The executor's licence on a TPM-sealed secret with a PCR policy: it opens on this TPM in this boot state,
    and no longer once PCR 7 changes (another boot chain), though nothing else changed."""
    import tpm2_pytss

    from chiplock.errors import FingerprintError
    from chiplock.fingerprint import get_source
    from chiplock.fingerprint.tpm import ENV_TCTI

    tpm = Swtpm(tmp_path / "state").start()
    try:
        monkeypatch.setenv(ENV_TCTI, tpm.tcti)
        e = get_source("tpm", tcti=tpm.tcti, pcrs="sha256:0,7").enroll()
        enclave_dev = DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))
        p = _partition()
        package_partition(p, tmp_path / "m.chiplock", content_keys_path=tmp_path / "m.keys")
        _, lic = issue(ContentKeys.load(tmp_path / "m.keys"), host_profile=None, enclave_profile=enclave_dev)
        lic.save(tmp_path / "enclave.lic")
        # profile=None: the executor measures this device (unseals from the TPM) as it would in production.
        spec, secure = load_secure(tmp_path / "m.chiplock", tmp_path / "enclave.lic")
        assert spec == p.spec and torch.equal(secure["units.1.lin.weight"], p.secure["units.1.lin.weight"])
        with tpm2_pytss.ESAPI(tpm.tcti) as ectx:
            ectx.pcr_event(tpm2_pytss.constants.ESYS_TR.PCR7, b"another boot chain")
        with pytest.raises(FingerprintError, match="PCRs"):
            load_secure(tmp_path / "m.chiplock", tmp_path / "enclave.lic")
    finally:
        tpm.stop()
