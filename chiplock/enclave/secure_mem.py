"""Memory for the secure part's weights that other processes, the swap file and core dumps do not see.

:class:`SecureArena` reserves one region of ``budget`` bytes and hands out tensors that live in it:

* ``memfd_secret`` (Linux >= 5.14 with ``secretmem`` enabled): the pages are removed from the kernel's direct map,
  so not even ``/proc/PID/mem``, ``process_vm_readv`` or a root ``ptrace`` can read them; they are never swapped
  and never written to a core dump.
* ``mlock`` (fallback): an anonymous private mapping, each filled page locked in RAM (``mlock``: not swapped)
  and marked ``MADV_DONTDUMP`` (left out of core dumps). Readable by the process's own user unless the process is
  also hardened (:mod:`chiplock.enclave.harden`).

Both are ``MADV_DONTFORK``: a child forked later does not inherit the weights. Pages are allocated on first
write, so reserving the whole budget costs nothing until tensors are put in.

Example:
    >>> arena = SecureArena(64 << 20)                           # doctest: +SKIP
    >>> w = arena.put(heap_tensor)          # copy in; zero heap_tensor yourself (or use load())
    >>> arena.kind
    'memfd_secret'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from chiplock.errors import EnclaveError

__all__ = ["KINDS", "SecureArena", "memfd_secret_available"]

#: The memory kinds, most protective first.
KINDS = ("memfd_secret", "mlock")
_NR_MEMFD_SECRET = {"x86_64": 447, "aarch64": 447, "riscv64": 447, "s390x": 447}
_PROT_RW, _MAP_SHARED, _MAP_PRIVATE, _MAP_ANON = 0x3, 0x01, 0x02, 0x20
_MADV_DONTFORK, _MADV_DONTDUMP = 10, 16
_ALIGN = 64
_PAGE = os.sysconf("SC_PAGESIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _memfd_secret() -> int:
    """A memfd_secret fd, or -1 where the kernel (or architecture) has none."""
    nr = _NR_MEMFD_SECRET.get(os.uname().machine)
    if nr is None:
        return -1
    return int(_libc.syscall(nr, os.O_CLOEXEC))


def memfd_secret_available() -> bool:
    """Whether this kernel offers ``memfd_secret`` (boot with ``secretmem.enable=1`` on older kernels)."""
    fd = _memfd_secret()
    if fd < 0:
        return False
    os.close(fd)
    return True


class SecureArena:
    """A fixed-size region of secret (or locked, non-dumpable) memory holding tensors.

    Args:
        budget: The most bytes the arena may hold; :meth:`put` refuses more (before anything is copied).
        kind: ``"auto"`` (``memfd_secret``, else ``mlock``), ``"memfd_secret"`` (refuse if missing) or
            ``"mlock"``.

    Attributes:
        kind: The memory kind in use. ``locked``: whether every filled page is locked in RAM (always true for
            ``memfd_secret``; ``mlock`` can fail under ``RLIMIT_MEMLOCK``). ``used``: bytes handed out.

    Raises:
        EnclaveError: A bad budget, ``memfd_secret`` asked for but missing, or the mapping failed.
    """

    def __init__(self, budget: int, *, kind: str = "auto") -> None:
        if type(budget) is not int or budget <= 0:
            raise EnclaveError(f"the secure-memory budget must be a positive number of bytes, got {budget!r}")
        if kind not in ("auto", *KINDS):
            raise EnclaveError(f"memory kind {kind!r} is not one of auto, {', '.join(KINDS)}")
        self.budget = budget
        self.size = math.ceil(budget / _PAGE) * _PAGE
        self.used = 0
        self.locked = True
        self._addr: int | None = None
        addr = None
        fd = _memfd_secret() if kind in ("auto", "memfd_secret") else -1
        if fd < 0 and kind == "memfd_secret":
            raise EnclaveError("this kernel has no memfd_secret (Linux >= 5.14, boot with secretmem.enable=1 "
                               "before 6.5); use kind='auto' to fall back to locked memory")
        if fd >= 0:
            try:
                os.ftruncate(fd, self.size)
                addr = _libc.mmap(None, self.size, _PROT_RW, _MAP_SHARED, fd, 0)
            finally:
                # The mapping keeps the memory alive; no fd is left for anyone to find in /proc/PID/fd.
                os.close(fd)
            self.kind = "memfd_secret"
        if addr in (None, _MAP_FAILED) and kind != "memfd_secret":
            # No secret memory, or over RLIMIT_MEMLOCK (secret memory counts against it): locked memory.
            addr = _libc.mmap(None, self.size, _PROT_RW, _MAP_PRIVATE | _MAP_ANON, -1, 0)
            self.kind = "mlock"
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise EnclaveError(f"cannot map {self.size:,} bytes of secure memory ({os.strerror(err)}); lower "
                               "--budget-mib or raise the memory limits")
        self._addr = addr
        # Best effort: both keep the weights out of forked children and core dumps.
        _libc.madvise(addr, self.size, _MADV_DONTFORK)
        if self.kind == "mlock":
            self.dontdump = _libc.madvise(addr, self.size, _MADV_DONTDUMP) == 0
        else:
            self.dontdump = True

    @staticmethod
    def size_for(nbytes: Iterable[int]) -> int:
        """The arena bytes that tensors of these sizes take (each starts 64-byte aligned)."""
        return sum(-(-n // _ALIGN) * _ALIGN for n in nbytes)

    def _check_open(self) -> int:
        if self._addr is None:
            raise EnclaveError("the secure arena is closed; create a new one")
        return self._addr

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` into the arena; returns a tensor of the same dtype and shape that lives there.

        Raises:
            EnclaveError: The arena would exceed its budget (nothing is copied), or it is closed.
        """
        addr = self._check_open()
        if not isinstance(t, torch.Tensor):
            raise EnclaveError(f"only tensors go into the secure arena, got {type(t).__name__}")
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + nbytes > self.budget:
            raise EnclaveError(f"the secure part needs at least {start + nbytes:,} bytes, over its budget of "
                               f"{self.budget:,} bytes; raise --budget-mib or use a smaller partition")
        if nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        if self.kind == "mlock":
            lo = (addr + start) // _PAGE * _PAGE
            hi = -(-(addr + start + nbytes) // _PAGE) * _PAGE
            if _libc.mlock(lo, hi - lo) != 0:
                self.locked = False
        buf = (ctypes.c_char * nbytes).from_address(addr + start)
        out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape)
        out.copy_(t)
        self.used = start + nbytes
        return out

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]], *, zero_source: bool = True) -> dict[str, torch.Tensor]:
        """Copy each ``(name, tensor)`` in (streaming: one heap copy at a time), zeroing the source after it.

        Raises:
            EnclaveError: Over the budget (the message says to raise ``--budget-mib``), or a duplicate name.
        """
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors:
            if name in out:
                raise EnclaveError(f"tensor {name!r} appears twice in the secure part; obtain an intact model")
            out[name] = self.put(t)
            if zero_source and t.numel():
                t.detach().zero_()
        return out

    def info(self) -> dict[str, Any]:
        """What the arena is: kind, budget, bytes used, locked, left out of core dumps."""
        return {"kind": self.kind, "budget": self.budget, "used": self.used, "locked": self.locked,
                "dontdump": self.dontdump}

    def contains(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage lies inside this arena (to check that nothing copied the weights out)."""
        if self._addr is None or t.numel() == 0:
            return False
        p = t.untyped_storage().data_ptr()
        return self._addr <= p and p + t.untyped_storage().nbytes() <= self._addr + self.size

    def close(self) -> None:
        """Zero and unmap the region. Every tensor from :meth:`put` is invalid afterwards (do not touch them)."""
        if self._addr is None:
            return
        ctypes.memset(self._addr, 0, self.used)
        _libc.munmap(self._addr, self.size)
        self._addr = None
