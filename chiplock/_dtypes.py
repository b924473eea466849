"""Supported tensor dtypes and raw-bit views of tensors (a leaf module shared by every layer).

Transforms work on the raw bits of a tensor (an unsigned-integer view of the same width), so every dtype
round-trips bit-exactly, NaN payloads and signed zeros included. The container stores dtypes under
safetensors' names (:data:`DTYPE_NAMES`, :data:`STORED_DTYPES`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np
import torch

from chiplock.errors import UnsupportedConfig

#: Raw-bit views: torch dtype -> (unsigned numpy view dtype, order-key kind).
#: kind "float" orders by sign-magnitude, "int" by two's complement, "uint" as is.
DTYPES: dict[torch.dtype, tuple[type, str]] = {
    torch.float32: (np.uint32, "float"),
    torch.float16: (np.uint16, "float"),
    torch.bfloat16: (np.uint16, "float"),
    torch.float64: (np.uint64, "float"),
    torch.int8: (np.uint8, "int"),
    torch.int16: (np.uint16, "int"),
    torch.int32: (np.uint32, "int"),
    torch.int64: (np.uint64, "int"),
    torch.uint8: (np.uint8, "uint"),
    torch.bool: (np.uint8, "uint"),
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = (np.uint8, "float")

#: Names used in the container for each supported dtype (safetensors' spelling).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_NAMES[torch.float8_e4m3fn] = "F8_E4M3"
    DTYPE_NAMES[torch.float8_e5m2] = "F8_E5M2"
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

def check_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedConfig` for dtypes no transform handles."""
    if dtype not in DTYPES:
        raise UnsupportedConfig(f"tensors of dtype {dtype} are not supported; convert them to one of "
                                f"{', '.join(sorted(DTYPE_NAMES.values()))} before locking")


def raw_view(t: torch.Tensor) -> np.ndarray:
    """Flat unsigned-integer numpy view of ``t``'s bits (a copy only if ``t`` is not contiguous)."""
    check_dtype(t.dtype)
    if t.numel() == 0:
        return np.zeros(0, dtype=DTYPES[t.dtype][0])
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().view(DTYPES[t.dtype][0])


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _libc_madvise() if sys.platform.startswith("linux") else None
_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


def _hugepages_cheap() -> bool:
    if os.environ.get("CHIPLOCK_HUGEPAGES") != "1":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/defrag") as fh:
            policy = fh.read()
    except OSError:
        return False
    chosen = policy[policy.index("[") + 1:policy.index("]")] if "[" in policy else ""
    return chosen in ("defer", "never")


_HUGEPAGES = _hugepages_cheap()


def empty_raw(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor and a writable flat unsigned view of its memory.

    Transparent huge pages are asked for only where the kernel will not compact memory to provide them
    (``CHIPLOCK_HUGEPAGES=1`` and a ``defrag`` policy of ``defer`` or ``never``). Measured on the 2026-12 machine,
    whose policy is ``madvise``: advising huge pages made a fresh process's unlock of a 1 GB model take 1.1-1.5 s
    against 0.41-0.44 s without (direct compaction on every fault), while an earlier machine had gained from it.
    """
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and _HUGEPAGES and nbytes >= 2 * _HUGE:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        end = (out.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: failure just means small pages
    return out, out.reshape(-1).view(torch.uint8).numpy().view(DTYPES[dtype][0])


#: Stored dtypes the container reader accepts (safetensors spelling) -> item size in bytes.
STORED_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
#: safetensors names of the unsigned numpy dtypes transforms store codes in.
NUMPY_CODE_NAMES = {np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64"}
