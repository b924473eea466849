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
@pytest.mark.parametrize("tamper", ["created_by", "drop_mac", "swap_mac"])
def test_rewritten_header_is_refused(tmp_path, weights, profile, fast_kdf, container_io, transform, tamper):
    read, write = container_io
    path = _lock(tmp_path, weights, profile, fast_kdf, transform)
    meta, header, data = read(path)
    assert isinstance(meta.get("header_mac"), str) and len(meta["header_mac"]) == 64
    if tamper == "created_by":
        meta["created_by"] = "someone else"
    elif tamper == "drop_mac":
        del meta["header_mac"]
    else:
        # Another file for the same device (fresh salt, so another file key): its MAC must not transfer.
        other = _lock(tmp_path / "..", weights, profile, KdfParams(**INSECURE_FAST), transform)
        meta["header_mac"] = read(other)[0]["header_mac"]
    write(path, meta, header, data)
    with pytest.raises(InvalidTag):
        chiplock.unlock(path, profile=profile, secret=SECRET)


@pytest.mark.parametrize("transform", ["aes", "shuffle"])
def test_wrong_device_is_invalid_key_not_invalid_tag(tmp_path, weights, profile, wrong_profile, fast_kdf,
                                                      transform):
    path = _lock(tmp_path, weights, profile, fast_kdf, transform)
    with pytest.raises(InvalidKey):
        chiplock.unlock(path, profile=wrong_profile, secret=SECRET)


def test_pre_aes_has_no_keyed_header_check(tmp_path, weights, profile, fast_kdf, container_io):
    read, _ = container_io
    path = _lock(tmp_path, weights, profile, fast_kdf, "pre-aes")
    meta = read(path)[0]
    assert meta.get("header_mac") is None and meta.get("key_check") is None
