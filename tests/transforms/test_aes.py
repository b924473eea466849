"""aes: AES-256-CTR over each tensor's raw bytes. Checked against NIST SP 800-38A and an independent
AES-CTR, for byte uniformity of what is stored, and as the control for the indistinguishability test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chiplock.transforms import get_transform
from chiplock.transforms.base import aes_ctr_into, aes_ctr_parallel

aes = get_transform("aes")

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt.
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_CTR = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
NIST_CT = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
                        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6")


def test_aes_ctr_matches_nist_sp800_38a():
    src = np.frombuffer(NIST_PT, dtype=np.uint8)
    dst = np.empty_like(src)
    aes_ctr_into(NIST_KEY, NIST_CTR, src, dst)
    assert dst.tobytes() == NIST_CT


@pytest.mark.parametrize("offset", [16, 32, 48])
def test_aes_ctr_seeks_by_byte_offset(offset):
    src = np.frombuffer(NIST_PT[offset:], dtype=np.uint8)
    dst = np.empty_like(src)
    aes_ctr_into(NIST_KEY, NIST_CTR, src, dst, byte_offset=offset)
    assert dst.tobytes() == NIST_CT[offset:]


def test_aes_ctr_rejects_unaligned_offset():
    src = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="multiple of the AES block size"):
        aes_ctr_into(NIST_KEY, NIST_CTR, src, src.copy(), byte_offset=5)


def test_parallel_chunks_equal_one_pass_across_chunk_and_counter_wrap():
    from chiplock.transforms.base import CHUNK_BYTES

    n = 2 * CHUNK_BYTES + 37
    src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    nonce = (2**128 - 3).to_bytes(16, "big")  # the counter wraps inside the first chunk
    dst = np.empty_like(src)
    aes_ctr_parallel(NIST_KEY, nonce, src, dst)
    want = Cipher(algorithms.AES(NIST_KEY), modes.CTR(nonce)).encryptor().update(src.tobytes())
    assert dst.tobytes() == want


def test_stored_bytes_are_aes_gcm_of_the_raw_bits(fixed_nonce):
    # One chunk: the stored bytes and tag are AES-256-GCM of the raw bits with nonce prefix || chunk 0.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    t = torch.randn(3001, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    key = bytes(range(32))
    enc = aes.encode(t, key)
    prefix = bytes.fromhex(enc.params["nonce"])
    assert len(prefix) == 8
    plain = t.view(torch.uint8).numpy().tobytes()
    want = AESGCM(key).encrypt(prefix + bytes(4), plain, None)
    assert enc.data.dtype == np.uint16 and enc.data.tobytes() == want[:-16]
    assert bytes.fromhex(enc.params["tags"]) == want[-16:]


def test_each_chunk_has_its_own_tag_and_a_flipped_bit_fails(fixed_nonce):
    from chiplock.errors import InvalidTag
    from chiplock.transforms.base import CHUNK_BYTES

    t = torch.from_numpy(np.random.default_rng(3).standard_normal(CHUNK_BYTES // 4 * 2 + 5).astype(np.float32))
    key = bytes(range(32))
    enc = aes.encode(t, key)
    assert len(bytes.fromhex(enc.params["tags"])) == 3 * 16
    stored = enc.data.view(np.uint8).copy()
    assert torch.equal(aes.decode(stored, enc.params, key, t.dtype, tuple(t.shape)), t)
    stored[CHUNK_BYTES + 7] ^= 1
    with pytest.raises(InvalidTag):
        aes.decode(stored, enc.params, key, t.dtype, tuple(t.shape))
    with pytest.raises(InvalidTag):
        aes.decode(enc.data.view(np.uint8), enc.params, bytes(32), t.dtype, tuple(t.shape))


def test_stored_bytes_pass_byte_uniformity_and_plaintext_fails(fixed_nonce, byte_uniformity_p):
    t = torch.from_numpy(np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 0.05)
    enc = aes.encode(t, bytes(range(32)))
    p_stored = byte_uniformity_p(enc.data.view(np.uint8))
    assert p_stored > 1e-3, f"aes output bytes are not uniform (p = {p_stored:.2e})"
    assert byte_uniformity_p(t.view(torch.uint8).numpy()) < 1e-3, "control: plaintext bytes looked uniform"


def test_stored_bytes_uniform_even_for_constant_tensor(fixed_nonce, byte_uniformity_p):
    enc = aes.encode(torch.zeros(65_536, dtype=torch.int8), bytes(range(32)))
    assert byte_uniformity_p(enc.data.view(np.uint8)) > 1e-3


def test_known_answer_vectors(check_transform_vectors):
    check_transform_vectors("aes")
