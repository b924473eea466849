"""``aes``: AES-256-GCM over each tensor's raw bytes, in 4 MiB chunks, each with its own tag.

The stored bytes are the tensor's bytes XOR an AES keystream: without the key they are indistinguishable from
random bytes. Each 4 MiB chunk is encrypted with AES-256-GCM under the tensor's key, with the nonce
``prefix || chunk index`` (an 8-byte random prefix per tensor), so chunks decrypt on every core and each one is
authenticated in the same pass: the tags, not a separate hash of the stored bytes, give integrity (measured on
the reference machine: GCM 3.3 GB/s per core against 1.2 GB/s for AES-CTR followed by BLAKE3). The tensor's
``digest`` is the tree root of its tags. A wrong key fails the first tag, so this transform detects a wrong key
(its licence wrap is authenticated too).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

import numpy as np
import torch
from cryptography.exceptions import InvalidTag as _CryptoInvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chiplock._digest import tree_root
from chiplock._pool import release_mapped, scratch
from chiplock.errors import InvalidTag
from chiplock.transforms.base import (CHUNK_BYTES, Encoded, Transform, aes_ctr_into, empty_raw, parallel_for,
                                      raw_view, register_transform)

_TAG = 16
_PREFIX = 8


def _nonce(prefix: bytes, i: int) -> bytes:
    return prefix + struct.pack(">I", i)


def _chunks(nbytes: int) -> int:
    return -(-nbytes // CHUNK_BYTES)


@register_transform
class AesTransform(Transform):
    name = "aes"
    detects_wrong_key = True
    fused_digest = True

    def params_reserve(self, dtype_name: str, numel: int) -> int:
        from chiplock._dtypes import STORED_DTYPES

        return 2 * _TAG * max(1, _chunks(numel * STORED_DTYPES[dtype_name])) + 100

    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        typed = raw_view(tensor)
        stored = np.empty_like(typed)
        src, out = typed.view(np.uint8), stored.view(np.uint8)
        prefix = os.urandom(_PREFIX)
        tags = [b""] * _chunks(src.nbytes)

        def work(s: int, e: int) -> None:
            enc = Cipher(algorithms.AES(key), modes.GCM(_nonce(prefix, s // CHUNK_BYTES))).encryptor()
            enc.update_into(memoryview(src[s:e]), memoryview(out[s:e]))
            enc.finalize()
            tags[s // CHUNK_BYTES] = enc.tag

        parallel_for(src.nbytes, CHUNK_BYTES, work)
        return Encoded(stored, {"nonce": prefix.hex(), "tags": b"".join(tags).hex()}, digest=tree_root(tags))

    def encode_to(self, tensor: torch.Tensor, key: bytes, sink: Callable[[int, np.ndarray], None]) -> Encoded:
        """:meth:`encode` chunk by chunk into ``sink(byte_offset, chunk)``: the ciphertext is never in memory
        whole (locking holds the tensor plus one 4 MiB buffer per core)."""
        src = raw_view(tensor).view(np.uint8)
        prefix = os.urandom(_PREFIX)
        tags = [b""] * _chunks(src.nbytes)

        def work(s: int, e: int) -> None:
            buf = scratch(e - s)
            enc = Cipher(algorithms.AES(key), modes.GCM(_nonce(prefix, s // CHUNK_BYTES))).encryptor()
            enc.update_into(memoryview(src[s:e]), memoryview(buf))
            enc.finalize()
            tags[s // CHUNK_BYTES] = enc.tag
            sink(s, buf)

        parallel_for(src.nbytes, CHUNK_BYTES, work)
        return Encoded(None, {"nonce": prefix.hex(), "tags": b"".join(tags).hex()}, digest=tree_root(tags))

    def _parse(self, stored: np.ndarray, params: dict[str, Any]) -> tuple[bytes, list[bytes]]:
        prefix, tags = bytes.fromhex(params["nonce"]), bytes.fromhex(params["tags"])
        if len(prefix) != _PREFIX or len(tags) != _TAG * _chunks(stored.nbytes):
            raise ValueError("aes parameters do not match the stored bytes")
        return prefix, [tags[i:i + _TAG] for i in range(0, len(tags), _TAG)]

    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...], *, leaves: list[bytes] | None = None) -> torch.Tensor:
        out, raw = empty_raw(dtype, shape)
        dst = raw.view(np.uint8)
        prefix, tags = self._parse(stored, params)
        if dst.nbytes != stored.nbytes:
            raise ValueError("aes stored bytes do not match the tensor's size")

        def work(s: int, e: int) -> None:
            i = s // CHUNK_BYTES
            dec = Cipher(algorithms.AES(key), modes.GCM(_nonce(prefix, i), tags[i])).decryptor()
            dec.update_into(memoryview(stored[s:e]), memoryview(dst[s:e]))
            try:
                dec.finalize()
            except _CryptoInvalidTag:
                raise InvalidTag() from None
            release_mapped(stored[s:e])

        parallel_for(stored.nbytes, CHUNK_BYTES, work)
        if leaves is not None:
            leaves[:] = tags
        return out

    def decode_unverified(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
                          shape: tuple[int, ...]) -> torch.Tensor:
        """What a holder of ``key`` gets ignoring the tags (GCM is CTR from counter 2): for attack reports only."""
        out, raw = empty_raw(dtype, shape)
        dst = raw.view(np.uint8)
        prefix, _ = self._parse(stored, params)

        def work(s: int, e: int) -> None:
            aes_ctr_into(key, _nonce(prefix, s // CHUNK_BYTES) + b"\0\0\0\2", stored[s:e], dst[s:e])

        parallel_for(stored.nbytes, CHUNK_BYTES, work)
        return out
