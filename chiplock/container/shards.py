"""Sharded model folders: plan a Hugging Face folder, lock it shard by shard, unlock it back.

This module only walks folders, reads and writes the two index files and copies side files; what happens to
one shard is a callable the caller supplies (``lock_one``, ``iter_shard``, ``shard_header``), so it needs no key
and no container internals: only the plain safetensors reader and writer (:mod:`chiplock.container.plain`) and
the schema's caps on names and shard counts.

Layouts:

* **Source** (plaintext, as ``save_pretrained`` writes it): ``model.safetensors.index.json`` plus the shards it
  names, or a single ``*.safetensors``; every other regular file at the top level (``config.json``,
  ``generation_config.json``, tokenizer files, ...) is a *side file*, copied verbatim. Pickle weights
  (``*.bin``, ``*.pt``, ...) are never copied: a folder holding only those is refused.
* **Locked**: each shard ``X.safetensors`` becomes ``X.chiplock``, next to ``model.chiplock.index.json``::

      {"metadata": {"format": "chiplock", "total_size": <bytes of the locked shards>,
                    "source_index": <the source index's own "metadata", or {}>, "content_id"?: <hex>},
       "weight_map": {tensor: "X.chiplock"}}

Output folders appear only complete: they are built in a hidden sibling folder ``.chiplock-tmp-NAME.PID.RAND``
(mode 0700) and renamed into place. An exception or Ctrl-C removes the hidden folder. A ``kill -9`` or power cut
leaves it behind: after :func:`lock_dir` it holds only locked shards and copied side files, never plaintext
weights; after :func:`unlock_dir` it holds the plaintext the caller asked for (readable by the owner only).
The next :func:`lock_dir` / :func:`unlock_dir` writing the same target in the same folder removes such folders
once the process that made them is gone. An existing output folder is replaced (``force=True``) only after the
new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chiplock import _json
from chiplock._dtypes import DTYPE_NAMES, STORED_DTYPES
from chiplock._io import os_error, process_gone, read_capped
from chiplock.container.plain import read_plain, write_safetensors
from chiplock.container.schema import MAX_SHARDS, tensor_name_problem
from chiplock.errors import ContainerError, OutputError, UnsupportedConfig

__all__ = ["HF_INDEX", "LOCKED_INDEX", "LOCKED_SUFFIX", "LockedDir", "SourcePlan", "check_output_dir", "is_locked_dir",
           "lock_dir", "locked_dir_shards", "locked_name", "plain_name", "plan_source", "unlock_dir",
           "write_safetensors"]

#: The index ``save_pretrained`` writes next to sharded safetensors.
HF_INDEX = "model.safetensors.index.json"
#: The index of a locked folder.
LOCKED_INDEX = "model.chiplock.index.json"
LOCKED_SUFFIX = ".chiplock"
_PLAIN_SUFFIX = ".safetensors"
#: Weights that are never copied as side files: other formats of the same weights would leak them in plaintext.
_WEIGHT_SUFFIXES = (".safetensors", ".chiplock", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5",
                    ".keras", ".msgpack", ".ot", ".gguf", ".ggml", ".onnx", ".tflite", ".pb", ".mlmodel", ".npz",
                    ".npy", ".joblib", ".nemo", ".pdparams")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TMP_PREFIX, _OLD_PREFIX = ".chiplock-tmp-", ".chiplock-old-"
_NAME_KEEP = 64
#: Caps on an index file: a 1-trillion-parameter model's index is a few MiB.
MAX_INDEX_BYTES = 64 << 20
_INDEX_LIMITS = _json.Limits(max_bytes=MAX_INDEX_BYTES, max_depth=32)

Progress = Callable[[str, int, int], None]
#: ``lock_one(src_shard, out_shard, index, count) -> public metadata of the written shard``.
LockOne = Callable[[Path, Path, int, int], dict]
#: ``iter_shard(locked_shard) -> (name, tensor), ...`` (plaintext tensors, any order).
IterShard = Callable[[Path], Iterable[tuple[str, torch.Tensor]]]
#: ``shard_header(locked_shard) -> [(name, dtype, shape), ...]``; dtype a safetensors name ("F32") or a
#: ``torch.dtype``. Read from public metadata, before any key work.
ShardHeader = Callable[[Path], Iterable[tuple[str, Any, Iterable[int]]]]


@dataclass(frozen=True)
class SourcePlan:
    """A plaintext model folder, validated.

    Attributes:
        folder: The folder.
        shards: The weight files (``*.safetensors``), sorted by name.
        index: The parsed ``model.safetensors.index.json``, or ``None`` for a single-file folder.
        side_files: Other regular files to copy verbatim (config, tokenizer, ...).
        weight_map: tensor name -> shard file name, read from the shards' own headers (and checked against the
            index when there is one).
    """

    folder: Path
    shards: list[Path]
    index: dict | None
    side_files: list[Path]
    weight_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LockedDir:
    """A locked model folder, validated.

    Attributes:
        folder: The folder.
        shards: The containers (``*.chiplock``), sorted by name.
        weight_map: tensor name -> container file name (empty for a single container without an index: read
            the names from its header).
        metadata: The index's ``metadata`` (``{}`` without an index).
        side_files: Other regular files (config, tokenizer, ...).
    """

    folder: Path
    shards: list[Path]
    weight_map: dict[str, str]
    metadata: dict
    side_files: list[Path]


# --------------------------------------------------------------------------------------------------------------
# Reading folders.

def _short(x: object) -> str:
    return _json.show(os.fspath(x) if isinstance(x, os.PathLike) else x, 120)


def _entries(folder: Path) -> list[tuple[str, Path]]:
    """Top-level regular files of ``folder`` (links followed), sorted by name; hidden chiplock folders skipped."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise os_error(exc, folder, "read") from None
    out = []
    for name in names:
        p = folder / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(p).st_mode):
                out.append((name, p))
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = read_capped(path, MAX_INDEX_BYTES)
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    try:
        return _json.loads(raw, _INDEX_LIMITS)
    except _json.JSONLimitError as exc:
        raise ContainerError(f"the {what} {_short(path)} {exc}; restore it from the original model folder") from None


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a shard file name in the index's folder (a path escape, ...), or ``None``."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name or "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name):
        return "is not a plain file name in the model folder (paths such as '../x', '/x' or 'sub/x' are refused)"
    if name.startswith("."):
        return "names a hidden file"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than 255 bytes"
    return None


