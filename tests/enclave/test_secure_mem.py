"""SecureArena: secret memory that even /proc/self/mem cannot read (memfd_secret), else locked memory left out of
core dumps (mlock + MADV_DONTDUMP); the budget is enforced before anything is copied."""

from __future__ import annotations

import ctypes
import errno
import sys

import pytest
import torch

from chiplock.enclave import secure_mem
from chiplock.enclave.secure_mem import SecureArena, memfd_secret_available
from chiplock.errors import EnclaveError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="secure memory is Linux-only")
needs_secret = pytest.mark.skipif(not memfd_secret_available(),
                                  reason="this kernel has no memfd_secret (boot with secretmem.enable=1)")
KINDS = [pytest.param("memfd_secret", marks=needs_secret), "mlock"]


def _weights():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).double(),
            "i": torch.arange(7, dtype=torch.int8), "empty": torch.zeros(0, 3)}


def _vma(addr: int) -> tuple[int, int, list[str]]:
    """The /proc/self/smaps entry holding ``addr``: (start, end, VmFlags)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                for follow in lines[i + 1:]:
                    if follow.startswith("VmFlags:"):
                        return lo, hi, follow.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _read_own_memory(addr: int, n: int) -> bytes:
    with open("/proc/self/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


@pytest.mark.parametrize("kind", KINDS)
def test_tensors_live_in_the_arena_and_sources_are_zeroed(kind):
    src = _weights()
    want = {k: v.clone() for k, v in src.items()}
    arena = SecureArena(1 << 20, kind=kind)
    try:
        got = arena.load(src.items())
        assert arena.kind == kind and arena.locked
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
            assert not src[k].any(), f"the heap copy of {k} was not zeroed"
        assert all(arena.contains(got[k]) for k in ("w", "b", "i"))
        assert not arena.contains(want["w"])
        assert arena.used >= sum(t.numel() * t.element_size() for t in want.values())
        # Usable as weights: compute with them in place.
        assert torch.allclose(got["w"] @ torch.ones(33), want["w"] @ torch.ones(33))
        info = arena.info()
        assert info["kind"] == kind and info["budget"] == 1 << 20 and info["dontdump"]
    finally:
        del got
        arena.close()


@needs_secret
def test_memfd_secret_is_unreadable_even_through_proc_mem():
    arena = SecureArena(1 << 16)
    plain = SecureArena(1 << 16, kind="mlock")
    try:
        s = arena.put(torch.full((16,), 3.25))
        p = plain.put(torch.full((16,), 3.25))
        # Control: locked (but ordinary) memory is readable through /proc/self/mem by its owner.
        assert _read_own_memory(p.data_ptr(), 64) == p.numpy().tobytes()
        with pytest.raises(OSError) as e:
            _read_own_memory(s.data_ptr(), 64)
        assert e.value.errno == errno.EIO
    finally:
        del s, p
        arena.close()
        plain.close()


def test_mlock_region_is_locked_and_left_out_of_core_dumps():
    arena = SecureArena(1 << 16, kind="mlock")
    try:
        t = arena.put(torch.ones(1000))
        _, _, flags = _vma(t.data_ptr())
        assert "dd" in flags, f"MADV_DONTDUMP missing: {flags}"
        assert "dc" in flags, f"MADV_DONTFORK missing: {flags}"
        assert "lo" in flags or not arena.locked, f"mlock missing: {flags}"
        # Control: an ordinary tensor's mapping carries neither flag.
        ordinary = torch.ones(1 << 20)
        _, _, heap = _vma(ordinary.data_ptr())
        assert "dd" not in heap and "lo" not in heap
    finally:
        del t
        arena.close()


@pytest.mark.parametrize("kind", KINDS)
def test_budget_refused_before_copying(kind):
    arena = SecureArena(4096, kind=kind)
    try:
        arena.put(torch.zeros(512))  # 2 KiB
        used = arena.used
        big = torch.ones(1024)  # 4 KiB more
        with pytest.raises(EnclaveError, match=r"over its budget of 4,096 bytes.*raise --budget-mib"):
            arena.put(big)
        assert arena.used == used
        with pytest.raises(EnclaveError, match="over its budget"):
            arena.load([("x", big)])
        assert big.all(), "a refused tensor must not be zeroed or copied"
    finally:
        arena.close()


def test_bad_arguments():
    with pytest.raises(EnclaveError, match="positive number of bytes"):
        SecureArena(0)
    with pytest.raises(EnclaveError, match="positive number of bytes"):
        SecureArena(1.5)  # type: ignore[arg-type]
    with pytest.raises(EnclaveError, match="memory kind 'disk'"):
        SecureArena(4096, kind="disk")
    arena = SecureArena(1 << 16, kind="mlock")
    with pytest.raises(EnclaveError, match="appears twice"):
        arena.load([("a", torch.ones(2)), ("a", torch.ones(2))])
    with pytest.raises(EnclaveError, match="only tensors"):
        arena.put(b"abc")  # type: ignore[arg-type]
    arena.close()
    with pytest.raises(EnclaveError, match="closed"):
        arena.put(torch.ones(2))


def test_close_zeroes_the_region(monkeypatch):
    arena = SecureArena(1 << 16, kind="mlock")
    t = arena.put(torch.full((256,), 7.0))
    addr = t.data_ptr()
    del t
    real, seen = secure_mem._libc, []

    class Spy:  # Look at the pages just before they are unmapped.
        def __getattr__(self, name):
            return getattr(real, name)

        def munmap(self, a, n):
            seen.append(ctypes.string_at(addr, 1024))
            return real.munmap(a, n)

    monkeypatch.setattr(secure_mem, "_libc", Spy())
    arena.close()
    assert seen == [bytes(1024)]
