"""The parameter-transform interface (expert layer) and helpers shared by the transforms.

A transform turns one tensor into stored bytes plus public per-tensor parameters, given a 32-byte per-tensor
key, and back. Transforms work on the raw bits of a tensor (an unsigned-integer view of the same width), so
every dtype round-trips bit-exactly, NaN payloads and signed zeros included.
"""

from __future__ import annotations

import abc
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chiplock.errors import UnsupportedConfig

#: Raw-bit views: torch dtype -> (unsigned numpy view dtype, order-key kind).
#: kind "float" orders by sign-magnitude, "int" by two's complement, "uint" as is.
DTYPES: dict[torch.dtype, tuple[type, str]] = {
    torch.float32: (np.uint32, "float"),
    torch.float16: (np.uint16, "float"),
    torch.bfloat16: (np.uint16, "float"),
    torch.float64: (np.uint64, "float"),
    torch.int8: (np.uint8, "int"),
    torch.int16: (np.uint16, "int"),
    torch.int32: (np.uint32, "int"),
    torch.int64: (np.uint64, "int"),
    torch.uint8: (np.uint8, "uint"),
    torch.bool: (np.uint8, "uint"),
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = (np.uint8, "float")

#: Names used in the container for each supported dtype (safetensors' spelling).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_NAMES[torch.float8_e4m3fn] = "F8_E4M3"
    DTYPE_NAMES[torch.float8_e5m2] = "F8_E5M2"
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

#: Work is split into chunks of this many bytes so both cores take part and the data stays cache-friendly.
CHUNK_BYTES = 4 << 20
_POOL = ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8)), thread_name_prefix="chiplock")


def check_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedConfig` for dtypes no transform handles."""
    if dtype not in DTYPES:
        raise UnsupportedConfig(f"tensors of dtype {dtype} are not supported; convert them to one of "
                                f"{', '.join(sorted(DTYPE_NAMES.values()))} before locking")


def raw_view(t: torch.Tensor) -> np.ndarray:
    """Flat unsigned-integer numpy view of ``t``'s bits (a copy only if ``t`` is not contiguous)."""
    check_dtype(t.dtype)
    if t.numel() == 0:
        return np.zeros(0, dtype=DTYPES[t.dtype][0])
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().view(DTYPES[t.dtype][0])


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _libc_madvise() if sys.platform.startswith("linux") else None
_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


def empty_raw(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor and a writable flat unsigned view of its memory.

    Large outputs ask the kernel for transparent huge pages first: unlocking writes every byte of fresh memory
    once, and with 4 KiB pages the page faults cost more than the decryption (measured: filling 1 GiB of fresh
    memory took 1.19 s with 4 KiB pages, 0.47 s with huge pages, on the reference machine).
    """
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and nbytes >= 2 * _HUGE:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        end = (out.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: failure just means small pages
    return out, out.reshape(-1).view(torch.uint8).numpy().view(DTYPES[dtype][0])


def parallel_for(n: int, chunk: int, fn: Callable[[int, int], None]) -> None:
    """Run ``fn(start, stop)`` over ``range(n)`` in chunks, on the shared thread pool.

    The work functions call into OpenSSL, numpy and torch kernels, which release the GIL, so chunks run on
    all cores. Exceptions propagate to the caller.
    """
    if n <= chunk:
        if n:
            fn(0, n)
        return
    futures = [_POOL.submit(fn, s, min(s + chunk, n)) for s in range(0, n, chunk)]
    for f in futures:
        f.result()


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
    from chiplock.container.format import TREE_CHUNK, leaf_digest

    if leaves is not None:
        if CHUNK_BYTES != TREE_CHUNK:
            raise RuntimeError("fused digests need AES chunks equal to the container's tree chunks")
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


class Transform(abc.ABC):
    """A keyed, invertible transform of one tensor's parameters."""

    name: ClassVar[str]
    #: Whether a wrong key can be detected (a key-check value is stored). pre-aes: False, by design.
    detects_wrong_key: ClassVar[bool]
    #: Whether :meth:`decode` accepts ``leaves=`` and fills in the stored bytes' leaf digests as it reads them.
    fused_digest: ClassVar[bool] = False

    def stored_dtype(self, dtype_name: str) -> str:
        """The safetensors dtype name the container stores a tensor of ``dtype_name`` as (default: the same).

        The container reader checks every stored entry against this, so it needs no knowledge of transforms.
        """
        return dtype_name

    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        """Transform ``tensor`` with the 32-byte per-tensor ``key``."""

    @abc.abstractmethod
    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        """Invert :meth:`encode`. ``stored`` is a flat uint8 array of the stored bytes (may be read-only)."""


_TRANSFORMS: dict[str, Transform] = {}


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator registering a transform under ``cls.name``."""
    _TRANSFORMS[cls.name] = cls()
    return cls


def get_transform(name: str) -> Transform:
    """The transform registered as ``name``; raises :class:`UnsupportedConfig` for unknown names."""
    try:
        return _TRANSFORMS[name]
    except KeyError:
        raise UnsupportedConfig(f"unknown transform {name!r}; choose one of "
                                f"{', '.join(sorted(_TRANSFORMS))}") from None


def available_transforms() -> list[str]:
    return sorted(_TRANSFORMS)
