"""Red team of issue 9 (core v2): container v3, licences, per-group keys, sharded folders, Hugging Face.

The attacker holds the content file (or folder), licences issued to OTHER devices, the public helper data, and
sometimes a legitimate licence of their own. Each working attack is a ``strict`` xfail whose reason names the
bug and a fix; each property that held is an ordinary regression test. Findings: /work/notes/lead/redteam9.md.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import chiplock
from chiplock.errors import (
    ChiplockError,
    ContainerError,
    InvalidKey,
    InvalidTag,
    ProfileError,
)
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.license import (
    CTR,
    GCM,
    ContentKeys,
    License,
    Wrap,
    issue_license,
    open_license,
)
from chiplock.profile import DeviceProfile

# --------------------------------------------------------------------------------------------------- helpers


def _device(material: bytes | None = None) -> DeviceProfile:
    """A synthetic device with 80 estimated bits (lock accepts it) and a fast stored device key."""
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"},
                   material=material if material is not None else os.urandom(32), entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


def _guess(profile: DeviceProfile, material: bytes) -> DeviceProfile:
    """What an attacker builds for one guess of a device's material: the public helper, the guessed material."""
    e = profile.enrollments[0]
    return DeviceProfile(enrollments=(Enrollment(source=e.source, helper=dict(e.helper), material=material),))


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.0.weight": torch.randn(48, 32, generator=g), "layer.0.bias": torch.randn(48, generator=g),
            "layer.1.weight": torch.randn(16, 48, generator=g)}


@pytest.fixture(scope="module")
def dev_a() -> DeviceProfile:
    return _device()


@pytest.fixture(scope="module")
def dev_b() -> DeviceProfile:
    return _device()


def _save_plain(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))


