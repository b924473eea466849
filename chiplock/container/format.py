"""The chiplock container: a safetensors file whose tensors are stored transformed (spec: docs/FORMAT.md).

Layout (identical to safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(padded with spaces to a multiple of 8), then the tensor bytes back to back in header order. The header maps
each tensor name to its stored ``dtype``, ``shape`` and ``data_offsets``; ``__metadata__`` holds one key,
``chiplock``, whose value is the JSON string of the chiplock metadata.

The reader validates every field and enforces the caps in ``chiplock/container/spec.md`` before any work
proportional to what a file claims.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from chiplock import _json
from chiplock._json import is_int as _is_int
from chiplock._json import show as _show
from chiplock._digest import TREE_CHUNK, leaf_digest, tree_digest, tree_root  # noqa: F401
from chiplock._dtypes import NUMPY_CODE_NAMES, STORED_DTYPES  # noqa: F401
from chiplock.errors import ContainerError, InvalidTag, UnsupportedConfig

FORMAT_NAME = "chiplock"
FORMAT_VERSION = 2
#: Caps the reader enforces (see spec.md): a header of 100 MiB holds a model of 100,000 tensors many times over.
MAX_HEADER = 100 << 20
MAX_ELEMENTS = 1 << 48
MAX_DIMS = 64
MAX_NAME_BYTES = 1024
MAX_SOURCES = 16
MAX_PARAMS = 32
MAX_PARAM_CHARS = 1 << 20
MAX_PARAM_LIST = 1 << 16
#: JSON caps for the header (and, counted in the same bytes, the metadata string inside it).
HEADER_LIMITS = _json.Limits(max_bytes=MAX_HEADER, max_depth=64, max_containers=2_000_000, max_items=3_000_000)

_HEX = re.compile(r"[0-9a-f]*")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "params", "digest"})
_REQUIRED_FIELDS = frozenset({"format", "version", "transform", "kdf", "sources", "secret", "key_check", "tensors",
                              "header_digest"})
_OPTIONAL_FIELDS = frozenset({"created_by", "header_mac", "signature"})

def canonical(meta: dict[str, Any]) -> bytes:
    """Canonical bytes of the metadata minus its self-checks (what the digest and the signature cover)."""
    body = {k: v for k, v in meta.items() if k not in ("header_digest", "header_mac", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def header_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(b"chiplock/header/v1" + canonical(meta)).hexdigest()


@dataclass
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # flat uint8 view into the mapped file (read-only)


def build_header(meta: dict[str, Any], entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Header bytes (length prefix included) for ``entries`` = (name, stored dtype, shape, nbytes)."""
    header: dict[str, Any] = {"__metadata__": {FORMAT_NAME: json.dumps(meta, sort_keys=True)}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # A header the reader would refuse must not be written: fail here, before the file gets its name.
    # Counting the outer bytes covers the metadata string too (its brackets and commas survive JSON escaping).
    limits = HEADER_LIMITS
    if _json.size_problem(raw, limits):
        raise UnsupportedConfig(f"the container header for these {len(entries)} tensors would exceed the reader's "
                                f"caps ({MAX_HEADER >> 20} MiB, {limits.max_containers} JSON objects and arrays, "
                                f"{limits.max_items} values); split the model into several files")
    return struct.pack("<Q", len(raw)) + raw


def _fail(why: str) -> ContainerError:
    return ContainerError(f"{why}; this is not an intact chiplock container (re-download it, or lock the model "
                          "again with `chiplock lock`)")


def tensor_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a tensor in a container, or ``None`` when it can.

    A name must be a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes, not ``__metadata__``
    (safetensors' reserved key), without NUL characters or lone surrogates (both break other readers).
    """
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if name == "__metadata__":
        return "is __metadata__, which safetensors reserves"
    if "\0" in name:
        return "contains a NUL character"
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "contains a lone surrogate (invalid Unicode)"
    if n > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def _is_hex(x: object, nbytes: int) -> bool:
    return isinstance(x, str) and len(x) == 2 * nbytes and _HEX.fullmatch(x) is not None


def _parse(raw: bytes, what: str) -> Any:
    try:
        return _json.loads(raw, HEADER_LIMITS)
    except _json.JSONLimitError as exc:
        raise _fail(f"{what} {exc}") from None


def read_header(path: str | os.PathLike, *, max_kdf_memory_kib: int | None = None,
                ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Parse and validate the header. Returns (chiplock metadata, raw safetensors header, data start).

    Every field is type-checked and every size capped before work proportional to what the file claims: the
    header is parsed with :mod:`chiplock._json`'s caps, shapes have at most :data:`MAX_DIMS` dims, and the KDF
    cost is checked against ``max_kdf_memory_kib`` (default :func:`chiplock.keys.kdf.max_memory_kib`).

    Raises:
        ContainerError: The file is not an intact container of this version.
        InvalidTag: The header digest does not match (the header was altered).
        UnsupportedConfig: The file uses a transform this chiplock does not know.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail("the file is shorter than a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise _fail("the header length is out of range (truncated or not a safetensors file)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise ContainerError(f"{os.fspath(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise ContainerError(f"{os.fspath(path)!r} is a folder, not a chiplock file") from None
    except OSError as exc:
        raise ContainerError(f"{os.fspath(path)!r} cannot be read ({exc.strerror or type(exc).__name__}); "
                             "check the path and its permissions") from None
    if len(raw) != n:
        raise _fail("the file is truncated")
    header = _parse(raw, "the header")
    del raw
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(md, dict) and set(md) == {FORMAT_NAME} and isinstance(md[FORMAT_NAME], str)):
        raise _fail("the header has no chiplock metadata")
    try:
        inner = md[FORMAT_NAME].encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("the chiplock metadata holds a lone surrogate (invalid Unicode)") from None
    meta = _parse(inner, "the chiplock metadata")
    del inner
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _fail("the header has no chiplock metadata")
    version = meta.get("version")
    if _is_int(version) and version == 1:
        raise ContainerError("this container (version 1) was written by an older chiplock whose pre-aes encoding "
                             "had a key oracle; it is no longer read: lock the model again with this chiplock")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise ContainerError(f"container version {_show(version)} is not supported by this chiplock "
                             f"(it reads version {FORMAT_VERSION}); upgrade chiplock or re-lock the model")
    if meta.get("header_digest") != header_digest(meta):
        raise InvalidTag() from None
    entries = _tensor_entries(header)
    # Every byte after the header must belong to exactly one tensor, in order: no gaps, no overlap, no tail.
    offset = 0
    for name, entry in entries:
        begin, end = entry["data_offsets"]
        if begin != offset:
            raise _fail(f"tensor entry {_show(name)} does not start where the previous one ends")
        if end - begin != math.prod(entry["shape"]) * STORED_DTYPES[entry["dtype"]]:
            raise _fail(f"tensor entry {_show(name)} has a size that does not match its shape")
        offset = end
    if 8 + n + offset != size:
        raise _fail("the file is truncated or has trailing bytes")
    _check_metadata(meta, dict(entries), max_kdf_memory_kib)
    return meta, header, 8 + n


def _tensor_entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The safetensors entries, validated one by one (cheap checks first), in data order."""
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    for name, entry in entries:
        problem = tensor_name_problem(name)
        if problem:
            raise _fail(f"a tensor name {problem}")
        if not (isinstance(entry, dict) and set(entry) == _ENTRY_FIELDS and isinstance(entry["dtype"], str)
                and entry["dtype"] in STORED_DTYPES):
            raise _fail(f"tensor entry {_show(name)} is malformed")
        shape, offsets = entry["shape"], entry["data_offsets"]
        # Dims are counted and bounded before they are multiplied: 60,000 dims of 2**47 would otherwise cost
        # seconds of big-integer arithmetic.
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(_is_int(d) and 0 <= d < MAX_ELEMENTS for d in shape)
                and math.prod(shape) < MAX_ELEMENTS):
            raise _fail(f"tensor entry {_show(name)} has a malformed shape (at most {MAX_DIMS} dims, "
                        f"fewer than 2**48 elements)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] < 1 << 63):
            raise _fail(f"tensor entry {_show(name)} has malformed data_offsets")
    return sorted(entries, key=lambda kv: kv[1]["data_offsets"][0])


def _check_metadata(meta: dict[str, Any], entries: dict[str, dict[str, Any]],
                    max_kdf_memory_kib: int | None = None) -> None:
    """Types and cross-checks of the chiplock metadata against the stored entries.

    The header digest only detects accidents: anyone can rewrite an unsigned file's metadata and recompute it,
    so nothing in the metadata is trusted before it is checked here.
    """
    from chiplock.keys.kdf import KdfParams
    from chiplock.transforms import available_transforms, get_transform

    missing, unknown = _REQUIRED_FIELDS - set(meta), set(meta) - _REQUIRED_FIELDS - _OPTIONAL_FIELDS
    if missing or unknown:
        what = (f"lacks {', '.join(sorted(missing))}" if missing
                else f"has unknown field(s) {_show(sorted(unknown), 80)}")
        raise _fail(f"the chiplock metadata {what}")
    name = meta["transform"]
    if not isinstance(name, str) or len(name) > 64:
        raise _fail("the chiplock metadata names no transform")
    try:
        tf = get_transform(name)
    except UnsupportedConfig:
        raise UnsupportedConfig(f"the file uses transform {_show(name)}, which this chiplock does not know "
                                f"(it knows {', '.join(available_transforms())}); upgrade chiplock") from None
    created_by = meta.get("created_by")
    if created_by is not None and not (isinstance(created_by, str) and len(created_by) <= 256):
        raise _fail("the chiplock metadata's created_by is not a short string")
    KdfParams.from_json(meta["kdf"], max_memory_kib=max_kdf_memory_kib)
    _check_sources(meta["sources"])
    if not isinstance(meta["secret"], bool):
        raise _fail("the chiplock metadata's secret flag is not true or false")
    if meta["key_check"] is not None and not _is_hex(meta["key_check"], 16):
        raise _fail("the key check is not 16 bytes of lowercase hex")
    if meta.get("header_mac") is not None and not _is_hex(meta["header_mac"], 32):
        raise _fail("the header MAC is not 32 bytes of lowercase hex")
    sig = meta.get("signature")
    if sig is not None and not (isinstance(sig, dict) and set(sig) == {"alg", "public_key", "sig"}
                                and sig["alg"] == "ed25519" and _is_hex(sig["public_key"], 32)
                                and _is_hex(sig["sig"], 64)):
        raise _fail("the signature is malformed (it must be ed25519 with a 32-byte public key and a 64-byte "
                    "signature, in lowercase hex)")
    tensors = meta["tensors"]
    if not isinstance(tensors, dict) or set(tensors) != set(entries):
        raise _fail("the metadata and the stored tensors disagree")
    for tname, info in tensors.items():
        entry = entries[tname]
        if not (isinstance(info, dict) and set(info) == _TENSOR_FIELDS and isinstance(info["dtype"], str)
                and info["dtype"] in STORED_DTYPES and info["shape"] == entry["shape"]
                and _is_hex(info["digest"], 32)):
            raise _fail(f"the metadata of tensor {_show(tname)} is malformed or disagrees with the stored tensor")
        _check_params(tname, info["params"])
        try:
            stored = tf.stored_dtype(info["dtype"])
        except UnsupportedConfig:
            raise _fail(f"tensor {_show(tname)} has dtype {info['dtype']}, which transform {tf.name} cannot "
                        "store") from None
        if entry["dtype"] != stored:
            raise _fail(f"tensor {_show(tname)} is stored as {entry['dtype']}, but transform {tf.name} stores "
                        f"{info['dtype']} as {stored}")


def _check_sources(sources: Any) -> None:
    if not (isinstance(sources, list) and 1 <= len(sources) <= MAX_SOURCES):
        raise _fail(f"the chiplock metadata's sources are not a list of 1 to {MAX_SOURCES} entries")
    names = set()
    for s in sources:
        if not (isinstance(s, dict) and set(s) == {"source", "helper"} and isinstance(s["source"], str)
                and _SOURCE_NAME.fullmatch(s["source"]) and isinstance(s["helper"], dict)):
            raise _fail("a fingerprint source entry is malformed")
        if s["source"] in names:
            raise _fail(f"fingerprint source {s['source']!r} is listed twice")
        names.add(s["source"])
        # The helper is the source's own format (each source checks it when reproducing); here only its shape.
        problem = _json.check_tree(s["helper"], max_depth=HEADER_LIMITS.max_depth, max_str=MAX_HEADER)
        if problem:
            raise _fail(f"the helper data of source {s['source']!r} is malformed: {problem}")


def _scalar_ok(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_PARAM_CHARS)


def _check_params(name: str, params: Any) -> None:
    # Each transform checks the meaning of its parameters when decoding; here only that they are a small map of
    # JSON scalars or flat lists of scalars, so a transform never meets a nested or huge value.
    if not (isinstance(params, dict) and len(params) <= MAX_PARAMS
            and all(isinstance(k, str) and len(k) <= 64 for k in params)
            and all(_scalar_ok(v) or (isinstance(v, list) and len(v) <= MAX_PARAM_LIST
                                      and all(_scalar_ok(x) for x in v)) for v in params.values())):
        raise _fail(f"the public parameters of tensor {_show(name)} are malformed (at most {MAX_PARAMS} values, "
                    f"each a scalar, a string of at most {MAX_PARAM_CHARS} characters or a list of at most "
                    f"{MAX_PARAM_LIST} scalars)")


def map_tensors(path: str | os.PathLike, *, max_kdf_memory_kib: int | None = None,
                ) -> tuple[dict[str, Any], list[StoredTensor]]:
    """Validate the header (see :func:`read_header`) and map every stored tensor read-only (no bytes copied)."""
    meta, header, start = read_header(path, max_kdf_memory_kib=max_kdf_memory_kib)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors = []
    for name, entry in _tensor_entries(header):
        a, b = entry["data_offsets"]
        tensors.append(StoredTensor(name, entry["dtype"], tuple(entry["shape"]), mm[start + a:start + b]))
    return meta, tensors
