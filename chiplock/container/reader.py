"""Read a container: the bounded header parse and per-tensor access to the stored bytes (spec: spec.md).

Layout (identical to safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(padded with spaces), then the tensor bytes back to back in header order. The reader validates every field and
enforces the caps in ``spec.md`` before any work proportional to what a file claims. Stored bytes are mapped one
tensor at a time (:meth:`Container.stored`), so reading a model costs memory for the tensor in hand, not the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from chiplock import _json
from chiplock._dtypes import STORED_DTYPES
from chiplock._json import show as _show
from chiplock.container.schema import (FORMAT_NAME, HEADER_LIMITS, MAX_DIMS, MAX_ELEMENTS, MAX_HEADER, Metadata,
                                       fail, tensor_name_problem)
from chiplock.errors import ContainerError

_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class Entry:
    """One stored tensor as the safetensors header describes it (offsets relative to the data start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Container:
    """A validated container: its metadata and where each tensor's stored bytes lie. No key work done."""

    path: str
    meta: Metadata
    entries: list[Entry]
    data_start: int
    size: int

    @contextmanager
    def stored(self, entry: Entry) -> Iterator[np.ndarray]:
        """The stored bytes of ``entry`` as a read-only flat uint8 array, mapped only while the block runs.

        Each tensor gets its own mapping, unmapped at the end of the block, so the pages it touched leave this
        process's resident memory: unlocking a 100 GB file holds one tensor's stored bytes at a time.
        """
        n = entry.end - entry.begin
        if n == 0:
            yield np.zeros(0, np.uint8)
            return
        start = self.data_start + entry.begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), n + start - aligned, access=mmap.ACCESS_READ, offset=aligned)
        try:
            arr = np.frombuffer(mm, dtype=np.uint8, count=n, offset=start - aligned)
            try:
                yield arr
            finally:
                del arr
        finally:
            # Drop the touched pages from this process's resident memory even if a view outlives the block.
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass
            try:
                mm.close()
            except BufferError:
                # A caller kept a view of the bytes (a returned tensor that aliases them): leave the mapping to
                # the garbage collector rather than fail.
                pass


def read_header_bytes(path: str | os.PathLike) -> tuple[bytes, int]:
    """The raw header ``N`` bytes and the file size, with the length checks of spec.md."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise fail("the file is shorter than a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise fail("the header length is out of range (truncated or not a safetensors file)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise ContainerError(f"{os.fspath(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise ContainerError(f"{os.fspath(path)!r} is a folder, not a chiplock file") from None
    except OSError as exc:
        raise ContainerError(f"{os.fspath(path)!r} cannot be read ({exc.strerror or type(exc).__name__}); "
                             "check the path and its permissions") from None
    if len(raw) != n:
        raise fail("the file is truncated")
    return raw, size


def _parse(raw: bytes, what: str) -> Any:
    try:
        return _json.loads(raw, HEADER_LIMITS)
    except _json.JSONLimitError as exc:
        raise fail(f"{what} {exc}") from None


def open_container(path: str | os.PathLike) -> Container:
    """Parse and validate a container's header; map nothing yet.

    Every field is type-checked and every size capped before work proportional to what the file claims: the
    header is parsed with :mod:`chiplock._json`'s caps, shapes have at most :data:`MAX_DIMS` dims, every byte
    after the header belongs to exactly one tensor. KDF costs are checked where a licence is opened.

    Raises:
        ContainerError: The file is not an intact container of this version.
        InvalidTag: The header digest does not match (the header was altered).
        UnsupportedConfig: The file uses a transform this chiplock does not know.
    """
    raw, size = read_header_bytes(path)
    header = _parse(raw, "the header")
    n = len(raw)
    del raw
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(md, dict) and set(md) == {FORMAT_NAME} and isinstance(md[FORMAT_NAME], str)):
        raise fail("the header has no chiplock metadata")
    try:
        inner = md[FORMAT_NAME].encode("utf-8")
    except UnicodeEncodeError:
        raise fail("the chiplock metadata holds a lone surrogate (invalid Unicode)") from None
    meta_json = _parse(inner, "the chiplock metadata")
    del inner
    entries = tensor_entries(header)
    # Every byte after the header must belong to exactly one tensor, in order: no gaps, no overlap, no tail.
    offset = 0
    for e in entries:
        if e.begin != offset:
            raise fail(f"tensor entry {_show(e.name)} does not start where the previous one ends")
        if e.end - e.begin != math.prod(e.shape) * STORED_DTYPES[e.dtype]:
            raise fail(f"tensor entry {_show(e.name)} has a size that does not match its shape")
        offset = e.end
    if 8 + n + offset != size:
        raise fail("the file is truncated or has trailing bytes")
    meta = Metadata.from_json(meta_json, {e.name: {"dtype": e.dtype, "shape": list(e.shape)} for e in entries})
    return Container(os.fspath(path), meta, entries, 8 + n, size)


def tensor_entries(header: dict[str, Any]) -> list[Entry]:
    """The safetensors entries, validated one by one (cheap checks first), in data order."""
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = tensor_name_problem(name)
        if problem:
            raise fail(f"a tensor name {problem}")
        if not (isinstance(entry, dict) and set(entry) == _ENTRY_FIELDS and isinstance(entry["dtype"], str)
                and entry["dtype"] in STORED_DTYPES):
            raise fail(f"tensor entry {_show(name)} is malformed")
        shape, offsets = entry["shape"], entry["data_offsets"]
        # Dims are counted and bounded before they are multiplied: 60,000 dims of 2**47 would otherwise cost
        # seconds of big-integer arithmetic.
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(_json.is_int(d) and 0 <= d < MAX_ELEMENTS for d in shape)
                and math.prod(shape) < MAX_ELEMENTS):
            raise fail(f"tensor entry {_show(name)} has a malformed shape (at most {MAX_DIMS} dims, "
                       f"fewer than 2**48 elements)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_json.is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] < 1 << 63):
            raise fail(f"tensor entry {_show(name)} has malformed data_offsets")
        out.append(Entry(name, entry["dtype"], tuple(shape), offsets[0], offsets[1]))
    return sorted(out, key=lambda e: e.begin)