def _check_index(doc: Any, path: Path, suffix: str) -> tuple[dict[str, str], dict]:
    """(weight_map, metadata) of a parsed index, or ContainerError naming what is wrong."""

    def bad(why: str) -> ContainerError:
        return ContainerError(f"the index {_short(path)} {why}; restore it from the original model folder")

    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    wm = doc.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise bad('has no "weight_map" object of tensor name -> shard file')
    meta = doc.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise bad('has a "metadata" entry that is not an object')
    problem = _json.check_tree(meta, max_depth=16, max_str=1 << 16)
    if problem:
        raise bad(f'has unusable "metadata" ({problem})')
    shards = set()
    for tensor, shard in wm.items():
        why = tensor_name_problem(tensor)
        if why:
            raise bad(f"lists a tensor name that {why}")
        if not isinstance(shard, str):
            raise bad(f"maps tensor {_short(tensor)} to {_short(shard)}, which is not a file name")
        why = _name_problem(shard)
        if why:
            raise bad(f"maps tensor {_short(tensor)} to {_short(shard)}, which {why}")
        if not shard.endswith(suffix):
            hint = (": chiplock locks safetensors only; convert the model with "
                    "model.save_pretrained(folder, safe_serialization=True)" if shard.endswith(_PICKLE_SUFFIXES)
                    else "")
            raise bad(f"maps tensor {_short(tensor)} to {_short(shard)}, not a {suffix} file{hint}")
        shards.add(shard)
    if len(shards) > MAX_SHARDS:
        raise bad(f"names more than {MAX_SHARDS} shard files")
    missing = sorted(s for s in shards if not (path.parent / s).is_file())
    if missing:
        raise bad(f"names shard file(s) missing from the folder: {', '.join(map(_short, missing[:3]))}")
    return dict(wm), meta


