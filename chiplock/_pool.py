"""The worker pool and chunk size shared by transforms, digests and the container (a leaf module).

Work is split into chunks of :data:`CHUNK_BYTES` so every core takes part and each chunk stays in cache; the
container's tree digest uses the same size (:data:`chiplock._digest.TREE_CHUNK`), which is what lets a transform
hash each chunk while it decodes it.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

#: Work is split into chunks of this many bytes so both cores take part and the data stays cache-friendly.
CHUNK_BYTES = 4 << 20
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
POOL = ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8)), thread_name_prefix="chiplock")


def parallel_for(n: int, chunk: int, fn: Callable[[int, int], None]) -> None:
    """Run ``fn(start, stop)`` over ``range(n)`` in chunks, on the shared thread pool.

    The work functions call into OpenSSL, numpy and torch kernels, which release the GIL, so chunks run on
    all cores. Exceptions propagate to the caller.
    """
    if n <= chunk:
        if n:
            fn(0, n)
        return
    futures = [POOL.submit(fn, s, min(s + chunk, n)) for s in range(0, n, chunk)]
    for f in futures:
        f.result()


_LOCAL = threading.local()


def scratch(nbytes: int) -> "np.ndarray":
    """A per-thread scratch byte array of at least ``nbytes`` (at least one chunk), reused by every chunk a
    thread of the pool encodes or decodes: no allocation (and no page faults) per chunk."""
    import numpy as np

    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _LOCAL.buf = np.empty(max(nbytes, CHUNK_BYTES), dtype=np.uint8)
    return buf[:nbytes]


def release_mapped(view: "np.ndarray") -> None:
    """Drop the pages of ``view`` from this process's resident memory when it is a read-only file mapping.

    Unlocking reads each stored byte once: without this, a tensor's touched stored pages stay resident until its
    mapping closes, so a pre-aes tensor (codes twice the tensor's size) would hold three times its size at once.
    The pages stay in the page cache, so reading them again costs a minor fault. Anything that is not a
    read-only ``mmap`` (a user's array in memory) is left alone: ``MADV_DONTNEED`` would zero anonymous memory.
    """
    from chiplock._dtypes import _MADVISE

    if _MADVISE is None or view.nbytes < _PAGE:
        return
    base = view
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is None or getattr(base, "closed", False):
        return
    start = view.ctypes.data
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + view.nbytes) // _PAGE * _PAGE
    if hi > lo:
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)
