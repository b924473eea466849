"""The parameter-transform interface (expert layer) and helpers shared by the transforms.

A transform turns one tensor into stored bytes plus public per-tensor parameters, given a 32-byte per-tensor
key, and back. Transforms work on the raw bits of a tensor (an unsigned-integer view of the same width), so
every dtype round-trips bit-exactly, NaN payloads and signed zeros included.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Re-exported: the dtype table and worker pool live in leaf modules so container/ and transforms/ share them
# without importing each other.
from chiplock._digest import TREE_CHUNK, leaf_digest
from chiplock._dtypes import (DTYPE_BY_NAME, DTYPE_NAMES, DTYPES, check_dtype, empty_raw,  # noqa: F401
                              raw_view)
from chiplock._pool import CHUNK_BYTES, parallel_for  # noqa: F401
from chiplock.registry import Registry


def aes_ctr_into(key: bytes, nonce: bytes, src: np.ndarray, dst: np.ndarray, byte_offset: int = 0) -> None:
    """XOR ``src`` with the AES-256-CTR keystream starting ``byte_offset`` bytes into the stream.

    ``nonce`` is the 16-byte initial counter block; ``byte_offset`` must be a multiple of 16 so a stream can be
    split into independent chunks (CTR is seekable). ``src`` and ``dst`` are uint8 arrays of equal size.
    """
    if byte_offset % 16:
        raise ValueError("byte_offset must be a multiple of the AES block size (16)")
    counter = (int.from_bytes(nonce, "big") + byte_offset // 16) % (1 << 128)
    enc = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    n = enc.update_into(memoryview(src).cast("B"), memoryview(dst).cast("B"))
    if n != src.nbytes:  # CTR is a stream mode: update_into writes every byte at once.
        raise RuntimeError("AES-CTR wrote a partial block")


def aes_ctr_parallel(key: bytes, nonce: bytes, src: np.ndarray, dst: np.ndarray,
                     leaves: list[bytes] | None = None) -> None:
    """:func:`aes_ctr_into` over whole uint8 arrays, split across the thread pool.

    With ``leaves``, each chunk of ``src`` is also hashed (its container leaf digest) just before it is
    decrypted, while it is in cache: integrity and decryption in one pass over the data.
    """
    if leaves is not None:
        leaves[:] = [b""] * (-(-src.nbytes // CHUNK_BYTES))

    def work(s: int, e: int) -> None:
        if leaves is not None:
            leaves[s // CHUNK_BYTES] = leaf_digest(src[s:e])
        aes_ctr_into(key, nonce, src[s:e], dst[s:e], byte_offset=s)

    parallel_for(src.nbytes, CHUNK_BYTES, work)


@dataclass
class Encoded:
    """One transformed tensor: the array to store (its dtype and shape are what safetensors shows) and the
    public per-tensor parameters that go into the container's metadata."""

    data: np.ndarray
    params: dict[str, Any]
    #: safetensors dtype name of ``data`` when it differs from the tensor's own dtype (pre-aes codes).
    stored_dtype: str | None = None
    #: The tensor's integrity root when the transform authenticates its own bytes (``aes``: the tree root of its
    #: GCM tags); ``None``: the container's tree digest of the stored bytes.
    digest: str | None = None


class Transform(abc.ABC):
    """A keyed, invertible transform of one tensor's parameters."""

    name: ClassVar[str]
    #: Whether a wrong key can be detected (a key-check value is stored). pre-aes: False, by design.
    detects_wrong_key: ClassVar[bool]
    #: Whether :meth:`decode` accepts ``leaves=`` and fills in the leaves of the tensor's integrity root (the
    #: stored bytes' leaf digests, or a transform's own authentication tags) as it verifies them.
    fused_digest: ClassVar[bool] = False

    def stored_dtype(self, dtype_name: str) -> str:
        """The safetensors dtype name the container stores a tensor of ``dtype_name`` as (default: the same).

        The container reader checks every stored entry against this, so it needs no knowledge of transforms.
        """
        return dtype_name

    def params_reserve(self, dtype_name: str, numel: int) -> int:
        """An upper bound on the length of this transform's public parameters as JSON for one tensor.

        The streaming container writer reserves this much header room per tensor before encoding it (a bound
        too small costs one extra pass over the file's data, never a wrong file).
        """
        return 256

    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        """Transform ``tensor`` with the 32-byte per-tensor ``key``."""

    @abc.abstractmethod
    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        """Invert :meth:`encode`. ``stored`` is a flat uint8 array of the stored bytes (may be read-only)."""


#: Name -> transform instance (see :mod:`chiplock.registry`; ``docs/extending.md`` adds one).
_TRANSFORMS: Registry[Transform] = Registry("transform")


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator registering a transform under ``cls.name``."""
    _TRANSFORMS.register(cls.name, cls())
    return cls


def get_transform(name: str) -> Transform:
    """The transform registered as ``name``; raises :class:`UnsupportedConfig` for unknown names."""
    return _TRANSFORMS.get(name)


def available_transforms() -> list[str]:
    """Names of every registered transform, sorted."""
    return _TRANSFORMS.names()