def _sharded_folder(folder: Path, weights: dict[str, torch.Tensor], per_shard: int = 1) -> None:
    """A Hugging Face style folder: one tensor per shard plus model.safetensors.index.json and a config.json."""
    folder.mkdir(parents=True)
    names = list(weights)
    shards = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    wm = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_plain({n: weights[n] for n in group}, folder / fname)
        wm.update({n: fname for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (folder / "config.json").write_text('{"model_type": "toy"}')


# =========================================================================================== working attacks


@pytest.mark.xfail(strict=True, reason=(
    "Co-licensee key oracle: every device licensed for a model gets the SAME content key, and a CTR wrap is "
    "CK xor AES-CTR(KEK_B, nonce), so anyone who holds CK (any licensee of the model, on their own device, "
    "vendor secret included: the device user passes it) learns AES_KEK_B(nonce) from device B's public licence "
    "and can test guesses of B's material exactly (license.py:issue_license CTR branch ~line 640, "
    "open_license ~line 800); the device key and its Argon2id salt are also shared by every licence of B "
    "(profile-stored DeviceKey), so the recovered DK opens B's licences for OTHER models. The docstring claim "
    "'nothing in the licence lets anyone test a device-key guess' is false for co-licensees. Fix: state it in "
    "docs/FORMAT.md and the module docstring; bind the CTR KEK to a per-licence Argon2id salt only if issue "
    "cost may grow, else rely on >=64-bit fingerprints (WeakKey policy) and say so"))
def test_co_licensee_gets_exact_device_key_oracle_from_ctr_licence(dev_a, dev_b):
    keys = ContentKeys.new({"main": "pre-aes"})
    lic_a, lic_b = issue_license(keys, dev_a), issue_license(keys, dev_b)
    assert lic_a.silent and lic_b.silent
    ctx = {"content_id": keys.content_id, "transforms": keys.transforms}
    # The attacker is a legitimate licensee on device A: they learn the model's content key on their device.
    ck = open_license(lic_a, profile=dev_a, **ctx)["main"]
    # With it, device B's public CTR licence tells right material guesses from wrong ones, exactly.
    right = _guess(dev_b, dev_b.enrollments[0].material)
    wrong = _guess(dev_b, os.urandom(32))

    def confirms(guess: DeviceProfile) -> bool:
        return open_license(lic_b, profile=guess, **ctx)["main"] == ck

    oracle = confirms(right) and not confirms(wrong)
    assert not oracle, "a holder of the content key can test guesses of another device's key exactly"


@pytest.mark.xfail(strict=True, reason=(
    "The 'never mix kinds in one licence' rule does not remove the oracle it is meant to remove: the refusal "
    "message (license.py issue_license, UnsupportedConfig) tells the vendor to issue one licence per kind, and "
    "both licences share one device key (DK||secret, only the HKDF salt differs), so the AES-GCM licence is an "
    "exact device-key oracle that then opens the silent CTR licence. Fix: reword the error and docs (two "
    "licences for one device are exactly as weak as one mixed licence), or derive silent-group KEKs from a "
    "separately salted Argon2id device key and document that the material remains the shared secret"))
def test_gcm_licence_for_same_device_is_oracle_for_its_ctr_licence(dev_b):
    keys = ContentKeys.new({"main": "pre-aes", "head": "aes"})
    silent, loud = issue_license(keys, dev_b, groups=["main"]), issue_license(keys, dev_b, groups=["head"])
    ctx = {"content_id": keys.content_id, "transforms": keys.transforms}

    def confirms(guess: DeviceProfile) -> bool:
        try:
            open_license(loud, profile=guess, **ctx)
            return True
        except InvalidKey:
            return False

    right, wrong = _guess(dev_b, dev_b.enrollments[0].material), _guess(dev_b, os.urandom(32))
    oracle = confirms(right) and not confirms(wrong)
    if oracle:  # ... and the confirmed guess opens the silent group.
        assert open_license(silent, profile=right, **ctx)["main"] == keys.groups["main"].key
    assert not oracle, "the GCM licence of the same device confirms guesses of the key that opens its CTR licence"


def test_plaintext_checkpoint_side_file_is_not_shipped_in_locked_folder(tmp_path, dev_a):
    src = tmp_path / "src"
    w = _weights()
    _sharded_folder(src, w)
    buf = io.BytesIO()
    torch.save(w, buf)
    (src / "model_best.pth.tar").write_bytes(buf.getvalue())  # The name PyTorch's ImageNet example uses.
    try:
        chiplock.lock(src, tmp_path / "locked", dev_a, transform="aes")
    except ChiplockError as exc:
        assert "model_best.pth.tar" in str(exc)
        return
    needle = w["layer.0.weight"].reshape(-1)[:16].numpy().tobytes()
    leaked = [p.name for p in (tmp_path / "locked").iterdir() if needle in p.read_bytes()]
    assert not leaked, f"plaintext weights shipped in the locked folder: {leaked}"


@pytest.mark.slow
def test_signed_hf_folder_refuses_tampered_config_json(tmp_path, dev_a):
    transformers = pytest.importorskip("transformers")
    from chiplock import hf

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "src")
    sk = Ed25519PrivateKey.generate()
    pub = sk.public_key().public_bytes_raw()
    hf.lock_pretrained(tmp_path / "src", tmp_path / "locked", dev_a, transform="aes", signing_key=sk)
    conf = tmp_path / "locked" / "config.json"
    doc = json.loads(conf.read_text())
    assert doc["hidden_act"] == "silu"
    doc["hidden_act"] = "relu"
    conf.write_text(json.dumps(doc))
    with pytest.raises(ChiplockError):
        got = hf.from_pretrained(tmp_path / "locked", profile=dev_a, verify_key=pub)
        assert got.config.hidden_act == "relu"  # The tampered architecture was built and loaded.


def test_crafted_clock_helper_in_licence_is_refused_in_bounded_time(dev_a):
    import signal

    import numpy as np

    from chiplock.fingerprint.clock import _syndrome_params, cpu_timings
    from chiplock.keys.fuzzy import FuzzyExtractor

    names, _ = cpu_timings(rounds=1)
    _, fuzzy = FuzzyExtractor(params=_syndrome_params(64, 4)).generate(np.zeros(64, np.uint8))
    helper = {"version": 1, "device": "cpu", "ops": names, "rounds": 1, "quantile": 0.5, "profiles": 1,
              "width": [1.0] * len(names), "offset": [0.0] * len(names), "bits": [10 ** 7] * len(names),
              "fuzzy": fuzzy}
    keys = ContentKeys.new({"main": "pre-aes"})
    doc = issue_license(keys, dev_a).to_json()
    doc["sources"] = [{"source": "clock", "helper": helper}]
    lic = License.from_json(doc)  # Public, unsigned: anyone can hand it to a device.

    class Hung(Exception):
        pass

    def alarm(*_):
        raise Hung()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        with pytest.raises(ChiplockError):
            open_license(lic, content_id=keys.content_id, transforms=keys.transforms)  # As on the device.
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_content_keys_cannot_land_inside_the_locked_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _sharded_folder(src, _weights())
    out.mkdir()
    try:
        chiplock.lock(src, out, content_keys_path=out / "model.keys")
    except ChiplockError:
        return
    assert not (out / "model.keys").exists(), "the content keys were written into the folder that gets shipped"


def test_lock_does_not_overwrite_another_models_content_keys(tmp_path):
    chiplock.lock(_weights(0), tmp_path / "a.chiplock", content_keys_path=tmp_path / "model.keys")
    before = (tmp_path / "model.keys").read_bytes()
    try:
        chiplock.lock(_weights(1), tmp_path / "b.chiplock", content_keys_path=tmp_path / "model.keys")
    except ChiplockError:
        pass
    assert (tmp_path / "model.keys").read_bytes() == before, "model a's content keys were overwritten"


@pytest.mark.parametrize("transform", ["pre-aes", "shuffle"])
def test_stored_bytes_cannot_change_between_digest_and_decode(tmp_path, monkeypatch, transform):
    # The race: right after the bytes of a tensor are verified, the file's bytes change (a concurrent local writer,
    # or a malicious network file system serving different pages on a second read). Simulated deterministically
    # by tampering inside the digest step. The decode must use the bytes that were verified.
    import chiplock.transforms.pre_aes as pre_aes_mod
    from chiplock import api

    sk = Ed25519PrivateKey.generate()
    pub = sk.public_key().public_bytes_raw()
    dev = _device()
    w = {"w": torch.randn(64, 64)}
    path = tmp_path / "m.chiplock"
    chiplock.lock(w, path, dev, transform=transform, signing_key=sk)
    want = chiplock.unlock(path, profile=dev, verify_key=pub)["w"]
    size = path.stat().st_size
    tampered = []

    def tamper() -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, bytes(b ^ 0xFF for b in os.pread(fd, 4096, size - 8192)), size - 8192)
        finally:
            os.close(fd)
        tampered.append(True)

    real_leaf, real_copy = pre_aes_mod.leaf_digest, api.copy_and_digest

    def leaf_then_race(chunk):
        d = real_leaf(chunk)
        tamper()
        return d

    def copy_then_race(stored):
        out = real_copy(stored)
        tamper()
        return out

    monkeypatch.setattr(pre_aes_mod, "leaf_digest", leaf_then_race)
    monkeypatch.setattr(api, "copy_and_digest", copy_then_race)
    try:
        got = chiplock.unlock(path, profile=dev, verify_key=pub)["w"]
    except InvalidTag:
        return
    assert tampered, "the race was never simulated (the digest step changed): update this test"
    assert torch.equal(got, want), "tampered bytes were decoded after the integrity check passed"


