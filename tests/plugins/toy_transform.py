"""A toy transform plug-in, the whole of it (docs/extending.md): keyed sign flips.

Each element's sign bit is XORed with one bit of an AES-256-CTR keystream (from ``cryptography``) under the
per-tensor key, so about half the values are negated. It hides nothing about magnitudes: a toy, not a lock.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chiplock.transforms import Encoded, Transform, register_transform
from chiplock.transforms.base import empty_raw, raw_view


def _sign_mask(key: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    # One keystream byte per element; the per-tensor key is unique, so a fixed counter block is safe.
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(n))
    top = np.array(1, dtype=dtype) << np.array(8 * dtype.itemsize - 1, dtype=dtype)
    return (np.frombuffer(stream, np.uint8) & 1).astype(dtype) * top


@register_transform  # the one registration line
class ToySignFlip(Transform):
    name = "toy"
    detects_wrong_key = False  # A wrong key gives plausible weights with wrong signs.

    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        raw = raw_view(tensor)
        return Encoded(raw ^ _sign_mask(key, raw.size, raw.dtype), {})

    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        out, raw = empty_raw(dtype, shape)
        raw[:] = stored.view(raw.dtype) ^ _sign_mask(key, raw.size, raw.dtype)
        return out
