"""Tree digests of stored bytes (a leaf module shared by the container and the transforms).

A tensor's digest is BLAKE3 over the BLAKE3 of each :data:`TREE_CHUNK`-sized piece of its stored bytes, so the
pieces hash on every core, and a transform that reads the stored bytes chunk by chunk can hash each piece while
it is in cache (``aes`` does).
"""

from __future__ import annotations

import numpy as np
from blake3 import blake3

from chiplock._pool import CHUNK_BYTES, POOL, release_mapped

TREE_CHUNK = CHUNK_BYTES


def leaf_digest(chunk: np.ndarray) -> bytes:
    """Digest of one ``TREE_CHUNK``-sized piece of a tensor's stored bytes (the last piece may be shorter)."""
    return blake3(chunk).digest()


def tree_root(leaves: list[bytes]) -> str:
    """Combine the leaf digests of a tensor, in order, into its tree digest."""
    h = blake3(b"chiplock/tree/v1")
    for leaf in leaves:
        h.update(leaf)
    return h.hexdigest()


def tree_digest(data: np.ndarray) -> str:
    """BLAKE3 over the BLAKE3 of each 4 MiB chunk, so chunks hash on every core.

    BLAKE3 rather than SHA-256: on the reference machine it hashes at 2.2 GB/s per core against SHA-256's 1.0,
    and integrity checking reads every stored byte on each unlock.
    """
    flat = data.reshape(-1).view(np.uint8)

    def leaf(s: int) -> bytes:
        out = leaf_digest(flat[s:s + TREE_CHUNK])
        release_mapped(flat[s:s + TREE_CHUNK])  # A mapped file's pages leave resident memory once hashed.
        return out

    return tree_root(list(POOL.map(leaf, range(0, flat.nbytes, TREE_CHUNK))))


def copy_and_digest(data: np.ndarray) -> tuple[np.ndarray, str]:
    """A private copy of ``data``'s bytes and its tree digest, hashed from the copy in one read of ``data``.

    Decoding the copy means the bytes that were verified are the bytes that are decoded, even if the file under a
    mapping changes meanwhile (a check-then-use race); the mapped pages leave resident memory as they are copied.
    """
    flat = data.reshape(-1).view(np.uint8)
    out = np.empty(flat.nbytes, dtype=np.uint8)

    def leaf(s: int) -> bytes:
        e = min(s + TREE_CHUNK, flat.nbytes)
        np.copyto(out[s:e], flat[s:e])
        release_mapped(flat[s:e])
        return leaf_digest(out[s:e])

    return out, tree_root(list(POOL.map(leaf, range(0, flat.nbytes, TREE_CHUNK))))
