"""The worker pool and chunk size shared by transforms, digests and the container (a leaf module).

Work is split into chunks of :data:`CHUNK_BYTES` so every core takes part and each chunk stays in cache; the
container's tree digest uses the same size (:data:`chiplock._digest.TREE_CHUNK`), which is what lets a transform
hash each chunk while it decodes it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

#: Work is split into chunks of this many bytes so both cores take part and the data stays cache-friendly.
CHUNK_BYTES = 4 << 20
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
