"""The attacker's view of one pre-aes-locked tensor: stored bytes, public parameters and the public format.

An attacker holds the locked file and knows the format (docs/FORMAT.md), so it can decrypt codes under a
guessed key, decode them with the public codec and re-encode values the way a deterministic encoder would.
:class:`PreAesTensor` is the one place in :mod:`chiplock.attacks` that knows how the ``pre-aes`` transform
lays out its codes; everything else uses the :class:`LockedTensor` interface, so a test can point the same
attacks at a deliberately weak encoder of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch


class LockedTensor(Protocol):
    """What the attacks need from one locked tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def decode(self, key: bytes) -> torch.Tensor:
        """The whole tensor as decoded under ``key`` (right key: the original bits)."""

    def codes(self, key: bytes, start: int, count: int) -> np.ndarray:
        """Codes ``start .. start + count`` decrypted under ``key`` (uint64); ``start`` a multiple of 16."""

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Values (float64) that the public codec decodes ``codes`` to."""

    def canonical_codes(self, values: np.ndarray) -> np.ndarray:
        """The codes (uint64) a deterministic encoder writes for ``values`` (as returned by decode_codes)."""

    def code_ranks(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each code's rank among all the codes that decode to the same value, and how many such codes there are
        (float64 arrays, ``0 <= rank < total``)."""

    def breakpoints(self) -> np.ndarray:
        """The public model's breakpoint positions (float64, sorted): the knots of its CDF."""

    def breakpoint_values(self) -> np.ndarray:
        """The breakpoints as values of the tensor's dtype (float64, sorted, unique): what oracle 2 compares
        decoded values with. Rounding to the dtype is the stronger attack where positions lie between values."""

    def grid(self) -> np.ndarray:
        """The public model's cumulative probability at each breakpoint (same length as breakpoints())."""


def stored_bytes(data: np.ndarray) -> np.ndarray:
    """The flat uint8 view of an ``Encoded.data`` array, as a file stores it."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


@dataclass
class PreAesTensor:
    """One tensor locked with the ``pre-aes`` transform (see :func:`lock_pre_aes`).

    Args:
        stored: the stored bytes (uint8, flat).
        params: the tensor's public parameters.
        dtype: the tensor's dtype.
        shape: the tensor's shape.

    Example:
        >>> import os, torch
        >>> t = lock_pre_aes(torch.randn(4000), key := os.urandom(32))
        >>> bool((t.decode(key) == t.decode(key)).all())
        True
    """

    stored: np.ndarray
    params: dict[str, Any]
    dtype: torch.dtype
    shape: tuple[int, ...]

    def decode(self, key: bytes) -> torch.Tensor:
        from chiplock.transforms import get_transform

        return get_transform("pre-aes").decode(self.stored, self.params, key, self.dtype, self.shape)

    # Everything below reads the format's internals (the attacker knows the format); keep it in this block.
    # pre-aes v2 params carry "escape" and the codec exposes preimage(); v1 carried "nonfinite" and encode().
    @cached_property
    def _codec(self) -> Any:
        from chiplock.transforms.base import DTYPES
        from chiplock.transforms.pre_aes import _Codec

        breaks = np.frombuffer(bytes.fromhex(self.params["breaks"]), dtype=DTYPES[self.dtype][0])
        if "escape" in self.params:
            return _Codec(self.dtype, breaks, *self.params["escape"])
        return _Codec(self.dtype, breaks, bool(self.params["nonfinite"]))

    def codes(self, key: bytes, start: int, count: int) -> np.ndarray:
        from chiplock.transforms.base import aes_ctr_into

        if start % 16 or start < 0 or count < 0:
            raise ValueError(f"codes(start={start}, count={count}): start must be a non-negative multiple of 16 "
                             "(an AES block boundary for every code width) and count non-negative")
        codec = self._codec
        size = np.dtype(codec.cdtype).itemsize
        src = self.stored[start * size:(start + count) * size]
        out = np.empty(src.size // size, dtype=codec.cdtype)
        aes_ctr_into(key, bytes.fromhex(self.params["nonce"]), src, out.view(np.uint8), start * size)
        return out.astype(np.uint64)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        from chiplock.transforms.pre_aes import from_order_key

        codec = self._codec
        bits = from_order_key(codec.decode(codes.astype(codec.cdtype)).astype(codec.udtype), codec.kind, codec.w)
        return _bits_to_float(bits, self.dtype)

    def canonical_codes(self, values: np.ndarray) -> np.ndarray:
        """v1: the encoder's own code (``floor(t · n_codes)`` in the interval); v2, whose encoder draws a random
        code from each value's preimage: the deterministic choice, the preimage's lowest code (the escape code
        when the main region has none)."""
        from chiplock.transforms.pre_aes import order_key

        codec = self._codec
        u = order_key(_float_to_bits(values, self.dtype), codec.kind, codec.w).astype(np.uint64)
        if codec.raw:
            return u
        if not hasattr(codec, "preimage"):
            return codec.encode(u).astype(np.uint64)
        lo, count = codec.preimage(u)
        return np.where(count > 0, lo, codec.escape_code(u)[1]).astype(np.uint64)

    def code_ranks(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """v2 only: a value's codes are its main-region preimage ``[lo, lo + count)`` plus, where it has one, its
        escape code, ranked last (the order v2's encoder draws from)."""
        codec = self._codec
        if not hasattr(codec, "preimage"):
            raise NotImplementedError("code ranks need pre-aes v2's preimage search")
        codes = codes.astype(np.uint64)
        u = codec.decode(codes.astype(codec.cdtype)).astype(np.uint64)
        lo, count = codec.preimage(u)
        has, esc = codec.escape_code(u)
        main = (codes >= lo) & (codes - lo < count)
        rank = np.where(main, codes - lo, count)
        return rank.astype(np.float64), count.astype(np.float64) + has

    def breakpoints(self) -> np.ndarray:
        # v2 stores 8- and 16-bit dtypes' breakpoints as float32 positions; model_values reads every layout.
        from chiplock.transforms.pre_aes import model_values

        return np.sort(model_values(self.params, self.dtype))

    def breakpoint_values(self) -> np.ndarray:
        b = self.breakpoints()
        if self.dtype.is_floating_point:
            b = torch.from_numpy(b).to(self.dtype).double().numpy()
        else:
            b = np.rint(b)
        return np.unique(b)

    def grid(self) -> np.ndarray:
        from chiplock.transforms.pre_aes import probability_grid

        return probability_grid(len(self.breakpoints()) - 1)


def lock_pre_aes(tensor: torch.Tensor, key: bytes) -> PreAesTensor:
    """Lock ``tensor`` under ``key`` with the public ``pre-aes`` transform (fresh randomness every call).

    Args:
        tensor: the tensor to lock.
        key: a 32-byte key.

    Returns:
        A :class:`PreAesTensor`: what a file would hold for this tensor.
    """
    from chiplock.transforms import get_transform

    enc = get_transform("pre-aes").encode(tensor, key)
    return PreAesTensor(stored_bytes(enc.data), enc.params, tensor.dtype, tuple(tensor.shape))


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_to_float(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values of raw element bits (exact for every dtype up to 32 bits)."""
    t = torch.from_numpy(np.array(bits, copy=True)).view(_INT_VIEW[bits.dtype.itemsize]).view(dtype)
    return t.double().numpy()


def _float_to_bits(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Inverse of :func:`_bits_to_float` for values that are exactly representable in ``dtype``."""
    from chiplock.transforms.base import raw_view

    return raw_view(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(dtype)).copy()