def plan_source(path: str | os.PathLike) -> SourcePlan:
    """Validate a plaintext model folder (or its ``*.index.json``) and list what :func:`lock_dir` will do.

    Args:
        path: A folder holding ``model.safetensors.index.json`` and its shards, or a single ``*.safetensors``;
            or the path of an ``*.index.json`` (its folder is the model folder).

    Returns:
        A :class:`SourcePlan`.

    Raises:
        FileAccessError: The path is missing or unreadable.
        ContainerError: The index is malformed, names a file outside the folder or a missing shard, or disagrees
            with the tensors the shards hold; a shard's header is malformed; a tensor is in two shards.
        UnsupportedConfig: The folder holds no safetensors weights (only ``.bin``/``.pt``: convert them), or
            several ``.safetensors`` without an index.

    Example:
        >>> plan = plan_source("llama-tiny/")  # doctest: +SKIP
        >>> [p.name for p in plan.shards]  # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise os_error(exc, p, "read") from None
    index_path = None
    if stat.S_ISDIR(st.st_mode):
        folder = p
        if (folder / HF_INDEX).is_file():
            index_path = folder / HF_INDEX
    elif p.name.endswith(".index.json"):
        folder, index_path = p.parent, p
    else:
        raise UnsupportedConfig(f"{_short(p)} is neither a model folder nor an *.index.json file; pass the folder "
                                "that save_pretrained wrote (lock a single weights file with chiplock.lock)")
    files = _entries(folder)
    index = None
    if index_path is not None:
        index = _read_json(index_path, "index")
        listed, _ = _check_index(index, index_path, _PLAIN_SUFFIX)
        shards = sorted({folder / s for s in listed.values()})
    else:
        shards = [f for n, f in files if n.endswith(_PLAIN_SUFFIX)]
        if not shards:
            pickles = [n for n, _ in files if n.endswith(_PICKLE_SUFFIXES)]
            if pickles:
                raise UnsupportedConfig(f"the folder {_short(folder)} holds pickle weights ({_short(pickles[0])}) "
                                        "and no safetensors; chiplock locks safetensors only: convert them with "
                                        "model.save_pretrained(folder, safe_serialization=True)")
            raise UnsupportedConfig(f"the folder {_short(folder)} holds no *.safetensors weights; pass the folder "
                                    "that save_pretrained wrote")
        if len(shards) > 1:
            raise UnsupportedConfig(f"the folder {_short(folder)} holds {len(shards)} .safetensors files but no "
                                    f"{HF_INDEX}; add the index that save_pretrained writes, or lock each file "
                                    "with chiplock.lock")
    weight_map: dict[str, str] = {}
    for shard in shards:
        # The shard's header is checked as the locker will read it (caps, offsets, size), before any key work.
        for name in (e.name for e in read_plain(shard).entries):
            if name in weight_map:
                raise ContainerError(f"tensor {_short(name)} is in both {_short(weight_map[name])} and "
                                     f"{_short(shard.name)}; restore the model folder")
            weight_map[name] = shard.name
    if index is not None and weight_map != index["weight_map"]:
        _explain_mismatch(index["weight_map"], weight_map, index_path)
    # An index of another format (pytorch_model.bin.index.json, ...) is not a side file: it would point at
    # files the locked folder does not have.
    side = [f for n, f in files if not n.endswith(_WEIGHT_SUFFIXES) and not n.endswith(".index.json")
            and not n.startswith(_TMP_PREFIX)]
    for f in side:
        kind = weights_like(f)
        if kind:
            raise UnsupportedConfig(f"{_short(f.name)} in the model folder is a {kind} file (a checkpoint?); "
                                    "chiplock copies side files in plaintext next to the locked shards, so it "
                                    "refuses it: move it out of the folder (or convert and lock it) first")
    return SourcePlan(folder=folder, shards=shards, index=index, side_files=side, weight_map=weight_map)


#: Leading bytes of formats that hold tensors (or archives that may): such a file is never copied in plaintext.
_MAGIC = ((b"PK\x03\x04", "zip (torch.save)"), (b"\x1f\x8b", "gzip"), (b"\x93NUMPY", "numpy"),
          (b"\x89HDF\r\n\x1a\n", "HDF5"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"),
          (b"BZh", "bzip2"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"GGUF", "GGUF"))


def weights_like(path: Path) -> str | None:
    """What tensor-holding format ``path`` is by its content (not its name), or ``None``: zip (``torch.save``),
    pickle, safetensors, numpy, HDF5, GGUF, tar and compressed files, whatever they are called
    (``model_best.pth.tar``, ``weights.bak``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ ") and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return None


def _explain_mismatch(listed: dict[str, str], found: dict[str, str], where: Path) -> None:
    for name, shard in listed.items():
        if name not in found:
            raise ContainerError(f"the index {_short(where)} lists tensor {_short(name)} in {_short(shard)}, which "
                                 "does not hold it; restore the model folder")
        if found[name] != shard:
            raise ContainerError(f"the index {_short(where)} lists tensor {_short(name)} in {_short(shard)}, but it "
                                 f"is in {_short(found[name])}; restore the model folder")
    extra = [n for n in found if n not in listed]
    raise ContainerError(f"the shards hold tensor(s) the index {_short(where)} does not list "
                         f"({', '.join(map(_short, extra[:3]))}); restore the model folder")


def is_locked_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a locked index or a single ``*.chiplock`` (no validation)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / LOCKED_INDEX).is_file() or any(n.endswith(LOCKED_SUFFIX) for n, _ in _entries(p))


