"""shuffle: a keyed permutation of each tensor's elements from a 128-bit-keyed Philox generator."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chiplock.transforms import get_transform
from chiplock.transforms.shuffle import BLOCK, FULL_MAX

VECTORS = Path(__file__).parents[1] / "vectors"
shuffle = get_transform("shuffle")


@pytest.mark.parametrize("n", [0, 1, 2, 1000, FULL_MAX, FULL_MAX + 1, FULL_MAX + BLOCK + 17])
def test_stored_values_are_a_permutation_of_the_input(n):
    t = torch.arange(n, dtype=torch.int32)
    enc = shuffle.encode(t, os.urandom(32))
    stored = enc.data.view(np.int32)
    assert np.array_equal(np.sort(stored), t.numpy())
    if n >= 1000:
        assert (stored != t.numpy()).mean() > 0.99, "most elements should move"


def test_permutation_uses_all_128_key_bits():
    t = torch.arange(10_000, dtype=torch.int32)
    key = bytearray(os.urandom(32))
    base = shuffle.encode(t, bytes(key)).data
    for byte in (0, 7, 8, 15):  # both 64-bit words of the Philox key
        k2 = bytearray(key)
        k2[byte] ^= 0x01
        assert not np.array_equal(shuffle.encode(t, bytes(k2)).data, base), f"key byte {byte} is ignored"


def test_permutation_is_not_torch_randperm_with_a_64_bit_seed():
    t = torch.arange(1000, dtype=torch.int64)
    key = os.urandom(32)
    stored = shuffle.encode(t, key).data.view(np.int64)
    seed = int.from_bytes(key[:8], "little")
    for s in (seed, seed & (2**63 - 1), int.from_bytes(key[:8], "big") & (2**63 - 1)):
        assert not np.array_equal(stored, torch.randperm(1000, generator=torch.Generator().manual_seed(s)).numpy())


def test_wrong_key_permutes_differently(assert_bit_exact):
    t = torch.arange(FULL_MAX + 5000, dtype=torch.float32)
    k1, k2 = os.urandom(32), os.urandom(32)
    enc = shuffle.encode(t, k1)
    out = shuffle.decode(enc.data.reshape(-1).view(np.uint8), enc.params, k2, t.dtype, tuple(t.shape))
    assert (out != t).float().mean() > 0.99
    right = shuffle.decode(enc.data.reshape(-1).view(np.uint8), enc.params, k1, t.dtype, tuple(t.shape))
    assert_bit_exact(right, t)


def test_blocked_permutation_known_answer():
    vec = json.loads((VECTORS / "transforms.json").read_text())["shuffle_blocked"]
    big = torch.arange(vec["n"], dtype=torch.int32)
    enc = shuffle.encode(big, bytes.fromhex(json.loads((VECTORS / "transforms.json").read_text())["key"]))
    assert hashlib.sha256(enc.data.tobytes()).hexdigest() == vec["sha256"]


def test_known_answer_vectors(check_transform_vectors):
    check_transform_vectors("shuffle")
