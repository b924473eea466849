"""``aes``: AES-256-CTR over each tensor's raw bytes, with a random per-tensor nonce.

The stored bytes are the tensor's bytes XOR an AES keystream: without the key they are indistinguishable from
random bytes. With a wrong key they decrypt to random bits, which is why this transform stores a key-check value
and reports a wrong device (:class:`~chiplock.errors.InvalidKey`) instead of returning garbage.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from chiplock.transforms.base import (Encoded, Transform, aes_ctr_parallel, empty_raw, raw_view,
                                      register_transform)


@register_transform
class AesTransform(Transform):
    name = "aes"
    detects_wrong_key = True
    fused_digest = True

    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        src = raw_view(tensor)
        nonce = os.urandom(16)
        out = np.empty(src.shape, dtype=src.dtype)
        aes_ctr_parallel(key, nonce, src.view(np.uint8), out.view(np.uint8))
        return Encoded(out, {"nonce": nonce.hex()})

    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...], *, leaves: list[bytes] | None = None) -> torch.Tensor:
        out, raw = empty_raw(dtype, shape)
        aes_ctr_parallel(key, bytes.fromhex(params["nonce"]), stored, raw.view(np.uint8), leaves=leaves)
        return out