def locked_dir_shards(path: str | os.PathLike) -> LockedDir:
    """Validate a locked folder written by :func:`lock_dir` and list its containers.

    Args:
        path: The folder, or its ``model.chiplock.index.json``. A folder without an index must hold exactly one
            ``*.chiplock``.

    Returns:
        A :class:`LockedDir`.

    Raises:
        FileAccessError: The path is missing or unreadable.
        ContainerError: The index is malformed (types, caps, a shard name with a path in it, a missing shard),
            or the folder holds no container / several without an index.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise os_error(exc, p, "read") from None
    if stat.S_ISDIR(st.st_mode):
        folder, index_path = p, p / LOCKED_INDEX
    elif p.name.endswith(".index.json"):
        folder, index_path = p.parent, p
    else:
        raise ContainerError(f"{_short(p)} is not a locked model folder; pass the folder that lock wrote")
    files = _entries(folder)
    side = [f for n, f in files if not n.endswith(_WEIGHT_SUFFIXES) and not n.endswith(".index.json")]
    if index_path.is_file():
        doc = _read_json(index_path, "locked index")
        weight_map, meta = _check_index(doc, index_path, LOCKED_SUFFIX)
        if meta.get("format") != "chiplock":
            raise ContainerError(f"the index {_short(index_path)} is not a chiplock index (metadata.format is not "
                                 '"chiplock"); pass the folder that lock wrote')
        shards = sorted({folder / s for s in weight_map.values()})
        return LockedDir(folder=folder, shards=shards, weight_map=weight_map, metadata=meta, side_files=side)
    if index_path != folder / LOCKED_INDEX:
        raise os_error(OSError(errno.ENOENT, "not found"), index_path, "read")
    shards = [f for n, f in files if n.endswith(LOCKED_SUFFIX)]
    if len(shards) != 1:
        what = "no *.chiplock container" if not shards else f"{len(shards)} containers but no {LOCKED_INDEX}"
        raise ContainerError(f"the folder {_short(folder)} holds {what}; pass the folder that lock wrote")
    return LockedDir(folder=folder, shards=shards, weight_map={}, metadata={}, side_files=side)


# --------------------------------------------------------------------------------------------------------------
# Output folders.

def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(src: str | os.PathLike, out: str | os.PathLike, *, force: bool, plaintext: bool) -> bool:
    """Refuse an output folder that would lose data, before any expensive work; return whether a non-empty
    folder will be replaced.

    Refused: ``out`` is ``src``, inside it, or holds it; a file or a symbolic link; in a missing or read-only
    folder; not empty (without ``force``); with ``plaintext`` (unlocking), a folder holding a locked model,
    even with ``force``.

    Raises:
        OutputError: As above, with what to do.
    """
    src, out = Path(src), Path(out)
    rsrc, rout = src.resolve(), out.resolve()
    if rout == rsrc:
        raise OutputError(f"the output folder {_short(out)} is the input folder; choose another output folder")
    if _inside(rout, rsrc):
        raise OutputError(f"the output folder {_short(out)} is inside the input folder {_short(src)}; choose a "
                          "folder outside it")
    if _inside(rsrc, rout):
        raise OutputError(f"the input folder {_short(src)} is inside the output folder {_short(out)}; replacing "
                          "it would destroy the input: choose another output folder")
    parent = out.parent
    try:
        if not stat.S_ISDIR(os.stat(parent).st_mode):
            raise OutputError(f"the output path runs through {_short(parent)}, which is a file; fix the path")
    except FileNotFoundError:
        raise OutputError(f"the folder {_short(parent)} does not exist; create it first (mkdir -p {parent}) or "
                          "choose another output folder") from None
    except OSError as exc:
        raise os_error(exc, parent, "write") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in folder {_short(parent)} (permission denied); choose another folder")
    if os.path.islink(out):
        raise OutputError(f"the output {_short(out)} is a symbolic link; pass the folder it points to or a new path")
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, out, "write") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"the output {_short(out)} is a file; pass a folder path (it is created)")
    try:
        content = os.listdir(out)
    except OSError as exc:
        raise os_error(exc, out, "read") from None
    if not content:
        return False
    if plaintext and is_locked_dir(out):
        raise OutputError(f"the output folder {_short(out)} holds a locked model; unlocked weights never replace "
                          "one (it may be your only copy): choose another output folder")
    if not force:
        raise OutputError(f"the output folder {_short(out)} exists and is not empty; choose another folder, or "
                          "pass --force (force=True in Python) to replace it")
    return True


def _sweep_stale(parent: Path, name: str) -> None:
    """Remove hidden build folders for ``name`` left by processes that no longer exist (``kill -9``, a crash)."""
    heads = tuple(f"{prefix}{name[:_NAME_KEEP]}." for prefix in (_TMP_PREFIX, _OLD_PREFIX))
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        head = next((h for h in heads if entry.startswith(h)), None)
        if head is None:
            continue
        pid_text = entry[len(head):].split(".")[0]
        if pid_text.isdigit() and process_gone(int(pid_text)):
            shutil.rmtree(parent / entry, ignore_errors=True)


def _hidden(parent: Path, prefix: str, name: str) -> Path:
    return parent / f"{prefix}{name[:_NAME_KEEP]}.{os.getpid()}.{secrets.token_hex(6)}"


@contextlib.contextmanager
def _building(out: Path, replace: bool, mode: int) -> Iterator[Path]:
    """Yield a hidden empty folder (mode 0700) next to ``out``; when the block completes it gets ``mode`` and
    becomes ``out``."""
    parent, name = out.parent, out.name
    _sweep_stale(parent, name)
    tmp = _hidden(parent, _TMP_PREFIX, name)
    try:
        os.mkdir(tmp, 0o700)
    except OSError as exc:
        raise os_error(exc, tmp, "write") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        os.chmod(tmp, mode)
        _publish(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    try:
        if not replace:
            # rename() replaces an empty folder and fails on a non-empty one (a racing writer): never merges.
            os.rename(tmp, out)
            return
        old = _hidden(out.parent, _OLD_PREFIX, out.name)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"the output folder {_short(out)} was filled by someone else while this ran; "
                              "choose another output folder") from None
        raise os_error(exc, out, "write") from None


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_side_files(files: Iterable[Path], dest: Path) -> list[str]:
    names = []
    for f in files:
        target = dest / f.name
        try:
            shutil.copyfile(f, target)
        except OSError as exc:
            # A failure that names no file (disk full during the copy) is the target's.
            where = exc.filename or target
            raise os_error(exc, where, "read" if os.fspath(where) == os.fspath(f) else "write") from None
        try:
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            raise os_error(exc, target, "write") from None
        names.append(f.name)
    return names


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    return h.hexdigest()


def manifest_bytes(index: dict) -> bytes:
    """What a locked folder's index signature covers: the canonical index without its signature."""
    meta = {k: v for k, v in index.get("metadata", {}).items() if k != "signature"}
    return b"chiplock folder manifest v1\0" + _json.canonical({"metadata": meta, "weight_map": index["weight_map"]})


