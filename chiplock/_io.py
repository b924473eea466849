"""Crash-safe file writes and the checks that protect the user's files from being overwritten by mistake.

A file written through :func:`atomic_writer` gets its name only once it is complete and on disk, whatever ends
the process (an exception, Ctrl-C, ``kill -9``, a power cut):

* On Linux the bytes go to an *unnamed* file (``O_TMPFILE``) in the target's folder, so nothing of a partial
  file is ever visible in the folder and the kernel reclaims it when the process dies. When complete it is
  fsynced and given its name with ``linkat`` through ``/proc/self/fd/N``.
* Elsewhere (another OS, or a file system without ``O_TMPFILE``) the bytes go to a hidden
  ``.NAME.PID.RANDOM.chiplock-part`` file (mode 0600) renamed over the target when complete; see
  :func:`atomic_writer` for what that fallback can and cannot promise.

:func:`check_output` refuses an output path that would lose data (the input itself, a model of another kind)
or that cannot work (a folder, a path under a file, a missing folder), before any expensive work starts.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import secrets
import stat
import struct
import sys
from typing import IO, Iterable, Iterator, Literal

from chiplock.errors import ChiplockError, FileAccessError, OutputError

#: Suffix of the hidden names this module creates; :func:`_sweep_stale` removes those left by dead processes.
PART_SUFFIX = ".chiplock-part"
#: ``False`` forces the portable fallback (tests set it; so may a user on a file system that misbehaves).
USE_O_TMPFILE = sys.platform.startswith("linux") and hasattr(os, "O_TMPFILE")
_NAME_KEEP = 64  # Characters of the target's name kept in a hidden name, so it stays under NAME_MAX.
_SNIFF_LIMIT = 16 << 20  # Headers larger than this are not parsed to tell a container from a plain model.
_CONTAINER_PREFIX = b'{"__metadata__":{"chiplock":"{'  # What chiplock's build_header writes first.
_live_parts: set[str] = set()  # Fallback temp files of this process, removed at interpreter exit.


def _short(path: str | os.PathLike, limit: int = 300) -> str:
    text = os.fspath(path)
    return repr(text if len(text) <= limit else text[:limit // 2] + "..." + text[-limit // 2:])


def os_error(exc: OSError, path: str | os.PathLike | None = None, action: str = "access") -> FileAccessError:
    """Turn an :class:`OSError` into a one-line :class:`FileAccessError` that names the path and what to do.

    ``action`` is a verb for the message (``"read"``, ``"write"``); an error that happened while writing an
    output is an :class:`OutputError`.
    """
    if path is None and exc.filename is None:
        return (OutputError if action == "write" else FileAccessError)(
            f"cannot {action} a file ({exc.strerror or type(exc).__name__}); check the paths you passed")
    where = _short(path if path is not None else exc.filename)
    code = exc.errno
    if code == errno.ENOENT:
        why = f"{where} does not exist; check the path"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"permission denied for {where}; fix its permissions or choose another path"
    elif code == errno.ENAMETOOLONG:
        why = f"the path {where} is too long; use a shorter path or file name"
    elif code == errno.ENOTDIR:
        why = f"the path {where} runs through a file, not a folder; fix the path"
    elif code == errno.EISDIR:
        why = f"{where} is a folder; pass a file path"
    elif code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        why = f"no space left to {action} {where}; free some space or write to another disk"
    elif code == errno.EROFS:
        why = f"{where} is on a read-only file system; write to another folder"
    else:
        why = f"cannot {action} {where} ({exc.strerror or type(exc).__name__}); check the path and the disk"
    return (OutputError if action == "write" else FileAccessError)(why)


def check_input(path: str | os.PathLike, what: str, hint: str,
                error: type[ChiplockError] = FileAccessError) -> None:
    """An input file must exist and be a file: otherwise raise a one-line ``error`` naming ``what`` and ``hint``
    (what to do), or a :class:`FileAccessError` for other OS errors (permission, path too long, under a file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {_short(path)} not found; {hint}") from None
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {_short(path)} is a folder, not a file; {hint}")


def read_capped(path: str | os.PathLike, limit: int) -> bytes:
    """Read at most ``limit + 1`` bytes of a small input file (a caller refuses more than ``limit``).

    The file is opened non-blocking, so a FIFO without a writer cannot hang the open, then read blocking, so a pipe
    (``--secret-file <(pass show vendor)``) is read to its end and a FIFO nobody writes reads as empty. Only a
    regular file, a FIFO or a character device is read (an endless one stops at the cap).

    Raises:
        OSError: The file cannot be opened or read; ``errno.ENODEV`` when it is not one of the kinds above.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise OSError(errno.ENODEV, "not a file", os.fspath(path))
        os.set_blocking(fd, True)
        return fh.read(limit + 1)


def check_output_folder(path: str | os.PathLike) -> None:
    """A folder that a command will create (a report folder) must be creatable: no file in the way."""
    text = os.fspath(path)
    probe = text
    while probe and not os.path.lexists(probe):
        up = os.path.dirname(probe.rstrip(os.sep))
        if up == probe:
            break
        probe = up
    probe = probe or "."
    try:
        st = os.stat(probe)
    except OSError as exc:
        raise os_error(exc, probe, "write") from None
    if not stat.S_ISDIR(st.st_mode):
        where = "is a file" if probe == text else f"runs through {_short(probe)}, which is a file"
        raise OutputError(f"the output folder {_short(text)} {where}; pass a folder path")


# --------------------------------------------------------------------------------------------------------------
# Refusing outputs that would lose data.

def file_kind(path: str | os.PathLike) -> Literal["container", "safetensors", "empty", "other"]:
    """What an existing regular file holds, from its first bytes: a chiplock container, another safetensors
    file (a plaintext model), nothing, or anything else (a ``.pt`` zip, a text file, ...)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return "empty"
        prefix = fh.read(8)
        if len(prefix) < 8:
            return "other"
        (n,) = struct.unpack("<Q", prefix)
        if n < 2 or n > size - 8:
            return "other"
        # chiplock writes its metadata first: that prefix marks a container however large its header (a big
        # pre-aes model's header can pass any parse limit, and must still never be replaced by plaintext).
        if fh.read(len(_CONTAINER_PREFIX)) == _CONTAINER_PREFIX:
            return "container"
        if n > _SNIFF_LIMIT:
            return "other"
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        return "other"
    if not isinstance(header, dict):
        return "other"
    # The container's format marker: a "chiplock" entry in __metadata__ whose JSON says format "chiplock".
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and isinstance(meta.get("chiplock"), str):
        try:
            inner = json.loads(meta["chiplock"])
        except (ValueError, RecursionError):
            inner = None
        if isinstance(inner, dict) and inner.get("format") == "chiplock":
            return "container"
    return "safetensors"


def _check_folder(folder: str) -> None:
    """The output's folder must exist, be a folder, and be writable; it is never created silently."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        # Tell a missing folder from a path that runs through a file.
        parent = folder
        while True:
            parent = os.path.dirname(parent.rstrip(os.sep)) or "."
            if os.path.exists(parent) or parent in (".", os.sep):
                break
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputError(f"the output path runs through {_short(parent)}, which is a file, not a folder; "
                              "fix the path") from None
        raise OutputError(f"the output folder {_short(folder)} does not exist; create it first "
                          f"(mkdir -p {folder}) or choose another path") from None
    except OSError as exc:
        raise os_error(exc, folder, "write") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"the output path runs through {_short(folder)}, which is a file, not a folder; "
                          "fix the path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in folder {_short(folder)} (permission denied); fix its permissions or "
                          "choose another folder")


def check_output(path: str | os.PathLike, *, kind: Literal["container", "weights", "file"],
                 inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Refuse an output path that would lose data or cannot be written, before any expensive work.

    Args:
        path: The output file.
        kind: What will be written: ``"container"`` (``lock``), ``"weights"`` (plaintext, ``unlock -o``), or
            ``"file"`` (anything else: only the path itself is checked, not what an existing file holds).
        inputs: Files the operation reads; the output may not be one of them (same inode, links included).
        force: Allow replacing a file of another kind (a plaintext model by a container, or any non-container
            file by plaintext weights). A container is never replaced by plaintext weights, even with ``force``.

    Raises:
        OutputError: The output is an input, a folder, under a file, in a missing or read-only folder, not a
            regular file, or a file of another kind (without ``force``).
        FileAccessError: The path cannot be examined (permission denied, too long, ...).
    """
    text = os.fspath(path)
    example = "model.chiplock" if kind == "container" else "model.safetensors"
    if not text or text.endswith(os.sep) or os.path.basename(text) in (".", ".."):
        raise OutputError(f"the output {_short(text)} names a folder; pass a file path such as "
                          f"{os.path.join(text or '.', example)}")
    _check_folder(os.path.dirname(text) or ".")
    try:
        st = os.stat(text)
    except FileNotFoundError:
        return  # A new file (or a dangling link, which the write replaces): nothing to lose.
    except OSError as exc:
        raise os_error(exc, text, "write") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"the output {_short(text)} is a folder; pass a file path inside it, e.g. "
                          f"{os.path.join(text, example)}")
    for src in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(src, text):
                raise OutputError(f"the output {_short(text)} is the input file; writing it would destroy the "
                                  "input: choose another output path")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"the output {_short(text)} exists and is not a regular file; choose another path")
    if kind == "file":
        return
    try:
        found = file_kind(text)
    except OSError as exc:
        raise os_error(exc, text, "read") from None
    flag = "pass --force (force=True in Python)"
    if kind == "container":
        if found in ("container", "empty") or force:
            return
        what = "a plaintext safetensors model" if found == "safetensors" else "not a chiplock container"
        raise OutputError(f"the output {_short(text)} exists and is {what}; locking would overwrite it: choose "
                          f"another output path, or {flag} to replace it")
    if found == "container":
        raise OutputError(f"the output {_short(text)} is a chiplock container; unlocked weights never replace "
                          "one (it may be your only copy): choose another output path")
    if found in ("safetensors", "empty") or force:
        return
    raise OutputError(f"the output {_short(text)} exists and is not a safetensors file; choose another output "
                      f"path, or {flag} to replace it")