def test_content_keys_path_equal_to_output_is_refused_before_work(tmp_path):
    out = tmp_path / "m.chiplock"
    with pytest.raises(ChiplockError):
        chiplock.lock(_weights(), out, content_keys_path=out)
    assert not out.exists() or b"chiplock_content_keys" not in out.read_bytes()


# ================================================================================================ what held


def test_pre_aes_wrong_device_is_silent_and_file_carries_no_key_check(tmp_path, dev_a, dev_b, container_io):
    """A pre-aes file has no group MAC, a CTR licence, and a wrong device gets weights, not an error."""
    read, _ = container_io
    w = _weights()
    chiplock.lock(w, tmp_path / "m.chiplock", dev_a)
    meta, _, _ = read(tmp_path / "m.chiplock")
    assert all(g["mac"] is None for g in meta["groups"].values())
    assert {x["alg"] for x in meta["license"]["wraps"].values()} == {CTR}
    got = chiplock.unlock(tmp_path / "m.chiplock", profile=dev_b)
    assert set(got) == set(w) and not torch.equal(got["layer.0.weight"], w["layer.0.weight"])


def test_mac_on_silent_group_is_refused(tmp_path, dev_a, container_io):
    read, write = container_io
    chiplock.lock(_weights(), tmp_path / "m.chiplock", dev_a)
    meta, header, data = read(tmp_path / "m.chiplock")
    meta["groups"]["main"]["mac"] = "00" * 32
    write(tmp_path / "t.chiplock", meta, header, data)
    with pytest.raises(ContainerError):
        chiplock.unlock(tmp_path / "t.chiplock", profile=dev_a)


