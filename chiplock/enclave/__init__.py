"""Secure-world executor: partitioned models whose secure part runs in a hardened, isolated process.

A model is split by a strategy (:data:`STRATEGIES`: all-out, last-k / DarkneTZ, first-k / Serdab, shadownet,
teeslice, all-in) into a public part the host runs and a secure part only the executor holds
(:func:`split`); :func:`chiplock.enclave.package.package` locks both into one container whose ``enclave`` group only the executor's
licence opens; :class:`Enclave` starts (or connects to) the executor, and :class:`HostModel` runs the whole model
through it. See docs/enclave.md for the threat model and the measured leaks and costs.

Example:
    >>> import torch
    >>> from chiplock.enclave import NetSpec, build, split, HostModel, LocalCall, build_secure
    >>> p = split(build(NetSpec(image=8, widths=(4, 8))), "last-k", k=1)
    >>> HostModel(p.spec, p.public, LocalCall(build_secure(p.spec, p.secure)))(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

from chiplock.enclave.models import NetSpec, SeqNet, TeeSliceNet, build
from chiplock.enclave.partition import STRATEGIES, HostModel, LocalCall, Partition, SecurePart, build_secure, split

# The container side lives in chiplock.enclave.package (package, issue, load_host, load_secure): not re-exported
# here, where the function `package` would shadow its module.
__all__ = ["STRATEGIES", "Enclave", "HostModel", "LocalCall", "NetSpec", "Partition", "SecurePart", "SeqNet",
           "TeeSliceNet", "build", "build_secure", "split"]


def __getattr__(name: str) -> Any:
    # The executor module is imported only when used, so `python -m chiplock.enclave.executor` does not find it
    # already imported by this package (runpy would warn).
    if name == "Enclave":
        from chiplock.enclave.executor import Enclave

        return Enclave
    raise AttributeError(f"module 'chiplock.enclave' has no attribute {name!r}")