# --------------------------------------------------------------------------------------------------------------
# Writing.

def _write_error(exc: OSError, target: str) -> FileAccessError:
    # Writes to the output carry no file name; an error that names a file came from something else the block did.
    return os_error(exc, None, "read") if exc.filename is not None else os_error(exc, target, "write")


def _hidden_name(name: str) -> str:
    return f".{name[:_NAME_KEEP]}.{os.getpid()}.{secrets.token_hex(6)}{PART_SUFFIX}"


def _sweep_stale(folder: str, name: str) -> None:
    """Remove hidden parts of ``name`` left by processes that no longer exist (killed, or the machine crashed).

    Only POSIX, where ``kill(pid, 0)`` asks whether a process exists (on Windows it would signal it). A part
    whose process looks alive is left alone, so a live writer is never disturbed on this machine.
    """
    if os.name != "posix":
        return
    head = f".{name[:_NAME_KEEP]}."
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(head) and entry.endswith(PART_SUFFIX)):
            continue
        pid_text = entry[len(head):-len(PART_SUFFIX)].split(".")[0]
        if pid_text.isdigit() and process_gone(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` no longer exists on this machine (so what it left half-written may go).

    ``False`` when unsure: this process, a process of another user (``kill`` is refused, but it exists), or a
    platform without ``kill(pid, 0)`` (on Windows it would signal the process).
    """
    if os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@atexit.register
def _remove_live_parts() -> None:
    for part in list(_live_parts):
        with contextlib.suppress(OSError):
            os.unlink(part)


def _open_unnamed(dfd: int) -> int | None:
    """An unnamed, writable file (mode 0600) in the folder ``dfd``; ``None`` where ``O_TMPFILE`` is unsupported."""
    if not USE_O_TMPFILE:
        return None
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        # EOPNOTSUPP: the file system lacks it; EISDIR/EINVAL: the kernel predates it.
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
            return None
        raise
    if not os.path.exists(f"/proc/self/fd/{fd}"):  # Without /proc the file could never be named.
        os.close(fd)
        return None
    return fd


def _publish_unnamed(fd: int, dfd: int, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``name`` in folder ``dfd``, atomically."""
    src = f"/proc/self/fd/{fd}"
    try:
        # dst_dir_fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW), which links the file the /proc entry
        # points to. linkat never replaces: it succeeds only where no file has that name.
        os.link(src, name, dst_dir_fd=dfd, follow_symlinks=True)
        return
    except FileExistsError:
        pass
    # linkat cannot replace an existing file, so the complete file is linked under a random hidden name and
    # renamed over the target. That hidden name exists only between these two calls (microseconds) and only
    # ever holds the complete file; a kill in that instant leaves it behind, and the next write of the same
    # target in this folder sweeps it (_sweep_stale).
    hidden = _hidden_name(name)
    os.link(src, hidden, dst_dir_fd=dfd, follow_symlinks=True)
    try:
        os.replace(hidden, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(hidden, dir_fd=dfd)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that appears at ``path`` only when the block completes, fsynced, with ``mode``.

    An existing file at ``path`` is replaced atomically: a reader sees the old file or the new one, never a
    mix. The folder must exist (it is never created): a missing one raises :class:`OutputError`.

    Guarantees, by platform:

    * Linux with ``O_TMPFILE`` (ext4, xfs, btrfs, tmpfs, ...): while the block runs the data has no name in
      any folder, so an exception, Ctrl-C, ``kill -9`` or a power cut leaves no file behind; the kernel frees
      it. Plaintext is never readable under any name before it is complete. (To replace an existing file,
      the complete file is linked under a hidden name and renamed over ``path`` in the next system call; a
      kill in that instant leaves the complete file under the hidden name, which the next write sweeps.)
    * Elsewhere: the data is written to a hidden ``.NAME.PID.RANDOM.chiplock-part`` file (mode 0600) in the
      same folder, then renamed over ``path``. It is removed on any Python exception, Ctrl-C and normal
      interpreter exit (``atexit``). A ``kill -9`` or power cut during the write leaves that partial file;
      the next write of the same target in the folder removes it once its process is gone (POSIX), or delete
      it by hand. ``path`` itself never holds a partial file.

    Raises:
        OutputError: The folder is missing or not writable, or writing failed (disk full, ...).
    """
    text = os.fspath(path)
    folder, name = os.path.dirname(text) or ".", os.path.basename(text)
    _check_folder(folder)
    # A name that can never be linked (too long, a folder) must fail now, not after all the bytes are written.
    try:
        if stat.S_ISDIR(os.lstat(text).st_mode):
            raise OutputError(f"the output {_short(text)} is a folder; pass a file path inside it")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, text, "write") from None
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)) \
            if os.name == "posix" else None
    except OSError as exc:
        raise os_error(exc, folder, "write") from None
    try:
        _sweep_stale(folder, name)
        fd = _open_unnamed(dfd) if dfd is not None else None
        if fd is not None:
            with os.fdopen(fd, "wb") as fh:
                try:
                    yield fh
                    fh.flush()
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                except OSError as exc:
                    raise _write_error(exc, text) from None
                _publish_unnamed(fd, dfd, name)  # Its OSErrors are the target's: mapped below.
        else:
            yield from _fallback_write(folder, name, text, mode)
        if dfd is not None:
            # Make the new name itself durable, not only the file's bytes.
            with contextlib.suppress(OSError):
                os.fsync(dfd)
    except OSError as exc:
        raise os_error(exc, text, "write") from None
    finally:
        if dfd is not None:
            os.close(dfd)


def _fallback_write(folder: str, name: str, text: str, mode: int) -> Iterator[IO[bytes]]:
    part = os.path.join(folder, _hidden_name(name))
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o600)
    _live_parts.add(part)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                yield fh
                fh.flush()
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, mode)
                os.fsync(fd)
            except OSError as exc:
                raise _write_error(exc, text) from None
        os.replace(part, text)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    finally:
        _live_parts.discard(part)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data)
