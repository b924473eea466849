"""Plain safetensors files, read and written one tensor at a time (the model files chiplock locks and unlocks).

``safetensors.torch.load_file`` returns every tensor at once and ``save`` builds the whole file in memory; locking
a 14 GB checkpoint must hold one tensor at a time, so the header is parsed here (with the container's caps) and
each tensor is read into fresh memory with ``pread``, and written the same way.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
import torch

from chiplock import _json
from chiplock._dtypes import DTYPE_BY_NAME, DTYPE_NAMES, STORED_DTYPES, raw_view
from chiplock._json import show as _show
from chiplock.container.reader import Entry, read_header_bytes, tensor_entries
from chiplock.container.schema import HEADER_LIMITS
from chiplock.errors import ContainerError, UnsupportedConfig

_READ_CHUNK = 64 << 20


@dataclass
class PlainFile:
    """A validated plain safetensors file: its entries in data order and where the data starts."""

    path: str
    entries: list[Entry]
    data_start: int
    metadata: dict[str, str] | None

    def tensor(self, entry: Entry) -> torch.Tensor:
        """Read one tensor into fresh memory (nothing else of the file stays resident)."""
        dtype = DTYPE_BY_NAME.get(entry.dtype)
        if dtype is None:
            raise UnsupportedConfig(f"tensor {entry.name!r} has dtype {entry.dtype}, which chiplock cannot lock; "
                                    f"convert it to one of {', '.join(sorted(DTYPE_BY_NAME))}")
        out = torch.empty(entry.shape, dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else np.zeros(0, np.uint8)
        with open(self.path, "rb") as fh:
            fd, done, n = fh.fileno(), 0, entry.end - entry.begin
            while done < n:
                got = os.preadv(fd, [memoryview(buf)[done:done + _READ_CHUNK]], self.data_start + entry.begin + done)
                if got <= 0:
                    raise ContainerError(f"{self.path!r} is truncated; re-download or re-export it")
                done += got
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for e in self.entries:
            yield e.name, self.tensor(e)


def read_plain(path: str | os.PathLike) -> PlainFile:
    """Parse and check a plain safetensors file's header (same caps as the container's).

    Raises:
        ContainerError: Not a safetensors file, truncated, or with overlapping or missing bytes.
    """
    try:
        raw, size = read_header_bytes(path)
    except ContainerError as exc:
        if not os.path.isfile(path):
            raise
        raise ContainerError(f"{os.fspath(path)!r} is not a valid safetensors weights file "
                             f"({str(exc).split(';')[0]}); re-export the model with safetensors") from None
    try:
        header = _json.loads(raw, HEADER_LIMITS)
    except _json.JSONLimitError as exc:
        raise ContainerError(f"{os.fspath(path)!r} is not a safetensors file (its header {exc})") from None
    if not isinstance(header, dict):
        raise ContainerError(f"{os.fspath(path)!r} is not a safetensors file")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ContainerError(f"{os.fspath(path)!r} has a malformed __metadata__; re-export it")
    try:
        entries = tensor_entries(header)
    except ContainerError as exc:
        raise ContainerError(f"{os.fspath(path)!r} is not a valid safetensors file: "
                             f"{str(exc).split(';')[0]}") from None
    offset = 0
    for e in entries:
        if e.begin != offset or e.end - e.begin != math.prod(e.shape) * STORED_DTYPES[e.dtype]:
            raise ContainerError(f"{os.fspath(path)!r} is not a valid safetensors file (tensor {e.name!r} has "
                                 "inconsistent offsets); re-export it")
        offset = e.end
    start = 8 + len(raw)
    if start + offset != size:
        raise ContainerError(f"{os.fspath(path)!r} is truncated or has trailing bytes; re-export it")
    return PlainFile(os.fspath(path), entries, start, meta)


def _short(x: object) -> str:
    return _show(x, 120)


def write_safetensors(fh: IO[bytes], entries: Iterable[tuple[str, str | torch.dtype, Iterable[int]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], *,
                      metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into a safetensors file whose header is known up front; return the file's size.

    The header (names, dtypes, shapes) is written first, then each tensor at its offset as it arrives, in any
    order, so only one tensor is in memory at a time.

    Args:
        fh: A seekable binary file, empty, positioned at 0.
        entries: ``[(name, dtype, shape), ...]`` in file order; dtype a name of
            :data:`chiplock._dtypes.STORED_DTYPES` (``"F32"``) or a ``torch.dtype``.
        tensors: ``(name, tensor)`` pairs; each entry exactly once, with that dtype and shape.
        metadata: safetensors ``__metadata__`` (str -> str); default ``{"format": "pt"}`` (what transformers
            expects).

    Returns:
        The size of the file in bytes.

    Raises:
        UnsupportedConfig: An entry's dtype cannot be stored in safetensors.
        ContainerError: A tensor is not in ``entries``, comes twice, has another dtype or shape, or one is
            missing (the locked model is damaged).

    Example:
        >>> with open("w.safetensors", "wb") as fh:  # doctest: +SKIP
        ...     write_safetensors(fh, [("w", "F32", (2,))], [("w", torch.zeros(2))])
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    offset = 0
    for name, dtype, shape in entries:
        dname = DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else dtype
        if dname not in STORED_DTYPES:
            raise UnsupportedConfig(f"tensor {_short(name)} has dtype {_short(dtype)}, which safetensors cannot "
                                    "store here; upgrade chiplock")
        if name in layout:
            raise ContainerError(f"tensor {_short(name)} is listed twice; the locked model is damaged: obtain a "
                                 "fresh copy")
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape) * STORED_DTYPES[dname]
        header[name] = {"dtype": dname, "shape": list(shape), "data_offsets": [offset, offset + n]}
        layout[name] = (dname, shape, offset, n)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    fh.write(struct.pack("<Q", len(raw)) + raw)
    fh.truncate(base + offset)
    seen: set[str] = set()
    for name, t in tensors:
        if name not in layout or name in seen:
            why = "twice" if name in seen else "but the header or index does not list it"
            raise ContainerError(f"tensor {_short(name)} came {why}; the locked model is damaged: obtain a fresh "
                                 "copy")
        dname, shape, start, n = layout[name]
        if DTYPE_NAMES.get(t.dtype) != dname or tuple(t.shape) != shape:
            raise ContainerError(f"tensor {_short(name)} has dtype {t.dtype} and shape {tuple(t.shape)}, not "
                                 f"{dname} {list(shape)} as its header says; the locked model is damaged")
        fh.seek(base + start)
        fh.write(memoryview(raw_view(t)).cast("B"))
        seen.add(name)
        del t
    missing = [n for n in layout if n not in seen]
    if missing:
        raise ContainerError(f"tensor(s) {', '.join(map(_short, missing[:3]))} never came out of the container; "
                             "the locked model is damaged: obtain a fresh copy")
    return base + offset