def check_manifest(locked: LockedDir, verify: Callable[[dict | None, bytes], None]) -> None:
    """Check a locked folder's signed manifest: ``verify(signature, message)`` checks the index signature (and
    raises when it is missing or wrong), then every side file must be listed with its digest, and every listed
    one present. Called when the device is given the vendor's key.

    Raises:
        ContainerError: A side file was added, removed or changed (e.g. config.json edited).
    """
    meta = locked.metadata
    verify(meta.get("signature"), manifest_bytes({"metadata": meta, "weight_map": locked.weight_map}))
    listed = meta.get("side_files")
    if not isinstance(listed, dict):
        raise ContainerError("the locked folder's index lists no side files; re-download the folder")
    present = {f.name: f for f in locked.side_files}
    changed = sorted(set(listed) ^ set(present)) + sorted(
        n for n in set(listed) & set(present) if _sha256(present[n]) != listed[n])
    if changed:
        raise ContainerError(f"side file(s) {', '.join(map(_short, changed[:3]))} of the locked folder were added, "
                             "removed or changed after it was signed (config.json decides the model that loads the "
                             "weights); re-download the folder")


def _write_index(path: Path, doc: dict) -> None:
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def locked_name(shard: str) -> str:
    """``X.safetensors`` -> ``X.chiplock``."""
    return shard[:-len(_PLAIN_SUFFIX)] + LOCKED_SUFFIX


