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
from typing import IO, Iterable, Iterator

import numpy as np
import torch

from chiplock import _json
from chiplock._dtypes import DTYPE_BY_NAME, DTYPE_NAMES, STORED_DTYPES
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


def write_plain(fh: IO[bytes], entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file to ``fh`` from ``entries`` known up front and ``tensors`` arriving one by one
    (in the same order, with the same dtypes and shapes).

    Raises:
        ContainerError: A tensor does not match its entry (the source changed while being read).
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * STORED_DTYPES[DTYPE_NAMES[dtype]]
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)) + raw)
    it = iter(tensors)
    for name, dtype, shape in entries:
        got = next(it, None)
        if got is None or got[0] != name or got[1].dtype != dtype or tuple(got[1].shape) != tuple(shape):
            raise ContainerError(f"tensor {name!r} did not arrive as announced; nothing was written")
        t = got[1].detach().cpu().contiguous()
        if t.numel():
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        del t, got
