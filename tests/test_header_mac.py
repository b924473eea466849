"""aes and shuffle authenticate their header with the file key; pre-aes must not (it would be a key oracle)."""

from __future__ import annotations

import pytest
import torch

import chiplock
from chiplock.errors import InvalidKey, InvalidTag
from chiplock.keys import INSECURE_FAST, KdfParams

SECRET = b"vendor secret for header-mac tests"


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(64, generator=g)}


def _lock(tmp_path, weights, profile, fast_kdf, transform):
    path = tmp_path / f"m-{transform}.chiplock"
    chiplock.lock(weights, path, profile, transform=transform, secret=SECRET, kdf=fast_kdf)
    return path


@pytest.mark.parametrize("transform", ["aes", "shuffle"])
def test_untouched_file_unlocks(tmp_path, weights, profile, fast_kdf, transform):
    path = _lock(tmp_path, weights, profile, fast_kdf, transform)
    got = chiplock.unlock(path, profile=profile, secret=SECRET)
    assert all(torch.equal(got[k], weights[k]) for k in weights)


def test_aes_rewritten_nonce_is_refused(tmp_path, weights, profile, fast_kdf, container_io):
    """A tamperer changes a tensor's nonce and recomputes the unkeyed header digest: InvalidTag, not garbage."""
    read, write = container_io
    path = _lock(tmp_path, weights, profile, fast_kdf, "aes")
    meta, header, data = read(path)
    nonce = bytearray.fromhex(meta["tensors"]["w"]["params"]["nonce"])
    nonce[0] ^= 1
    meta["tensors"]["w"]["params"]["nonce"] = nonce.hex()
    write(path, meta, header, data)
    with pytest.raises(InvalidTag):
        chiplock.unlock(path, profile=profile, secret=SECRET)


@pytest.mark.parametrize("transform", ["aes", "shuffle"])
@pytest.mark.parametrize("tamper", ["created_by", "params", "drop_mac", "swap_mac", "regroup"])
def test_rewritten_header_is_refused(tmp_path, weights, profile, fast_kdf, container_io, transform, tamper):
    """Each rewrite keeps the header well formed and recomputes its unkeyed digest, as a tamperer would; the
    group's MAC under the content key (which the right device opens) refuses it."""
    read, write = container_io
    path = _lock(tmp_path, weights, profile, fast_kdf, transform)
    meta, header, data = read(path)
    mac = meta["groups"]["main"]["mac"]
    assert isinstance(mac, str) and len(mac) == 64
    if tamper == "created_by":
        meta["created_by"] = "someone else"
    elif tamper == "params":
        # aes: the nonce; shuffle: the block size (the stored bytes' digest still matches: only the MAC can tell).
        params = meta["tensors"]["w"]["params"]
        if "nonce" in params:
            params["nonce"] = params["nonce"][:-1] + ("0" if params["nonce"][-1] != "0" else "1")
        else:
            params["block"] //= 2
    elif tamper == "drop_mac":
        # A group without its MAC is malformed for aes/shuffle (the reader refuses it before any key work).
        meta["groups"]["main"]["mac"] = None
    elif tamper == "swap_mac":
        # Another file for the same device (another content key): its MAC must not transfer.
        other = _lock(tmp_path / "..", weights, profile, KdfParams(**INSECURE_FAST), transform)
        meta["groups"]["main"]["mac"] = read(other)[0]["groups"]["main"]["mac"]
    elif tamper == "regroup":
        # Move tensor "b" to a new group that reuses main's MAC and transform; the licence has no wrap for it.
        meta["groups"]["extra"] = dict(meta["groups"]["main"])
        meta["tensors"]["b"]["group"] = "extra"
    write(path, meta, header, data)
    if tamper == "drop_mac":
        with pytest.raises(chiplock.ContainerError, match="lacks its 32-byte header MAC"):
            chiplock.unlock(path, profile=profile, secret=SECRET)
        return
    if tamper == "regroup":
        # The licence cannot open "extra"; the whole file is refused, and "main" alone fails its MAC.
        with pytest.raises(chiplock.ProfileError, match="does not hold group 'extra'"):
            chiplock.unlock(path, profile=profile, secret=SECRET)
    with pytest.raises(InvalidTag) as exc:
        chiplock.unlock(path, profile=profile, secret=SECRET, groups=["main"])
    assert str(exc.value) == str(InvalidTag()), "authentication failures carry no detail"


@pytest.mark.parametrize("transform", ["aes", "shuffle"])
def test_licence_is_outside_the_mac_but_authenticated_by_its_wrap(tmp_path, weights, profile, fast_kdf,
                                                                   container_io, transform):
    """The MAC covers the content's description, not the licence: a re-issued licence for the same content
    keys keeps the file valid, and an altered licence fails its own AES-GCM wrap (InvalidKey)."""
    read, write = container_io
    path = tmp_path / "c.chiplock"
    keys_path = tmp_path / "c.keys"
    chiplock.lock(weights, path, transform=transform, content_keys_path=keys_path)
    meta, header, data = read(path)
    assert meta.get("license") is None
    lic = chiplock.issue_license(chiplock.ContentKeys.load(keys_path), profile, secret=SECRET)
    meta["license"] = lic.to_json()
    write(path, meta, header, data)
    got = chiplock.unlock(path, profile=profile, secret=SECRET)
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    meta["license"]["salt"] = "00" * 16
    write(path, meta, header, data)
    with pytest.raises(InvalidKey):
        chiplock.unlock(path, profile=profile, secret=SECRET)


@pytest.mark.parametrize("transform", ["aes", "shuffle"])
def test_wrong_device_is_invalid_key_not_invalid_tag(tmp_path, weights, profile, wrong_profile, fast_kdf,
                                                      transform):
    path = _lock(tmp_path, weights, profile, fast_kdf, transform)
    with pytest.raises(InvalidKey):
        chiplock.unlock(path, profile=wrong_profile, secret=SECRET)


def test_pre_aes_has_no_keyed_header_check(tmp_path, weights, profile, fast_kdf, container_io):
    """Nothing keyed in a pre-aes file: no group MAC, and the licence wrap is unauthenticated AES-CTR."""
    read, _ = container_io
    path = _lock(tmp_path, weights, profile, fast_kdf, "pre-aes")
    meta = read(path)[0]
    assert meta["groups"] == {"main": {"transform": "pre-aes", "mac": None}}
    assert {w["alg"] for w in meta["license"]["wraps"].values()} == {"aes-256-ctr"}
