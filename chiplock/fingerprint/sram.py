"""SRAM-PUF fingerprint: the power-up state of SRAM cells, made stable by a fuzzy extractor.

Each SRAM cell settles to 0 or 1 at power-up according to tiny manufacturing mismatches, so a dump of
uninitialised SRAM is a physical unclonable function: mostly the same on one chip, unrelated between chips,
with a few percent to ~15 % of cells flipping between power-ups. User space cannot read that state on ordinary
machines (firmware clears or hides it), so chiplock reads a **dump file** that the user or the board's firmware
provides, or a **simulated PUF** for tests and demos.

Where the reading comes from (never stored in the container: it is what makes the device the device):

* a dump: ``get_source("sram", path="dump.bin")`` or ``CHIPLOCK_SRAM_DUMP=dump.bin``. Enrollment may be given
  several dumps of power-ups (``path=[a, b, c]``); it majority-votes them into the reference reading.
* a simulated device: ``get_source("sram", simulate="board-17")`` or ``CHIPLOCK_SRAM_SIM_DEVICE=board-17``.
  The device bits are SHAKE-256 of the device name (fixed per device, independent between devices); each
  read flips every bit independently with probability ``noise`` (``CHIPLOCK_SRAM_SIM_NOISE``, default 0.10).
  The helper records only that the reading was simulated and its size, not which device.

The reading's min-entropy per bit is assessed with the SP 800-90B estimators (IID track when the cells pass
the independence screen), the code is sized by :meth:`CodeParams.design` for the design bit-error rate
(default 15 %), and the reported entropy is what remains after the helper data's leakage.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chiplock.errors import FingerprintError
from chiplock.fingerprint.base import Enrollment, FingerprintSource, register_source
from chiplock.registry import Option
from chiplock.fingerprint.entropy import assess
from chiplock.keys.fuzzy import CodeParams, FuzzyExtractor

SRAM_VERSION = 1
ENV_DUMP = "CHIPLOCK_SRAM_DUMP"
ENV_SIM_DEVICE = "CHIPLOCK_SRAM_SIM_DEVICE"
ENV_SIM_NOISE = "CHIPLOCK_SRAM_SIM_NOISE"
MAX_DUMP_BYTES = 64 << 20

#: The largest SRAM region a helper may ask to read or simulate (16 MiB; real SRAM-PUF dumps are KiB to MiB).
MAX_SIM_BYTES = 16 << 20


def simulated_device_bits(device: str, n_bytes: int) -> np.ndarray:
    """The noise-free power-up bits of simulated device ``device`` (``n_bytes * 8`` bits)."""
    stream = hashlib.shake_256(b"chiplock/sram-sim/v1\0" + device.encode("utf-8")).digest(n_bytes)
    return np.unpackbits(np.frombuffer(stream, np.uint8))


@register_source
class SramSource(FingerprintSource):
    """SRAM power-up state (from a dump or a simulated PUF) through a fuzzy extractor.

    Args:
        path: Dump file (or, for enrollment, several dumps of separate power-ups). Default: ``$CHIPLOCK_SRAM_DUMP``.
        simulate: Name of a simulated device. Default: ``$CHIPLOCK_SRAM_SIM_DEVICE``. Ignored when a path is given.
        noise: Per-read flip probability of the simulated device (default ``$CHIPLOCK_SRAM_SIM_NOISE`` or 0.10).
        ber: Design bit-error rate between the enrolled reading and a fresh one.
        key_bits: Entropy the key must keep after the helper's leakage.
        failure: Acceptable probability that a genuine re-reading fails.
        offset: Byte offset of the cells used inside the dump.
        enroll_reads: Simulated reads majority-voted into the enrolled reading.
        sim_bytes: Size of the simulated SRAM.
        read_seed: Seed of the simulated read noise (tests only; default: fresh OS randomness per read).

    Example:
        >>> src = get_source("sram", simulate="board-17")  # doctest: +SKIP
        >>> e = src.enroll(); src.reproduce(e.helper) == e.material  # doctest: +SKIP
        True
    """

    name = "sram"
    cli_options = (Option("sram_dump", Path, None,
                          "SRAM dump file for the sram source (default $CHIPLOCK_SRAM_DUMP).", kwarg="path"),
                   Option("sram_sim", str, None, "Simulated SRAM device name for the sram source "
                          "(default $CHIPLOCK_SRAM_SIM_DEVICE).", kwarg="simulate"))

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                 simulate: str | None = None, noise: float | None = None, ber: float = 0.15,
                 key_bits: int = 128, failure: float = 1e-6, offset: int = 0, enroll_reads: int = 15,
                 sim_bytes: int = 32768, read_seed: int | None = None) -> None:
        path = path if path is not None else os.environ.get(ENV_DUMP) or None
        if path is None:
            self.paths: list[str] = []
        elif isinstance(path, (str, os.PathLike)):
            self.paths = [os.fspath(path)]
        else:
            self.paths = [os.fspath(p) for p in path]
        self.simulate = simulate if simulate is not None else os.environ.get(ENV_SIM_DEVICE) or None
        noise = float(noise if noise is not None else os.environ.get(ENV_SIM_NOISE, 0.10))
        if not 0.0 <= noise < 0.5:
            raise ValueError(f"noise must be in [0, 0.5), got {noise}; PUF reads flip 5-15 % of bits")
        if not 0.0 <= ber < 0.5:
            raise ValueError(f"ber must be in [0, 0.5), got {ber}")
        if offset < 0 or enroll_reads < 1 or sim_bytes < 64:
            raise ValueError("offset must be >= 0, enroll_reads >= 1 and sim_bytes >= 64")
        self.noise, self.ber, self.key_bits, self.failure = noise, ber, int(key_bits), float(failure)
        self.offset, self.enroll_reads, self.sim_bytes = int(offset), int(enroll_reads), int(sim_bytes)
        self._rng = np.random.default_rng(read_seed)

    # Readings --------------------------------------------------------------------------------------------
    def _mode(self) -> str:
        if self.paths:
            return "dump"
        if self.simulate:
            return "simulated"
        raise FingerprintError(f"no SRAM reading: pass path=DUMP or set {ENV_DUMP} to a dump of this device's "
                               f"power-up SRAM, or for a simulated PUF pass simulate=NAME or set {ENV_SIM_DEVICE}")

    def _read_dump(self, path: str) -> np.ndarray:
        try:
            size = os.path.getsize(path)
            if size > MAX_DUMP_BYTES:
                raise FingerprintError(f"SRAM dump {path!r} is {size} bytes; chiplock reads at most "
                                       f"{MAX_DUMP_BYTES}: cut it to the uninitialised region")
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise FingerprintError(f"cannot read SRAM dump {path!r} ({exc.strerror or type(exc).__name__}); "
                                   f"check the path given with path= or {ENV_DUMP}") from None
        return np.unpackbits(np.frombuffer(data, np.uint8))

    def read(self, mode: str, n_bytes: int | None = None) -> np.ndarray:
        """One fresh reading of the whole SRAM region (bits). Public for reports; its bits are secret."""
        if mode == "dump":
            if not self.paths:
                raise FingerprintError(f"this file was locked to an SRAM dump: pass path=DUMP or set {ENV_DUMP}")
            return self._read_dump(self.paths[0])
        if not self.simulate:
            raise FingerprintError(f"this file was locked to a simulated SRAM PUF: set {ENV_SIM_DEVICE} to the "
                                   "simulated device's name (or pass simulate=NAME)")
        bits = simulated_device_bits(self.simulate, n_bytes or self.sim_bytes)
        return bits ^ (self._rng.random(bits.size) < self.noise).astype(np.uint8)

    def _enrolled_reading(self, mode: str) -> np.ndarray:
        if mode == "dump":
            reads = [self._read_dump(p) for p in self.paths]
        else:
            reads = [self.read(mode) for _ in range(self.enroll_reads)]
        if len({r.size for r in reads}) != 1:
            raise FingerprintError("the SRAM dumps given for enrollment differ in size; dump the same region each time")
        # Majority vote over power-ups estimates each cell's preferred value (ties, with an even count, go to 1).
        return (np.mean(reads, axis=0) >= 0.5).astype(np.uint8)

    # Interface -------------------------------------------------------------------------------------------
    def enroll(self) -> Enrollment:
        start = time.perf_counter()
        mode = self._mode()
        reference = self._enrolled_reading(mode)
        region = reference[8 * self.offset:]
        assessment = assess(region, allow_iid=True)
        # Round the per-bit entropy down to a 0.005 grid: conservative, and it lets code designs be cached.
        h = math.floor(assessment.min_entropy * 200) / 200
        try:
            params = CodeParams.design(ber=self.ber, key_bits=self.key_bits, failure=self.failure,
                                       entropy_per_bit=max(h, 0.005))
        except ValueError as exc:
            raise FingerprintError(f"the SRAM reading is too weak for a {self.key_bits}-bit key at a {self.ber:.0%} "
                                   f"design bit-error rate ({exc}); lower key_bits or ber, or use a better dump") from None
        if params.input_bits > region.size:
            raise FingerprintError(f"the SRAM region has {region.size} bits but the code needs {params.input_bits}; "
                                   "give a larger dump, a smaller offset, or lower key_bits")
        w = region[: params.input_bits]
        material, fuzzy_helper = FuzzyExtractor(params=params).generate(w)
        helper = {"version": SRAM_VERSION, "mode": mode, "offset": self.offset, "fuzzy": fuzzy_helper}
        if mode == "simulated":
            helper["sim_bytes"] = self.sim_bytes
        design_entropy = params.remaining_entropy(h * params.input_bits)
        # A simulated PUF's bits are a function of its device name (CHIPLOCK_SRAM_SIM_DEVICE): anyone who sets the
        # same name has "the same hardware". It models a real PUF's noise and code design (the design figure is
        # kept in info), but it binds nothing, so the key policy credits it nothing.
        entropy = 0.0 if mode == "simulated" else design_entropy
        return Enrollment(
            source=self.name, helper=helper, material=material, entropy_bits=entropy,
            info={"design_entropy_bits": design_entropy,
                  "mode": mode, "seconds": time.perf_counter() - start, "code": params.to_json(),
                  "code_bits": params.input_bits, "leakage_bits": params.leakage_bits,
                  "entropy_per_bit": h, "assessment": assessment.to_json(), "design_ber": self.ber,
                  "failure_analytic": params.failure_probability(self.ber),
                  "enroll_reads": len(self.paths) if mode == "dump" else self.enroll_reads})

    def raw_bits(self, helper: dict[str, Any]) -> np.ndarray:
        """A fresh reading of exactly the bits the helper's code consumes (secret; for local statistics)."""
        self._check(helper)
        params = CodeParams.from_json(helper["fuzzy"].get("params", {}))
        region = self.read(helper["mode"], helper.get("sim_bytes"))[8 * int(helper.get("offset", 0)):]
        if region.size < params.input_bits:
            raise FingerprintError(f"the SRAM reading has {region.size} bits past the offset but the file needs "
                                   f"{params.input_bits}; dump the same region as at enrollment")
        return region[: params.input_bits]

    def reproduce(self, helper: dict[str, Any]) -> bytes:
        bits = self.raw_bits(helper)
        return FuzzyExtractor.from_helper(helper["fuzzy"]).reproduce(bits, helper["fuzzy"])

    @staticmethod
    def _check(helper: dict[str, Any]) -> None:
        if not isinstance(helper, dict) or helper.get("version") != SRAM_VERSION or "fuzzy" not in helper:
            raise FingerprintError("the SRAM helper data has an unknown version or is damaged; upgrade chiplock "
                                   "or obtain a fresh copy of the file")
        if helper.get("mode") not in ("dump", "simulated"):
            raise FingerprintError("the SRAM helper data names an unknown reading mode; upgrade chiplock")
        # Sizes come from a public, possibly crafted file: bound them before any reading or allocation.
        sim, offset = helper.get("sim_bytes", 64), helper.get("offset", 0)
        if (not isinstance(helper["fuzzy"], dict) or type(sim) is not int or not 64 <= sim <= MAX_SIM_BYTES
                or type(offset) is not int or not 0 <= offset <= MAX_SIM_BYTES):
            raise FingerprintError("the SRAM helper data is damaged (sizes out of range); obtain a fresh copy")
