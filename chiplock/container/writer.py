"""Write a container tensor by tensor, holding one tensor at a time (spec: spec.md).

The safetensors layout puts the header first, but part of the metadata (each tensor's public parameters and
digest, the group MACs, the signature) is known only once the tensors are encoded. Every stored entry's dtype,
shape and byte range is known up front, so the writer reserves room for the header (each transform bounds its
parameters' size: :meth:`Transform.params_reserve`), streams the tensors to their final offsets, then writes the
real header into the reserved room, padded with spaces. Should a header outgrow its room, the tensor bytes are
moved up in place, in bounded chunks; the output still gets its name only when complete (:mod:`chiplock._io`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace
from typing import IO, Any, Callable

import numpy as np

from chiplock import _json
from chiplock._digest import tree_digest
from chiplock._dtypes import STORED_DTYPES
from chiplock.container.schema import FORMAT_NAME, HEADER_LIMITS, MAX_HEADER, Group, Metadata, TensorInfo
from chiplock.errors import UnsupportedConfig

_MOVE_CHUNK = 16 << 20


@dataclass(frozen=True)
class Planned:
    """One tensor as it will be stored: name, group, original dtype and shape, stored dtype, parameter room."""

    name: str
    group: str
    dtype: str
    shape: tuple[int, ...]
    stored_dtype: str
    params_reserve: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORED_DTYPES[self.stored_dtype]


def build_header(meta: dict[str, Any], entries: list[tuple[str, str, tuple[int, ...], int]], *,
                 room: int = 0) -> bytes:
    """Header bytes (length prefix included) for ``entries`` = (name, stored dtype, shape, nbytes), padded with
    spaces to a multiple of 8 and to at least ``room`` bytes.

    Raises:
        UnsupportedConfig: The header would exceed the reader's caps (spec.md).
    """
    header: dict[str, Any] = {"__metadata__": {FORMAT_NAME: json.dumps(meta, sort_keys=True)}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * max(room - len(raw), -len(raw) % 8)
    raw += b" " * (-len(raw) % 8)
    # A header the reader would refuse must not be written: fail here, before the file gets its name.
    # Counting the outer bytes covers the metadata string too (its brackets and commas survive JSON escaping).
    if _json.size_problem(raw, HEADER_LIMITS):
        limits = HEADER_LIMITS
        raise UnsupportedConfig(f"the container header for these {len(entries)} tensors would exceed the reader's "
                                f"caps ({MAX_HEADER >> 20} MiB, {limits.max_containers} JSON objects and arrays, "
                                f"{limits.max_items} values); split the model into several files")
    return struct.pack("<Q", len(raw)) + raw


class ContainerWriter:
    """Streams the tensors of one container into ``fh`` (a fresh, seekable file from
    :func:`chiplock._io.atomic_writer`).

    Call :meth:`add` (or :meth:`sink` then :meth:`added`) once per planned tensor, in plan order, then
    :meth:`finish` with the finishing step (group MACs and signature need the complete metadata). Bytes go to
    their final offsets with positional writes, never through ``fh``'s buffer.
    """

    def __init__(self, fh: IO[bytes], meta: Metadata, plan: list[Planned], *,
                 signature_room: bool = False) -> None:
        self.fh, self.meta, self.plan = fh, meta, plan
        self._entries = [(p.name, p.stored_dtype, p.shape, p.nbytes) for p in plan]
        self._next = 0
        # The header with every value that is not known yet at its largest: parameters as a string of the
        # transform's bound, digests and MACs as hex of their final length.
        skeleton = replace(
            meta,
            groups={k: Group(g.transform, "0" * 64 if g.mac is not None else None) for k, g in meta.groups.items()},
            tensors={p.name: TensorInfo(p.group, p.dtype, p.shape, {"reserved": "x" * (p.params_reserve + 64)},
                                        "0" * 64) for p in plan},
            signature={"alg": "ed25519", "public_key": "0" * 64, "sig": "0" * 128} if signature_room else None)
        self._room = len(build_header(skeleton.to_json(), self._entries)) - 8
        self._data_start = 8 + self._room
        self._pos = self._data_start  # Where the next planned tensor's bytes go.
        fh.flush()

    def _planned(self, name: str) -> Planned:
        p = self.plan[self._next]
        if name != p.name:
            raise RuntimeError(f"tensor {name!r} does not match the plan (expected {p.name!r}); this is a bug: "
                               "report it")
        return p

    def sink(self, name: str) -> Callable[[int, np.ndarray], None]:
        """Where a transform that encodes chunk by chunk writes the next planned tensor's stored bytes:
        ``sink(byte_offset, chunk)``, from any thread, in any order (positional writes). Then call
        :meth:`added`. The encoded tensor never has to be in memory whole."""
        p = self._planned(name)
        fd, base = self.fh.fileno(), self._pos

        def write(offset: int, chunk: np.ndarray) -> None:
            mv = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            if offset < 0 or offset + mv.nbytes > p.nbytes:
                raise RuntimeError(f"a transform wrote outside tensor {name!r}; this is a bug: report it")
            pos = base + offset
            while mv.nbytes:
                n = os.pwrite(fd, mv, pos)
                mv, pos = mv[n:], pos + n

        return write

    def added(self, name: str, params: dict[str, Any], digest: str) -> None:
        """Record the public parameters and integrity root of the tensor written through :meth:`sink`."""
        p = self._planned(name)
        self.meta.tensors[name] = TensorInfo(p.group, p.dtype, p.shape, params, digest)
        self._pos += p.nbytes
        self._next += 1

    def add(self, name: str, data: np.ndarray, params: dict[str, Any], digest: str | None = None) -> None:
        """Write the next planned tensor's stored bytes and record its public parameters and digest (``digest``:
        the transform's own integrity root, else the tree digest of the stored bytes)."""
        p = self._planned(name)
        flat = data.reshape(-1).view(np.uint8)
        if flat.nbytes != p.nbytes:
            raise RuntimeError(f"tensor {name!r} does not match the plan ({flat.nbytes} bytes, expected "
                               f"{p.nbytes}); this is a bug in a transform: report it")
        self.sink(name)(0, flat)
        self.added(name, params, digest or tree_digest(flat))

    def finish(self, seal: Callable[[Metadata], None] | None = None) -> Metadata:
        """Write the real header into the reserved room (moving the data up if it outgrew it).

        ``seal(meta)`` may set group MACs and the signature on the complete metadata before it is written.
        """
        if self._next != len(self.plan):
            raise RuntimeError("not every planned tensor was written; this is a bug: report it")
        self.meta.tensors = {p.name: self.meta.tensors[p.name] for p in self.plan}
        if seal is not None:
            seal(self.meta)
        header = build_header(self.meta.to_json(), self._entries, room=self._room)
        fd = self.fh.fileno()
        if len(header) > self._data_start:
            _move_up(fd, self._data_start, sum(p.nbytes for p in self.plan), len(header) - self._data_start)
        os.pwrite(fd, header, 0)
        return self.meta


def _move_up(fd: int, start: int, length: int, delta: int) -> None:
    """Move ``length`` bytes at ``start`` up by ``delta`` bytes, last chunk first, never holding more than
    :data:`_MOVE_CHUNK` bytes (the rare header that outgrew its reserved room)."""
    pos = length
    while pos > 0:
        n = min(_MOVE_CHUNK, pos)
        pos -= n
        buf = os.pread(fd, n, start + pos)
        os.pwrite(fd, buf, start + pos + delta)
