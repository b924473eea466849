"""``shuffle``: a keyed permutation of each tensor's elements.

The permutation comes from numpy's Philox4x64 generator keyed with the full 128-bit key taken from the
per-tensor HKDF key (never ``torch.manual_seed``, whose seed has 64 bits).

* Tensors of up to ``FULL_MAX`` elements get a uniformly random permutation (Fisher-Yates).
* Larger tensors use a blocked permutation so unlocking stays a few passes over memory: the elements are cut
  into rows of ``BLOCK`` elements, each row is permuted inside itself with one of ``POOL`` random permutations
  (chosen per row from the key) and the rows are then permuted. The leftover tail gets its own uniform
  permutation. Every element can land anywhere; the family of permutations is smaller than all n! orders,
  which is documented in docs/FORMAT.md. Values themselves are not hidden: shuffling destroys the model, it
  does not encrypt the weights (use ``aes`` or ``pre-aes`` for that).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.transforms.base import Encoded, Transform, empty_raw, parallel_for, raw_view, register_transform

FULL_MAX = 1 << 16
BLOCK = 1 << 14
POOL = 4
_ROWS_PER_TASK = 256


class _Plan:
    """The permutation for ``n`` elements drawn from ``key``: stored[i] = x[perm(i)] in blocked form."""

    def __init__(self, key: bytes, n: int) -> None:
        words = np.frombuffer(key[:16], dtype="<u8").astype(np.uint64)
        rng = np.random.Generator(np.random.Philox(key=words))
        self.n = n
        if n <= FULL_MAX:
            self.rows, self.tail = 0, n
            self.tail_perm = rng.permutation(n)
            return
        self.rows = n // BLOCK
        self.tail = n - self.rows * BLOCK
        self.row_perm = rng.permutation(self.rows)
        self.pool = np.stack([rng.permutation(BLOCK) for _ in range(min(POOL, self.rows))])
        self.choice = rng.integers(0, len(self.pool), self.rows)
        self.tail_perm = rng.permutation(self.tail)

    def apply(self, src: np.ndarray, dst: np.ndarray) -> None:
        body = self.rows * BLOCK
        s2, d2 = src[:body].reshape(self.rows, BLOCK), dst[:body].reshape(self.rows, BLOCK)

        def rows(a: int, b: int) -> None:
            for i in range(a, b):
                np.take(s2[self.row_perm[i]], self.pool[self.choice[i]], out=d2[i])

        parallel_for(self.rows, _ROWS_PER_TASK, rows)
        np.take(src[body:], self.tail_perm, out=dst[body:])

    def invert(self, src: np.ndarray, dst: np.ndarray) -> None:
        body = self.rows * BLOCK
        s2, d2 = src[:body].reshape(self.rows, BLOCK), dst[:body].reshape(self.rows, BLOCK)

        def rows(a: int, b: int) -> None:
            for i in range(a, b):
                # Scatter through the forward permutation: no inverse permutation needs to be computed.
                d2[self.row_perm[i]][self.pool[self.choice[i]]] = s2[i]

        parallel_for(self.rows, _ROWS_PER_TASK, rows)
        dst[body:][self.tail_perm] = src[body:]


@register_transform
class ShuffleTransform(Transform):
    name = "shuffle"
    detects_wrong_key = True

    def encode(self, tensor: torch.Tensor, key: bytes) -> Encoded:
        src = raw_view(tensor)
        out = np.empty_like(src)
        _Plan(key, src.size).apply(src, out)
        return Encoded(out, {"block": BLOCK, "pool": POOL, "full_max": FULL_MAX})

    def decode(self, stored: np.ndarray, params: dict[str, Any], key: bytes, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        if params != {"block": BLOCK, "pool": POOL, "full_max": FULL_MAX}:
            raise UnsupportedConfig("this file was shuffled with parameters this chiplock does not know; "
                                    "upgrade chiplock")
        out, raw = empty_raw(dtype, shape)
        _Plan(key, raw.size).invert(stored.view(raw.dtype), raw)
        return out