def test_crafted_mixed_kind_licence_is_refused(dev_a):
    keys = ContentKeys.new({"main": "pre-aes", "head": "aes"})
    a, b = issue_license(keys, dev_a, groups=["main"]), issue_license(keys, dev_a, groups=["head"])
    doc = a.to_json()
    doc["wraps"].update(b.to_json()["wraps"])
    with pytest.raises(ContainerError, match="mixes"):
        License.from_json(doc)
    with pytest.raises(ValueError):
        License(content_id=a.content_id, sources=a.sources, kdf=a.kdf, secret=False, salt=a.salt,
                wraps={**a.wraps, **b.wraps})
    with pytest.raises(ChiplockError):  # Refused at issue too.
        issue_license(keys, dev_a)


@pytest.mark.parametrize("edit", ["alg", "transform"])
def test_aes_group_cannot_be_downgraded_to_silent(tmp_path, dev_a, container_io, edit):
    """Turning an aes group's GCM wrap into CTR (with GCM's own keystream: nonce || 00000002 and the ciphertext
    without its tag, which unwraps the real key) or relabelling the group pre-aes is refused before key work."""
    read, write = container_io
    chiplock.lock(_weights(), tmp_path / "m.chiplock", dev_a, transform="aes")
    meta, header, data = read(tmp_path / "m.chiplock")
    w = meta["license"]["wraps"]["main"]
    assert w["alg"] == GCM
    if edit == "alg":
        meta["license"]["wraps"]["main"] = {"alg": CTR, "nonce": w["nonce"] + "00000002",
                                            "wrapped": w["wrapped"][:64]}
    else:
        meta["groups"]["main"] = {"transform": "pre-aes", "mac": None}
    write(tmp_path / "t.chiplock", meta, header, data)
    with pytest.raises(ContainerError):
        chiplock.unlock(tmp_path / "t.chiplock", profile=dev_a)


def test_licence_cost_cap_applies_before_any_measurement_or_argon2(dev_a, monkeypatch):
    import chiplock.license as L

    keys = ContentKeys.new({"main": "aes"})
    doc = issue_license(keys, dev_a).to_json()
    doc["kdf"]["memory_kib"] = 4 << 20  # 4 GiB: over the default 1 GiB device cap.
    lic = License.from_json(doc)

    def boom(*a, **k):
        raise AssertionError("key work ran before the cost cap")

    monkeypatch.setattr(L, "_device_materials", boom)
    monkeypatch.setattr(L.DeviceKey, "derive", boom)
    with pytest.raises(ContainerError):
        open_license(lic, content_id=keys.content_id, transforms=keys.transforms)


def test_licence_for_another_model_refused_before_key_work(tmp_path, dev_a, monkeypatch):
    import chiplock.license as L

    chiplock.lock(_weights(0), tmp_path / "a.chiplock", dev_a)
    chiplock.lock(_weights(1), tmp_path / "b.chiplock", content_keys_path=tmp_path / "b.keys")
    from chiplock.container.reader import open_container
    lic_a = License.from_json(open_container(tmp_path / "a.chiplock").meta.license)
    monkeypatch.setattr(L, "_kek", lambda *a: (_ for _ in ()).throw(AssertionError("key work")))
    with pytest.raises(ContainerError, match="another model"):
        chiplock.unlock(tmp_path / "b.chiplock", profile=dev_a, license=lic_a)


