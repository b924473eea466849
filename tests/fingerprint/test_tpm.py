"""TPM 2.0 source: a secret sealed to a (software) TPM, enroll -> lock -> unlock, other TPMs, PCR policies.

The tests start and stop their own ``swtpm`` processes on free loopback ports; they skip, saying why, where
``swtpm`` or ``tpm2-pytss`` is missing (``make test`` installs both when it runs as root with apt-get).
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import chiplock
from chiplock.errors import FingerprintError, WeakKey
from chiplock.fingerprint import available_sources, get_source
from chiplock.fingerprint.tpm import ENV_TCTI, parse_pcrs
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.keys.combine import key_strength
from swtpm_helper import Swtpm, free_port_pair, needs_swtpm

try:
    import tpm2_pytss
except ImportError:
    tpm2_pytss = None

needs_pytss = pytest.mark.skipif(tpm2_pytss is None, reason="tpm2-pytss is not installed (pip install "
                                 "'chiplock[tpm]' after apt-get install libtss2-dev; `make test` does both as root)")
@pytest.fixture(scope="module")
def swtpm(tmp_path_factory):
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm") / "state").start()
    yield tpm
    tpm.stop()


@pytest.fixture
def fresh_swtpm(tmp_path):
    tpm = Swtpm(tmp_path / "fresh-state").start()
    yield tpm
    tpm.stop()


def _cannot_reproduce(src, enrollment) -> bool:
    """True when ``src`` does not recover the material: it raises FingerprintError or derives other bytes."""
    try:
        return src.reproduce(enrollment.helper) != enrollment.material
    except FingerprintError:
        return True


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "fc.weight": torch.randn(10, 32, generator=g),
            "fc.bias": torch.randn(10, generator=g).to(torch.bfloat16)}


# Without a TPM -------------------------------------------------------------------------------------------

def test_registered_with_tpm2_pytss_imported_lazily():
    assert "tpm" in available_sources()
    src = get_source("tpm", tcti="swtpm:host=127.0.0.1,port=1")
    assert src.tcti == "swtpm:host=127.0.0.1,port=1" and src.pcrs is None


def test_tcti_and_pcrs_come_from_options_env_or_default(monkeypatch):
    monkeypatch.delenv(ENV_TCTI, raising=False)
    monkeypatch.delenv("CHIPLOCK_TPM_PCRS", raising=False)
    assert get_source("tpm").tcti == "device:/dev/tpmrm0"
    monkeypatch.setenv(ENV_TCTI, "swtpm:host=127.0.0.1,port=2321")
    monkeypatch.setenv("CHIPLOCK_TPM_PCRS", "sha256:7,0")
    src = get_source("tpm")
    assert (src.tcti, src.pcrs) == ("swtpm:host=127.0.0.1,port=2321", "sha256:0,7")
    assert get_source("tpm", tcti="mssim:port=1", pcrs="").pcrs is None


@pytest.mark.parametrize("spec, canonical", [("sha256:0,7", "sha256:0,7"), ("SHA256:7, 0,7", "sha256:0,7"),
                                             ("sha1:16+sha256:23", "sha1:16+sha256:23"), ("", None), (None, None)])
def test_pcr_selection_is_canonical(spec, canonical):
    assert parse_pcrs(spec) == canonical


@pytest.mark.parametrize("spec", ["sha256", "sha256:", "md5:0", "sha256:24", "sha256:0+sha256:1", "0,7",
                                  "sha256:0;7"])
def test_bad_pcr_selection_is_refused(spec):
    with pytest.raises(ValueError, match="pcrs="):
        get_source("tpm", pcrs=spec)


@pytest.mark.parametrize("helper, message", [
    ({"version": 99}, "unknown version"),
    ({"version": 1, "primary": "owner/rsa-9999"}, "upgrade chiplock"),
    ({"version": 1, "primary": "owner/ecc-p256-srk", "public": "zz", "private": "00"}, "damaged"),
    ({"version": 1, "primary": "owner/ecc-p256-srk", "public": "", "private": "00"}, "damaged"),
    ({"version": 1, "primary": "owner/ecc-p256-srk", "public": "00" * 4000, "private": "00"}, "damaged"),
    ({"version": 1, "primary": "owner/ecc-p256-srk", "pcrs": "sha9:1", "public": "00", "private": "00"}, "damaged"),
])
def test_damaged_helper_is_refused_before_any_tpm_call(helper, message):
    with pytest.raises(FingerprintError, match=message):
        get_source("tpm", tcti="swtpm:host=127.0.0.1,port=1").reproduce(helper)


def test_missing_tpm2_pytss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)  # makes `import tpm2_pytss` raise ImportError
    with pytest.raises(FingerprintError, match=r"pip install 'chiplock\[tpm\]'.*libtss2-dev"):
        get_source("tpm", tcti="swtpm:host=127.0.0.1,port=1").enroll()


@needs_pytss
def test_unreachable_tpm_names_the_tcti_and_the_variable():
    port = free_port_pair()  # nothing listens there
    with pytest.raises(FingerprintError, match=rf"cannot reach a TPM 2.0 through TCTI 'swtpm:host=127.0.0.1,"
                                               rf"port={port}'.*{ENV_TCTI}"):
        get_source("tpm", tcti=f"swtpm:host=127.0.0.1,port={port}").enroll()


# On swtpm ------------------------------------------------------------------------------------------------

@needs_swtpm
def test_enrollment_helper_holds_only_wrapped_blobs(swtpm):
    e = get_source("tpm", tcti=swtpm.tcti).enroll()
    assert len(e.material) == 32 and e.entropy_bits == 256
    assert set(e.helper) == {"version", "primary", "pcrs", "public", "private"}
    text = json.dumps(e.helper) + json.dumps(e.info)
    assert e.material.hex() not in text and swtpm.tcti not in text
    assert e.material not in bytes.fromhex(e.helper["public"]) + bytes.fromhex(e.helper["private"])
    # Each enrollment seals a fresh secret.
    assert get_source("tpm", tcti=swtpm.tcti).enroll().material != e.material


@needs_swtpm
def test_same_tpm_reproduces_across_restarts(tmp_path):
    tpm = Swtpm(tmp_path / "state").start()
    try:
        plain = get_source("tpm", tcti=tpm.tcti).enroll()
        bound = get_source("tpm", tcti=tpm.tcti, pcrs="sha256:0,7").enroll()
        tpm.restart()  # a reboot: same storage seed, PCRs back to their boot values
        src = get_source("tpm", tcti=tpm.tcti)
        assert src.reproduce(plain.helper) == plain.material
        assert src.reproduce(bound.helper) == bound.material
    finally:
        tpm.stop()


@needs_swtpm
@pytest.mark.parametrize("pcrs", [None, "sha256:0,7"])
def test_fresh_tpm_state_cannot_reproduce(swtpm, fresh_swtpm, pcrs):
    e = get_source("tpm", tcti=swtpm.tcti, pcrs=pcrs).enroll()
    other = get_source("tpm", tcti=fresh_swtpm.tcti)
    assert _cannot_reproduce(other, e)
    with pytest.raises(FingerprintError, match="this file was enrolled on another TPM"):
        other.reproduce(e.helper)
    # The enrolled TPM still does, so the failure above is the other TPM's, not a broken helper.
    assert get_source("tpm", tcti=swtpm.tcti).reproduce(e.helper) == e.material


@needs_swtpm
def test_altered_blob_is_refused(swtpm):
    e = get_source("tpm", tcti=swtpm.tcti).enroll()
    private = bytearray(bytes.fromhex(e.helper["private"]))
    private[-1] ^= 1
    with pytest.raises(FingerprintError, match="another TPM .*altered"):
        get_source("tpm", tcti=swtpm.tcti).reproduce({**e.helper, "private": private.hex()})
    # Dropping the PCR policy from the helper does not unseal a PCR-bound secret without it.
    bound = get_source("tpm", tcti=swtpm.tcti, pcrs="sha256:0,7").enroll()
    assert _cannot_reproduce(get_source("tpm", tcti=swtpm.tcti), type(bound)(
        source="tpm", helper={**bound.helper, "pcrs": None}, material=bound.material))


@needs_swtpm
def test_pcr_bound_secret_fails_after_a_pcr_extend(tmp_path):
    tpm = Swtpm(tmp_path / "state").start()
    try:
        bound = get_source("tpm", tcti=tpm.tcti, pcrs="sha256:0,7").enroll()
        other_bank = get_source("tpm", tcti=tpm.tcti, pcrs="sha1:7").enroll()
        plain = get_source("tpm", tcti=tpm.tcti).enroll()
        src = get_source("tpm", tcti=tpm.tcti)
        assert src.reproduce(bound.helper) == bound.material
        with tpm2_pytss.ESAPI(tpm.tcti) as ectx:  # what a changed boot chain does to PCR 7
            ectx.pcr_event(tpm2_pytss.constants.ESYS_TR.PCR7, b"another secure-boot policy")
        with pytest.raises(FingerprintError, match=r"PCRs sha256:0,7 differ from their values at enrollment"):
            src.reproduce(bound.helper)
        assert _cannot_reproduce(src, other_bank)
        assert src.reproduce(plain.helper) == plain.material  # not PCR-bound: unaffected
        tpm.restart()  # the next boot resets PCRs to the enrolled values
        assert get_source("tpm", tcti=tpm.tcti).reproduce(bound.helper) == bound.material
    finally:
        tpm.stop()


@needs_swtpm
def test_secret_never_crosses_the_tpm_bus_in_clear(swtpm, tmp_path, monkeypatch):
    cap = tmp_path / "bus.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(cap))
    sniffed = f"pcap:{swtpm.tcti}"
    try:
        plain = get_source("tpm", tcti=sniffed).enroll()
    except FingerprintError as exc:
        if "cannot reach a TPM" not in str(exc):
            raise
        pytest.skip(f"the pcap TCTI of libtss2 is not available here ({exc})")
    bound = get_source("tpm", tcti=sniffed, pcrs="sha256:0").enroll()
    src = get_source("tpm", tcti=sniffed)
    assert src.reproduce(plain.helper) == plain.material and src.reproduce(bound.helper) == bound.material
    # Control: an Unseal without parameter encryption shows the secret in the same capture.
    from chiplock.fingerprint.tpm import _srk_template

    control = get_source("tpm", tcti=swtpm.tcti).enroll()
    c, ty = tpm2_pytss.constants, tpm2_pytss.types
    with tpm2_pytss.ESAPI(sniffed) as ectx:
        primary = ectx.create_primary(None, _srk_template(tpm2_pytss), c.ESYS_TR.OWNER)[0]
        try:
            sealed = ectx.load(primary, ty.TPM2B_PRIVATE.unmarshal(bytes.fromhex(control.helper["private"]))[0],
                               ty.TPM2B_PUBLIC.unmarshal(bytes.fromhex(control.helper["public"]))[0])
            try:
                assert bytes(ectx.unseal(sealed)) == control.material
            finally:
                ectx.flush_context(sealed)
        finally:
            ectx.flush_context(primary)
    wire = cap.read_bytes()
    assert control.material in wire
    assert [plain.material in wire, bound.material in wire] == [False, False], "a sealed secret crossed in clear"


@needs_swtpm
@pytest.mark.parametrize("transform", ["aes", "pre-aes"])
def test_lock_unlock_round_trip_and_other_tpm(swtpm, fresh_swtpm, tmp_path, monkeypatch, transform):
    profile = chiplock.enroll(("tpm",), options={"tpm": {"tcti": swtpm.tcti}})
    strength = key_strength(profile.enrollments)
    assert strength.bits == 256 and strength.sufficient
    weights, path = _weights(), tmp_path / "m.chiplock"
    with warnings.catch_warnings():
        warnings.simplefilter("error", chiplock.LowEntropyWarning)
        try:
            chiplock.lock(weights, path, profile, transform=transform, kdf=KdfParams(**INSECURE_FAST))
        except WeakKey as exc:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"a tpm-only key (256 bits) was refused as weak: {exc}")
    meta = json.dumps(chiplock.inspect(path))
    assert profile.enrollments[0].material.hex() not in meta
    # On the device: the source reproduces through CHIPLOCK_TPM_TCTI; bit-exact.
    monkeypatch.setenv(ENV_TCTI, swtpm.tcti)
    out = chiplock.unlock(path)
    assert list(out) == list(weights)
    for name, t in weights.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name].view(-1).view(torch.uint8),
                                                          t.reshape(-1).view(torch.uint8))
    monkeypatch.setenv(ENV_TCTI, fresh_swtpm.tcti)
    with pytest.raises(FingerprintError, match="this file was enrolled on another TPM"):
        chiplock.unlock(path)


@needs_swtpm
def test_cli_enroll_source_tpm(swtpm, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from chiplock.cli import app

    monkeypatch.setenv(ENV_TCTI, swtpm.tcti)
    monkeypatch.setenv("CHIPLOCK_TPM_PCRS", "sha256:0,7")
    out = tmp_path / "device.json"
    result = CliRunner().invoke(app, ["enroll", "--source", "tpm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    profile = chiplock.DeviceProfile.load(out)
    (e,) = profile.enrollments
    assert e.source == "tpm" and e.helper["pcrs"] == "sha256:0,7" and e.entropy_bits == 256
    assert get_source("tpm").reproduce(e.helper) == e.material


@needs_swtpm
def test_fingerprint_report_reproduces_tpm_through_its_helper(swtpm):
    """The reliability report measures tpm by reproduce(helper), as unlock does (not the precision probes)."""
    from chiplock.fingerprint.report import measure_source

    r = measure_source("tpm", trials=3, options={"tcti": swtpm.tcti})
    assert (r.reproduced, r.trials, r.entropy_bits, r.ber) == (3, 3, 256, 0.0)