def plain_name(shard: str) -> str:
    """``X.chiplock`` -> ``X.safetensors``."""
    return shard[:-len(LOCKED_SUFFIX)] + _PLAIN_SUFFIX


# --------------------------------------------------------------------------------------------------------------
# Locking.

def lock_dir(src: str | os.PathLike | SourcePlan, out_dir: str | os.PathLike, lock_one: LockOne, *,
             force: bool = False, workers: int = 1, progress: Progress | None = None,
             sign: Callable[[bytes], dict[str, str]] | None = None) -> dict[str, Any]:
    """Lock every shard of a model folder into a new folder, with a locked index and the side files.

    Args:
        src: A model folder or ``*.index.json`` (see :func:`plan_source`), or a plan from it.
        out_dir: The folder to create. It appears only complete. An existing empty folder is filled; a non-empty
            one is refused unless ``force``, and then replaced only after the new one is complete.
        lock_one: ``lock_one(src_shard, out_shard, index, count)`` writes the container ``out_shard`` (a path in
            a hidden build folder) and returns its public metadata. With ``workers > 1`` it is called from
            several threads at once.
        force: Replace a non-empty ``out_dir``.
        workers: Shards locked at once (threads; the transforms release the GIL).
        progress: Optional ``progress("shards", done, count)`` callback, called from the calling thread.

    Returns:
        ``{"path": out_dir, "index": <the locked index>, "shards": {file name: lock_one's metadata},
        "side_files": [names]}``.

    Raises:
        OutputError: ``out_dir`` is ``src``, inside it, holds it, is a file, is not empty (without ``force``),
            or cannot be written.
        ContainerError, UnsupportedConfig, FileAccessError: From :func:`plan_source`; whatever ``lock_one``
            raises propagates, and nothing is left behind.

    Example:
        >>> lock_dir("llama/", "llama-locked/", lambda s, o, i, n: chiplock.lock(s, o, profile))  # doctest: +SKIP
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    plan = src if isinstance(src, SourcePlan) else plan_source(src)
    out = Path(out_dir)
    replace = check_output_dir(plan.folder, out, force=force, plaintext=False)
    count = len(plan.shards)
    metas: dict[str, dict] = {}
    with _building(out, replace, 0o755) as tmp:
        jobs = [(shard, tmp / locked_name(shard.name), i) for i, shard in enumerate(plan.shards)]
        if workers == 1 or count == 1:
            for done, (s, o, i) in enumerate(jobs, 1):
                metas[o.name] = lock_one(s, o, i, count)
                if progress:
                    progress("shards", done, count)
        else:
            _run_parallel(jobs, lock_one, count, min(workers, count), metas, progress)
        total = sum(os.path.getsize(tmp / n) for n in metas)
        meta: dict[str, Any] = {"format": "chiplock", "total_size": total,
                                "source_index": dict((plan.index or {}).get("metadata") or {})}
        ids = {m.get("content_id") for m in metas.values() if isinstance(m, dict)}
        if len(ids) == 1 and isinstance(next(iter(ids)), str):
            meta["content_id"] = next(iter(ids))
        side = _copy_side_files(plan.side_files, tmp)
        # The side files (config.json decides the architecture that loads the weights) are listed by digest, and
        # with a signing key the index is signed: each shard signs itself, the index signs everything else.
        meta["side_files"] = {n: _sha256(tmp / n) for n in side}
        index = {"metadata": meta, "weight_map": {t: locked_name(s) for t, s in plan.weight_map.items()}}
        if sign is not None:
            meta["signature"] = sign(manifest_bytes(index))
        _write_index(tmp / LOCKED_INDEX, index)
    return {"path": str(out), "index": index, "shards": metas, "side_files": side}


def _run_parallel(jobs: list, lock_one: LockOne, count: int, workers: int, metas: dict,
                  progress: Progress | None) -> None:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chiplock-shard")
    try:
        futures = {pool.submit(lock_one, s, o, i, count): o.name for s, o, i in jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                metas[futures[f]] = f.result()  # The first failure propagates; the rest are cancelled below.
                if progress:
                    progress("shards", len(metas), count)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------------
# Unlocking.

def _header_entries(shard: Path, shard_header: ShardHeader) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for name, dtype, shape in shard_header(shard):
        dname = DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else dtype
        if dname not in STORED_DTYPES:
            raise UnsupportedConfig(f"tensor {_short(name)} in {_short(shard.name)} has dtype {_short(dtype)}, "
                                    "which safetensors cannot store here; upgrade chiplock")
        out.append((name, dname, tuple(int(d) for d in shape)))
    return out


def unlock_dir(locked: str | os.PathLike | LockedDir, out_dir: str | os.PathLike, iter_shard: IterShard,
               shard_header: ShardHeader, *, force: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Write the plaintext model folder of a locked folder: shards, ``model.safetensors.index.json``, side files.

    Every shard's tensor list (``shard_header``, public metadata) is checked against the locked index before any
    key work; then each shard is streamed to disk one tensor at a time.

    Args:
        locked: A locked folder (or its index), or a :class:`LockedDir`.
        out_dir: The folder to create (mode 0700, plaintext shards 0600, like a single unlocked file); same
            rules as :func:`lock_dir`, and a folder holding a locked model is never replaced, even with ``force``.
        iter_shard: ``iter_shard(container) -> (name, tensor), ...``: the unlocked tensors of one shard.
        shard_header: ``shard_header(container) -> [(name, dtype, shape), ...]`` from the container's header.
        force: Replace a non-empty ``out_dir`` that does not hold a locked model.
        progress: Optional ``progress("shards", done, count)`` callback.

    Returns:
        ``{"path": out_dir, "shards": [file names], "side_files": [names], "total_size": plaintext bytes}``.

    Raises:
        ContainerError: The locked index disagrees with the containers (a tensor listed in the wrong shard, or
            missing), or a shard yields other tensors than its header lists.
        OutputError: As :func:`lock_dir`; whatever ``iter_shard`` raises (``InvalidKey``, ...) propagates and
            nothing is left behind.
    """
    ld = locked if isinstance(locked, LockedDir) else locked_dir_shards(locked)
    out = Path(out_dir)
    replace = check_output_dir(ld.folder, out, force=force, plaintext=True)
    headers = {s.name: _header_entries(s, shard_header) for s in ld.shards}
    _check_weight_map(ld, headers)
    names, total = [], 0
    with _building(out, replace, 0o700) as tmp:
        for done, shard in enumerate(ld.shards, 1):
            target = tmp / plain_name(shard.name)
            try:
                with open(target, "xb") as fh:
                    os.fchmod(fh.fileno(), 0o600)
                    write_safetensors(fh, headers[shard.name], iter_shard(shard))
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise os_error(exc, target, "write") from None
            names.append(target.name)
            total += sum(STORED_DTYPES[d] * math.prod(s) for _, d, s in headers[shard.name])
            if progress:
                progress("shards", done, len(ld.shards))
        # A lone model.safetensors loads without an index; any other naming needs one to be found.
        if len(names) > 1 or names[0] != "model" + _PLAIN_SUFFIX:
            meta = dict(ld.metadata.get("source_index") or {})
            meta["total_size"] = total
            wm = {t: plain_name(s) for t, s in ld.weight_map.items()} or \
                {n: names[0] for n, _, _ in headers[ld.shards[0].name]}
            _write_index(tmp / HF_INDEX, {"metadata": meta, "weight_map": wm})
        side = _copy_side_files(ld.side_files, tmp)
    return {"path": str(out), "shards": names, "side_files": side, "total_size": total}


def _check_weight_map(ld: LockedDir, headers: dict[str, list]) -> None:
    found: dict[str, str] = {}
    for shard, entries in headers.items():
        for name, _, _ in entries:
            if name in found:
                raise ContainerError(f"tensor {_short(name)} is in both {_short(found[name])} and {_short(shard)}; "
                                     "the locked folder is damaged: obtain a fresh copy")
            found[name] = shard
    if not ld.weight_map:
        return
    for name, shard in ld.weight_map.items():
        if found.get(name) != shard:
            where = f"is in {_short(found[name])}" if name in found else "is in no shard"
            raise ContainerError(f"the locked index lists tensor {_short(name)} in {_short(shard)}, but it {where}; "
                                 "the locked folder is damaged: obtain a fresh copy")
    extra = [n for n in found if n not in ld.weight_map]
    if extra:
        raise ContainerError(f"the locked shards hold tensor(s) the index does not list "
                             f"({', '.join(map(_short, extra[:3]))}); the locked folder is damaged")