def test_signature_covers_embedded_licence_and_separate_licence_must_be_signed(tmp_path, dev_a, container_io):
    read, write = container_io
    sk = Ed25519PrivateKey.generate()
    pub = sk.public_key().public_bytes_raw()
    chiplock.lock(_weights(), tmp_path / "m.chiplock", dev_a, signing_key=sk)
    meta, header, data = read(tmp_path / "m.chiplock")
    other = issue_license(ContentKeys.new({"main": "pre-aes"}), dev_a).to_json()
    other["content_id"] = meta["content_id"]
    meta["license"] = other  # A licence the vendor never issued, same content id.
    write(tmp_path / "t.chiplock", meta, header, data)
    with pytest.raises(InvalidTag):
        chiplock.unlock(tmp_path / "t.chiplock", profile=dev_a, verify_key=pub)
    # Content mode: the file is signed, the separate licence is not -> refused under verify_key.
    chiplock.lock(_weights(), tmp_path / "c.chiplock", content_keys_path=tmp_path / "c.keys", signing_key=sk)
    lic = issue_license(ContentKeys.load(tmp_path / "c.keys"), dev_a)
    with pytest.raises(InvalidTag):
        chiplock.unlock(tmp_path / "c.chiplock", profile=dev_a, license=lic, verify_key=pub)
    signed = issue_license(ContentKeys.load(tmp_path / "c.keys"), dev_a, signing_key=sk)
    assert set(chiplock.unlock(tmp_path / "c.chiplock", profile=dev_a, license=signed, verify_key=pub)) == \
        set(_weights())


def test_aes_tags_cannot_move_between_chunks(tmp_path):
    """Two chunks of one tensor: swapping their tags (or truncating them) fails GCM, even with the right key."""
    from chiplock.transforms import get_transform
    from chiplock.transforms.base import CHUNK_BYTES

    tf = get_transform("aes")
    t = torch.randn(CHUNK_BYTES // 4 + 1024)
    key = os.urandom(32)
    enc = tf.encode(t, key)
    tags = bytes.fromhex(enc.params["tags"])
    assert len(tags) == 32
    swapped = dict(enc.params, tags=(tags[16:] + tags[:16]).hex())
    stored = enc.data.reshape(-1).view("uint8")
    with pytest.raises(InvalidTag):
        tf.decode(stored, swapped, key, torch.float32, tuple(t.shape))
    with pytest.raises(ValueError):
        tf.decode(stored, dict(enc.params, tags=tags[:16].hex()), key, torch.float32, tuple(t.shape))
    # Two encodings of the same tensor under the same key use fresh nonce prefixes (no keystream reuse).
    assert tf.encode(t, key).params["nonce"] != enc.params["nonce"]


def test_aes_nonces_and_keys_differ_across_tensors_and_locks(tmp_path, dev_a, container_io):
    read, _ = container_io
    same = torch.ones(64, 64)
    w = {"x": same, "y": same.clone()}
    chiplock.lock(w, tmp_path / "1.chiplock", dev_a, transform="aes")
    chiplock.lock(w, tmp_path / "2.chiplock", dev_a, transform="aes")
    m1, _, d1 = read(tmp_path / "1.chiplock")
    m2, _, d2 = read(tmp_path / "2.chiplock")
    n = same.numel() * 4
    blocks = [d1[:n], d1[n:2 * n], d2[:n], d2[n:2 * n]]
    assert len(set(blocks)) == 4  # Equal plaintexts never give equal ciphertexts.
    nonces = [m["tensors"][k]["params"]["nonce"] for m in (m1, m2) for k in ("x", "y")]
    assert len(set(nonces)) == 4


def test_unlock_to_file_leaves_nothing_when_a_later_tensor_is_tampered(tmp_path, dev_a):
    w = _weights()
    chiplock.lock(w, tmp_path / "m.chiplock", dev_a, transform="aes")
    raw = bytearray((tmp_path / "m.chiplock").read_bytes())
    raw[-3] ^= 1  # Inside the last tensor's stored bytes.
    (tmp_path / "m.chiplock").write_bytes(bytes(raw))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InvalidTag):
        chiplock.unlock_to_file(tmp_path / "m.chiplock", out_dir / "plain.safetensors", profile=dev_a)
    assert os.listdir(out_dir) == []


