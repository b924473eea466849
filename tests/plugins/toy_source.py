"""A toy fingerprint-source plug-in, the whole of it (docs/extending.md).

Its "measurement" is the value of ``$CHIPLOCK_TOY_ID`` (or the ``seed`` option): enough to show the interface,
worth nothing as hardware binding. It declares its key-strength group and its CLI option, so
``chiplock fingerprint --source toy --toy-seed X`` and ``key_strength`` need no change.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from chiplock.errors import FingerprintError
from chiplock.fingerprint import Enrollment, FingerprintSource, register_source
from chiplock.registry import Option


@register_source  # the one registration line
class ToySource(FingerprintSource):
    name = "toy"
    # Like precision and clock, it identifies a configuration: only the largest estimate of the group counts.
    strength_group = "configuration"
    cli_options = (Option("toy_seed", str, None, "Identity the toy source reports (default $CHIPLOCK_TOY_ID).",
                          kwarg="seed"),)

    def __init__(self, seed: str | None = None) -> None:
        self.seed = seed

    def _measure(self) -> bytes:
        seed = self.seed if self.seed is not None else os.environ.get("CHIPLOCK_TOY_ID")
        if not seed:
            raise FingerprintError("the toy source needs $CHIPLOCK_TOY_ID or seed=")
        return hashlib.sha256(b"chiplock-toy/" + seed.encode()).digest()

    def enroll(self) -> Enrollment:
        return Enrollment(source=self.name, helper={"version": 1}, material=self._measure(), entropy_bits=8.0)

    def reproduce(self, helper: dict[str, Any]) -> bytes:
        if helper != {"version": 1}:
            raise FingerprintError("toy helper data of another version; re-enroll")
        return self._measure()