def test_plaintext_outputs_and_keys_file_are_private_even_with_umask_zero(tmp_path, dev_a):
    old = os.umask(0)
    try:
        chiplock.lock(_weights(), tmp_path / "c.chiplock", content_keys_path=tmp_path / "c.keys")
        lic = issue_license(ContentKeys.load(tmp_path / "c.keys"), dev_a)
        chiplock.unlock_to_file(tmp_path / "c.chiplock", tmp_path / "p.safetensors", profile=dev_a, license=lic)
        src = tmp_path / "src"
        _sharded_folder(src, _weights(), per_shard=2)
        chiplock.lock(src, tmp_path / "lk", content_keys_path=tmp_path / "lk.keys")
        lic2 = issue_license(ContentKeys.load(tmp_path / "lk.keys"), dev_a)
        chiplock.unlock_to_file(tmp_path / "lk", tmp_path / "plain", profile=dev_a, license=lic2)
    finally:
        os.umask(old)
    for p in (tmp_path / "c.keys", tmp_path / "lk.keys", tmp_path / "p.safetensors"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o700
    for p in (tmp_path / "plain").glob("*.safetensors"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p


def test_no_key_material_in_repr_or_errors(tmp_path, dev_a, dev_b):
    keys = ContentKeys.new({"main": "aes"})
    lic = issue_license(keys, dev_a)
    secrets = [keys.groups["main"].key, dev_a.device_key.key, dev_a.enrollments[0].material]
    texts = [repr(keys), repr(dev_a), repr(lic), repr(dev_a.device_key), str(keys.groups)]
    try:
        open_license(lic, content_id=keys.content_id, transforms=keys.transforms, profile=dev_b)
    except InvalidKey as exc:
        texts.append(str(exc))
    for s in secrets:
        for form in (s.hex(), repr(s)[2:-1]):
            assert not any(form in t for t in texts)


def test_folder_shard_substitution_and_index_lies(tmp_path, dev_a):
    w = _weights()
    for name in ("a", "b"):
        _sharded_folder(tmp_path / f"src{name}", w)
        chiplock.lock(tmp_path / f"src{name}", tmp_path / f"lk{name}", dev_a)
    la, lb = tmp_path / "lka", tmp_path / "lkb"
    shards = sorted(p.name for p in la.glob("*.chiplock"))
    assert len(shards) == 3
    index = json.loads((la / "model.chiplock.index.json").read_text())
    # (1) A shard from another lock of the same weights (another content id) is refused.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in la.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / shards[1]).write_bytes((lb / shards[1]).read_bytes())
    with pytest.raises(ContainerError):
        chiplock.unlock(mixed, profile=dev_a)
    # (2) Dropping a shard from the unsigned index is refused (each shard knows its place and the count).
    dropped = {t: s for t, s in index["weight_map"].items() if s != shards[2]}
    (la / "model.chiplock.index.json").write_text(json.dumps({**index, "weight_map": dropped}))
    with pytest.raises(ContainerError):
        chiplock.unlock(la, profile=dev_a)
    # (3) The index lies about which shard holds a tensor: unlock ignores it, unlock_to_file refuses it.
    names = list(index["weight_map"])
    lie = dict(index["weight_map"])
    lie[names[0]], lie[names[1]] = lie[names[1]], lie[names[0]]
    (la / "model.chiplock.index.json").write_text(json.dumps({**index, "weight_map": lie}))
    got = chiplock.unlock(la, profile=dev_a)
    ref = chiplock.unlock(lb, profile=dev_a)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    with pytest.raises(ContainerError):
        chiplock.unlock_to_file(la, tmp_path / "plain", profile=dev_a)
    assert not (tmp_path / "plain").exists()


def test_index_naming_too_many_shards_is_refused_quickly(tmp_path):
    folder = tmp_path / "lk"
    folder.mkdir()
    wm = {f"t{i}": f"s{i}.chiplock" for i in range(100_001)}
    (folder / "model.chiplock.index.json").write_text(json.dumps({"metadata": {"format": "chiplock"},
                                                                 "weight_map": wm}))
    t = time.perf_counter()
    with pytest.raises(ContainerError):
        chiplock.unlock(folder)
    assert time.perf_counter() - t < 5


def test_hostile_licence_files_fail_fast(tmp_path, dev_a):
    keys = ContentKeys.new({"main": "pre-aes"})
    good = issue_license(keys, dev_a).to_json()
    cases = {
        "deep.lic": b"[" * 100_000 + b"]" * 100_000,
        "huge.lic": b" " * ((16 << 20) + 1),
        "helper.lic": json.dumps({**good, "sources": [{"source": "precision", "helper": {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}]}).encode(),
        "wraps.lic": json.dumps({**good, "wraps": {f"g{i}": good["wraps"]["main"] for i in range(65)}}).encode(),
        "sources.lic": json.dumps({**good, "sources": [{"source": f"s{i}", "helper": {}} for i in range(17)]}).encode(),
        "alg.lic": json.dumps({**good, "wraps": {"main": {**good["wraps"]["main"], "alg": "aes-128-ecb"}}}).encode(),
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        t = time.perf_counter()
        with pytest.raises(ContainerError):
            License.load(tmp_path / name)
        assert time.perf_counter() - t < 5, name


@pytest.mark.slow
def test_header_padded_with_99_mib_of_spaces_is_bounded(tmp_path, dev_a):
    chiplock.lock(_weights(), tmp_path / "m.chiplock", dev_a)
    raw = (tmp_path / "m.chiplock").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n] + b" " * (99 << 20)
    (tmp_path / "p.chiplock").write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    t = time.perf_counter()
    assert set(chiplock.unlock(tmp_path / "p.chiplock", profile=dev_a)) == set(_weights())
    assert time.perf_counter() - t < 10


def test_wrap_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        Wrap(CTR, os.urandom(12), os.urandom(32))
    with pytest.raises(ValueError):
        Wrap(GCM, os.urandom(12), os.urandom(32))


def test_secret_licence_requires_secret_before_key_work(dev_a):
    keys = ContentKeys.new({"main": "aes"})
    lic = issue_license(keys, dev_a, secret=os.urandom(32))
    with pytest.raises(ProfileError):
        open_license(lic, content_id=keys.content_id, transforms=keys.transforms, profile=dev_a)


def test_pre_aes_decode_never_errors_on_wrong_keys(tmp_path):
    """No key-dependent error path in pre-aes decoding (it would be an oracle): 40 random content keys, every
    dtype and special values, all decode to something."""
    from chiplock.api import decode_with_keys

    g = torch.Generator().manual_seed(0)
    w = {"f32": torch.randn(30, 70, generator=g), "f16": torch.randn(500, generator=g).half(),
         "bf16": torch.randn(257, generator=g).bfloat16(), "i8": torch.randint(-128, 127, (300,), dtype=torch.int8),
         "spec": torch.tensor([float("nan"), float("inf"), -0.0, 0.0, 1e-40, 3e38] * 10), "zero": torch.zeros(64)}
    chiplock.lock(w, tmp_path / "m.chiplock", content_keys_path=tmp_path / "k")
    for _ in range(40):
        got = decode_with_keys(tmp_path / "m.chiplock", {"main": os.urandom(32)})
        assert set(got) == set(w)


def test_ctr_licences_never_share_a_keystream(dev_a):
    """Two licences for one device and one model: fresh salt (so a fresh KEK) and fresh nonces: xor of the two
    wraps is not the xor of the keys (no two-time pad)."""
    keys = ContentKeys.new({"main": "pre-aes", "extra": "pre-aes"})
    l1, l2 = issue_license(keys, dev_a), issue_license(keys, dev_a)
    assert l1.salt != l2.salt
    nonces = [w.nonce for lic in (l1, l2) for w in lic.wraps.values()]
    assert len(set(nonces)) == 4
    x = bytes(a ^ b for a, b in zip(l1.wraps["main"].wrapped, l1.wraps["extra"].wrapped))
    assert x != bytes(a ^ b for a, b in zip(keys.groups["main"].key, keys.groups["extra"].key))


def test_folder_unlock_to_file_leaves_nothing_when_a_later_shard_is_tampered(tmp_path, dev_a):
    src = tmp_path / "src"
    _sharded_folder(src, _weights())
    chiplock.lock(src, tmp_path / "lk", dev_a, transform="aes")
    last = max((tmp_path / "lk").glob("*.chiplock"))
    raw = bytearray(last.read_bytes())
    raw[-2] ^= 1
    last.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidTag):
        chiplock.unlock_to_file(tmp_path / "lk", out / "plain", profile=dev_a)
    assert os.listdir(out) == []
