"""Clock fingerprint: how long this device takes for a fixed set of operations, relative to each other.

Each operation stresses a different part of the machine (integer and vector units, caches and memory,
SHA/AES instructions, the branch predictor through the Python interpreter, BLAS, oneDNN...). The time of one
operation depends on the clock frequency; the *ratios* between operations depend on the microarchitecture,
the memory system and the libraries' code paths. A profile is one feature per operation:
``x_i = log(q_i) - median_j log(q_j)``, where ``q_i`` is a low quantile (default the 10th percentile) of many
interleaved timings; low quantiles are what a busy machine disturbs least.

Enrollment measures the profile several times, estimates each feature's spread ``sigma_i``, and quantises it
with a bin of width ``2 * margin * sigma_i`` whose offset puts the enrolled value in the middle of its bin,
so a re-measurement changes bin only when it moves more than ``margin`` standard deviations. Bin indices are
Gray-coded (a step to the neighbouring bin flips one bit) and a BCH syndrome fuzzy extractor absorbs the rare
flips that remain.

Wrong decodes are detected. Beyond ``t`` flips BCH can miscorrect to another codeword and return a wrong key
without an error. The helper therefore holds a 16-bit *check value*, computed with Argon2id over the decoded
material; reproduction measures again (up to ``attempts`` times) until a decode passes the check, and raises
:class:`~chiplock.errors.FingerprintError` otherwise. The check costs one Argon2id per candidate and has too few
bits to single out a guess among many (see :func:`check_value`).

Honest entropy: the ratios identify a *kind* of machine (CPU model, memory, library build, configuration,
load), not one unit. Measured the way the precision source's is, by reproducing one enrollment's key in fresh
processes that play "other machines of the same kind" (:func:`cross_machine_test`), every such process
reproduced the enrolled key: what other machines of the kind do not reproduce is about nothing, so the credit
is :data:`CROSS_MACHINE_BITS` (0 bits) unless a cross-machine test on the enrolling machine measures more.
Binding a key to one unit needs the SRAM or TPM source or a vendor secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from chiplock.errors import ChiplockError, ContainerError, FingerprintError
from chiplock.fingerprint.base import Enrollment, FingerprintSource, register_source
from chiplock.registry import Option
from chiplock.fingerprint.entropy import assess
from chiplock.keys.fuzzy import CodeParams, FuzzyExtractor
from chiplock.keys.kdf import KdfParams, MasterKDF

CLOCK_VERSION = 2
#: Helper versions :meth:`ClockSource.reproduce` still reads (version 1 has no check value).
READABLE_VERSIONS = (1, 2)
#: Assumed spread of one timing ratio across machines (a factor of 4), for the within-machine estimate.
SPREAD = math.log(4.0)
MAX_BITS_PER_OP = 4
#: Bits of the Argon2id check value on the decoded material (at most 16: see :func:`check_value`).
CHECK_BITS = 16
#: Argon2id cost of the check: 64 MiB like the default master KDF, 2 passes, 1 lane (0.08-0.18 s on the 2-core
#: development VM, where the default master KDF takes 0.4-0.9 s).
CHECK_COST = {"iterations": 2, "lanes": 1, "memory_kib": 64 * 1024}
_CHECK_DOMAIN = b"chiplock/clock-check/v1"
#: Measurements :meth:`ClockSource.reproduce` takes before it gives up.
ATTEMPTS = 5
#: Credited entropy when no cross-machine test runs at enrollment: what other machines of the same kind did
#: not reproduce in ``benchmarks/fingerprint_clock.py --cross`` (every variant reproduced the enrolled key).
CROSS_MACHINE_BITS = 0.0


def _cpu_ops() -> dict[str, Callable[[], Any]]:
    """The CPU operations, each ~20-200 us, on fixed inputs (built once per measurement set)."""
    import torch
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    rng = np.random.default_rng(0)
    ints = rng.integers(0, 1 << 30, 65536, dtype=np.int64)
    f64 = rng.random(65536)
    f32 = rng.random(16384).astype(np.float32)
    l1, l1d = np.ones(2048), np.empty(2048)
    l2, l2d = np.ones(32768), np.empty(32768)
    big, bigd = np.ones(1 << 21), np.empty(1 << 18)
    idx = rng.integers(0, 1 << 21, 8192)
    ma = torch.from_numpy(rng.random((64, 64)).astype(np.float32))
    buf = rng.bytes(65536)
    zbuf = rng.integers(0, 16, 16384, dtype=np.uint8).tobytes()
    enc = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
    col = rng.random((512, 512))
    img = torch.from_numpy(rng.random((1, 8, 16, 16)).astype(np.float32))
    ker = torch.from_numpy(rng.random((8, 8, 3, 3)).astype(np.float32))
    u64 = rng.integers(0, 1 << 62, 16384, dtype=np.uint64)

    def pyloop() -> int:
        s = 0
        for i in range(1000):
            s += i * i if i & 1 else -i
        return s

    return {
        "int_sum": lambda: ints.sum(),
        "f64_sum": lambda: f64.sum(),
        "copy_l1": lambda: np.copyto(l1d, l1),
        "copy_l2": lambda: np.copyto(l2d, l2),
        "copy_dram": lambda: np.copyto(bigd, big[1 << 20:(1 << 20) + (1 << 18)]),
        "gather": lambda: big[idx].sum(),
        "sort": lambda: np.sort(f32),
        "exp": lambda: np.exp(f64[:16384]),
        "div": lambda: np.divide(f64[:16384], 1.7),
        "sin": lambda: np.sin(f64[:8192]),
        "matmul": lambda: ma @ ma,
        "conv": lambda: torch.nn.functional.conv2d(img, ker),
        "sha256": lambda: hashlib.sha256(buf).digest(),
        "md5": lambda: hashlib.md5(buf[:16384]).digest(),
        "aes": lambda: enc.update(buf),
        "zlib": lambda: zlib.compress(zbuf, 6),
        "pyloop": pyloop,
        "fft": lambda: np.fft.rfft(f64[:4096]),
        "colsum": lambda: col.sum(axis=0),
        "popcount": lambda: np.bitwise_count(u64).sum() if hasattr(np, "bitwise_count") else np.unpackbits(
            u64.view(np.uint8)).sum(),
    }


#: The most a (public, possibly crafted) helper may ask one reproduction to measure: 4x the default rounds and
#: 3x the default profiles, so a file cannot make unlock run for minutes.
MAX_ROUNDS = 400
#: The most timed operations a helper may list (the suite has a few dozen).
MAX_OPS = 256
MAX_PROFILES = 9


def cpu_timings(rounds: int = 100, warmup: int = 10) -> tuple[list[str], np.ndarray]:
    """Time every CPU operation ``rounds`` times, interleaved (round-robin), after ``warmup`` rounds.

    Returns:
        The operation names and a ``rounds x ops`` array of nanoseconds.
    """
    import torch

    ops = _cpu_ops()
    names, fns = list(ops), list(ops.values())
    out = np.empty((rounds, len(fns)))
    clock = time.perf_counter_ns
    threads = torch.get_num_threads()
    # One thread: the timings of small ops must not depend on how the scheduler spreads a thread pool.
    torch.set_num_threads(1)
    try:
        for r in range(-warmup, rounds):
            for j, fn in enumerate(fns):
                start = clock()
                fn()
                stop = clock()
                if r >= 0:
                    out[r, j] = stop - start
    finally:
        torch.set_num_threads(threads)
    return names, out


def profile_from_timings(timings: np.ndarray, quantile: float = 0.1) -> np.ndarray:
    """Features from a ``rounds x ops`` timing array: log of a low quantile, minus the median over operations.

    Taking a low quantile rejects the slow outliers (preemption, cache pollution by other processes), and
    subtracting the median removes the common clock frequency.
    """
    q = np.quantile(np.asarray(timings, dtype=np.float64), quantile, axis=0)
    if (q <= 0).any():
        raise FingerprintError("the timer returned non-positive durations; this clock cannot be measured here")
    x = np.log(q)
    return x - np.median(x)


def gray(values: np.ndarray, n_bits: np.ndarray) -> np.ndarray:
    """Concatenate the ``n_bits[i]``-bit reflected Gray codes of ``values[i] mod 2**n_bits[i]`` (MSB first)."""
    out = []
    for v, b in zip(np.asarray(values, dtype=np.int64), np.asarray(n_bits, dtype=np.int64)):
        v = int(v) % (1 << int(b))
        g = v ^ (v >> 1)
        out.extend((g >> (int(b) - 1 - k)) & 1 for k in range(int(b)))
    return np.asarray(out, dtype=np.uint8)


def quantise(x: np.ndarray, width: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bin index of each feature for bins of ``width`` starting at ``offset`` (mod ``width``)."""
    return np.floor((np.asarray(x) - np.asarray(offset)) / np.asarray(width)).astype(np.int64)


def _syndrome_params(n_bits: int, t: int) -> CodeParams:
    data_bytes = (n_bits + 7) // 8
    for m in range(5, 16):
        try:
            return CodeParams(repetition=1, bch_m=m, bch_t=t, data_bytes=data_bytes, input_bits=n_bits)
        except ValueError:
            continue
    raise FingerprintError(f"no BCH code protects {n_bits} clock bits with t={t}; lower bch_t")


def _check_params(cost: dict[str, int], salt: str | None = None) -> KdfParams:
    """Argon2id parameters of the check, validated with the master KDF's caps (a crafted file asks no more)."""
    return KdfParams.from_json({"algorithm": "argon2id", "salt": salt if salt is not None else os.urandom(16).hex(),
                                "iterations": cost["iterations"], "lanes": cost["lanes"],
                                "memory_kib": cost["memory_kib"]})


def check_value(material: bytes, params: KdfParams, bits: int = CHECK_BITS) -> bytes:
    """The helper's check on decoded clock material: the top ``bits`` of Argon2id(domain || material), 2 bytes.

    Why the check leaks no more than a guess would. (1) Cost: the value is a function of an Argon2id output, so
    testing one candidate reading costs one Argon2id with 64 MiB (the master KDF's memory); there is no cheaper
    path to it. (2) Ambiguity: a wrong candidate passes with probability ``2**-bits`` (at most 16 bits), so among
    N candidates about ``N / 2**16`` wrong ones pass too: the check shortens a list of guesses by at most 2^16
    and never singles out the right one among more than ~2^16; each survivor must still be tried against the
    file with its master Argon2id (and, for pre-aes, a model evaluation). (3) Leakage: a ``bits``-bit value
    reveals at most ``bits`` bits of the material; the within-machine estimate is charged for them. (4) Scope:
    it covers the clock material only, never a vendor secret or another source's material, so it cannot
    confirm a guess of the whole key. The BCH syndrome in the same helper already tells anyone, for free,
    whether a candidate reading is consistent; the check adds at most 16 bits of that kind, at Argon2id cost.

    Args:
        material: The fuzzy extractor's output.
        params: Salt and Argon2id cost (from the helper).
        bits: Check bits, 1..16.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16 (a longer check would confirm guesses), got {bits}")
    digest = MasterKDF(params=params).derive(_CHECK_DOMAIN + material)
    return (int.from_bytes(digest[:2], "big") >> (16 - bits)).to_bytes(2, "big")


@register_source
class ClockSource(FingerprintSource):
    """Timing profile of a fixed set of operations, quantised with enrollment-chosen bins, BCH-protected.

    Args:
        device: ``"cpu"`` (default) or ``"cuda"`` (``clock64()`` cycle counts; see
            :mod:`chiplock.fingerprint.cuda_clock`).
        rounds: Timed repetitions per operation in one profile.
        quantile: Quantile of the per-operation timings used as its time.
        enroll_profiles: Profiles measured at enrollment to estimate each feature's spread.
        reproduce_profiles: Profiles whose median is decoded at reproduction.
        margin: Distance from the enrolled value to its bin edges, in standard deviations.
        sigma_floor: Smallest spread assumed for a feature (log units). Enrollment sees a few seconds; the
            default 0.1 is the long-run spread measured over minutes on a loaded 2-core VM (2026-11-22).
        bch_t: Bit flips the BCH code corrects.
        attempts: Measurements :meth:`reproduce` takes until a decode passes the check.
        check_cost: Argon2id cost of the check value (``iterations``, ``lanes``, ``memory_kib``); default
            :data:`CHECK_COST`. Lower it only in tests: a cheap check is a cheap filter for guesses.
        cross_machine: Run :func:`cross_machine_test` at enrollment (about a minute) and credit what it measures
            instead of :data:`CROSS_MACHINE_BITS`.
        measure: Test hook: a callable returning one profile (feature vector); replaces real timing.

    Example:
        >>> src = get_source("clock")  # doctest: +SKIP
        >>> e = src.enroll(); src.reproduce(e.helper) == e.material  # doctest: +SKIP
        True
    """

    name = "clock"
    strength_group = "configuration"  # Identifies the configuration, as precision does: credited once together.
    cli_options = (Option("device", str, "cpu", "Where clock measures: cpu or cuda (auto measures the cpu).",
                          choices=("cpu", "cuda", "auto"), convert=lambda d: "cuda" if d == "cuda" else "cpu"),)

    def __init__(self, device: str = "cpu", *, rounds: int = 100, quantile: float = 0.1, enroll_profiles: int = 8,
                 reproduce_profiles: int = 3, margin: float = 4.0, sigma_floor: float = 0.1, bch_t: int = 2,
                 attempts: int = ATTEMPTS, check_cost: dict[str, int] | None = None, cross_machine: bool = False,
                 measure: Callable[[], np.ndarray] | None = None) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if rounds < 10 or not 0.0 < quantile < 1.0 or enroll_profiles < 3 or reproduce_profiles < 1:
            raise ValueError("need rounds >= 10, 0 < quantile < 1, enroll_profiles >= 3, reproduce_profiles >= 1")
        if margin <= 0 or sigma_floor <= 0 or bch_t < 1 or attempts < 1:
            raise ValueError("margin and sigma_floor must be > 0, bch_t >= 1 and attempts >= 1")
        if cross_machine and measure is not None:
            raise ValueError("cross_machine measures real timings in fresh processes; it cannot use a measure hook")
        self.check_cost = dict(CHECK_COST if check_cost is None else check_cost)
        try:
            _check_params(self.check_cost)
        except (ChiplockError, KeyError) as exc:
            raise ValueError(f"check_cost must hold iterations, lanes and memory_kib within the KDF caps ({exc})") \
                from None
        self.device, self.rounds, self.quantile = device, int(rounds), float(quantile)
        self.enroll_profiles, self.reproduce_profiles = int(enroll_profiles), int(reproduce_profiles)
        self.margin, self.sigma_floor, self.bch_t = float(margin), float(sigma_floor), int(bch_t)
        self.attempts, self.cross_machine = int(attempts), bool(cross_machine)
        self._measure = measure

    # Measurement -----------------------------------------------------------------------------------------
    def _profile(self, device: str, rounds: int, quantile: float) -> tuple[list[str] | None, np.ndarray]:
        if self._measure is not None:
            return None, np.asarray(self._measure(), dtype=np.float64)
        if device == "cuda":
            from chiplock.fingerprint.cuda_clock import cuda_timings

            names, timings = cuda_timings(rounds=rounds)
        else:
            names, timings = cpu_timings(rounds=rounds)
        return names, profile_from_timings(timings, quantile)

    def _profiles(self, count: int, device: str, rounds: int, quantile: float) -> tuple[list[str] | None, np.ndarray]:
        names, first = self._profile(device, rounds, quantile)
        rest = [self._profile(device, rounds, quantile)[1] for _ in range(count - 1)]
        return names, np.vstack([first, *rest])

    # Interface -------------------------------------------------------------------------------------------
    def enroll(self) -> Enrollment:
        start = time.perf_counter()
        names, xs = self._profiles(self.enroll_profiles, self.device, self.rounds, self.quantile)
        n_ops = xs.shape[1]
        names = names or [f"op{i}" for i in range(n_ops)]
        centre = np.median(xs, axis=0)
        sigma = np.maximum(xs.std(axis=0, ddof=1), self.sigma_floor)
        width = 2.0 * self.margin * sigma
        offset = np.mod(centre - width / 2.0, width)
        credit_per_op = np.log2(1.0 + SPREAD / width)
        n_bits = np.clip(np.ceil(credit_per_op), 1, MAX_BITS_PER_OP).astype(np.int64)
        bits = gray(quantise(centre, width, offset), n_bits)
        params = _syndrome_params(bits.size, self.bch_t)
        material, fuzzy_helper = FuzzyExtractor(params=params).generate(bits)
        check = _check_params(self.check_cost)
        # How often the enrollment profiles themselves would have landed in another bin: an in-sample BER.
        readings = np.vstack([gray(quantise(x, width, offset), n_bits) for x in xs])
        assessment = assess(bits)
        credit = float(np.minimum(credit_per_op, n_bits).sum())
        # Within one machine: bin uncertainty or SP 800-90B, less the BCH parity and the check value.
        within = max(0.0, params.remaining_entropy(min(credit, assessment.total_bits)) - CHECK_BITS)
        helper = {"version": CLOCK_VERSION, "device": self.device, "ops": names, "rounds": self.rounds,
                  "quantile": self.quantile, "profiles": self.reproduce_profiles,
                  "width": [round(float(w), 9) for w in width], "offset": [round(float(o), 9) for o in offset],
                  "bits": n_bits.tolist(), "fuzzy": fuzzy_helper,
                  "check": {"salt": check.salt.hex(), "iterations": check.iterations, "lanes": check.lanes,
                            "memory_kib": check.memory_kib, "bits": CHECK_BITS,
                            "value": check_value(material, check).hex()}}
        cross: dict[str, Any] | None = None
        cross_bits = CROSS_MACHINE_BITS
        if self.cross_machine:
            result = cross_machine_test(helper, material)
            cross, cross_bits = result.to_json(), result.credited_bits
        elapsed = time.perf_counter() - start
        return Enrollment(
            source=self.name, helper=helper, material=material, entropy_bits=min(within, cross_bits),
            info={"seconds": elapsed, "seconds_per_profile": elapsed / self.enroll_profiles,
                  "n_bits": int(bits.size), "sigma": sigma.round(4).tolist(), "credit_bits": credit,
                  "leakage_bits": params.leakage_bits, "check_bits": CHECK_BITS, "within_machine_bits": within,
                  "cross_machine_bits": cross_bits, "cross_machine": cross, "assessment": assessment.to_json(),
                  "enroll_ber": float((readings != bits).mean()), "code": params.to_json(),
                  "entropy_note": "timing identifies a kind of machine (and its load and configuration), not a "
                                  "unit: other machines of the same kind reproduce this key, so it is credited "
                                  "what they do not reproduce; bind a unit with sram, tpm or a vendor secret"})

    def _reading(self, helper: dict[str, Any], names: list[str] | None, xs: np.ndarray) -> np.ndarray:
        if names is not None and names != helper["ops"]:
            raise FingerprintError("this chiplock times a different set of operations than the one that locked "
                                   "the file; use the chiplock version that locked it")
        x = np.median(xs, axis=0)
        width, offset = np.asarray(helper["width"]), np.asarray(helper["offset"])
        if x.size != width.size:
            raise FingerprintError("the clock profile has the wrong number of features for this file; "
                                   "use the chiplock version that locked it")
        return gray(quantise(x, width, offset), np.asarray(helper["bits"]))

    def _measure_profiles(self, helper: dict[str, Any]) -> tuple[list[str] | None, np.ndarray]:
        return self._profiles(int(helper.get("profiles", 1)), helper["device"], int(helper["rounds"]),
                              float(helper["quantile"]))

    def raw_bits(self, helper: dict[str, Any]) -> np.ndarray:
        """One fresh reading of the quantised bits (secret; for local statistics and reports)."""
        self._check(helper)
        return self._reading(helper, *self._measure_profiles(helper))

    def reproduce(self, helper: dict[str, Any], *, attempts: int | None = None) -> bytes:
        """Measure until a decode passes the helper's Argon2id check; return the enrolled material.

        Each attempt measures ``helper["profiles"]`` fresh profiles and decodes their median, then (from the
        second attempt on) the median of every profile measured so far, which outvotes a burst of load. A
        decode failure or a decode that fails the check is followed by another attempt.

        Raises:
            FingerprintError: No decode passed in ``attempts`` measurements (too noisy now, or another kind of
                machine), or the helper is damaged or from another version.
        """
        check = self._check(helper)
        attempts = self.attempts if attempts is None else int(attempts)
        fuzzy = helper["fuzzy"]
        extractor = FuzzyExtractor.from_helper(fuzzy)
        pooled: list[np.ndarray] = []
        for _ in range(attempts):
            names, xs = self._measure_profiles(helper)
            pooled.append(xs)
            candidates = [self._reading(helper, names, xs)]
            if len(pooled) > 1:
                candidates.append(self._reading(helper, names, np.vstack(pooled)))
            tried: set[bytes] = set()
            for bits in candidates:
                if bits.tobytes() in tried:
                    continue
                tried.add(bits.tobytes())
                try:
                    material = extractor.reproduce(bits, fuzzy)
                except FingerprintError as exc:
                    # A burst of load can push a profile past the margins; decoding failure is detected, so
                    # measure again. Other errors (a damaged helper) do not improve with time.
                    if "enrolled" not in str(exc):
                        raise
                    continue
                if check is None:  # A version-1 helper has no check: its first decode is all there is.
                    return material
                params, n_bits, value = check
                # BCH beyond t flips can miscorrect to another codeword; the check catches that at the cost of
                # one Argon2id, and the next attempt measures again.
                if hmac.compare_digest(check_value(material, params, n_bits), value):
                    return material
        raise FingerprintError(f"the clock timing did not reproduce the enrolled key in {attempts} measurements: "
                               "the machine is too busy or noisy now (retry on an idle machine), or this is not "
                               "the kind of machine, configuration or load that locked the file")

    @staticmethod
    def _check(helper: dict[str, Any]) -> tuple[KdfParams, int, bytes] | None:
        """Validate the helper; return its check (Argon2id parameters, bits, value), or None for version 1."""
        keys = ("device", "ops", "rounds", "quantile", "width", "offset", "bits", "fuzzy")
        if (not isinstance(helper, dict) or helper.get("version") not in READABLE_VERSIONS
                or any(k not in helper for k in keys)):
            raise FingerprintError("the clock helper data has an unknown version or is damaged; upgrade chiplock "
                                   "or obtain a fresh copy of the file")
        r, q, n = helper["rounds"], helper["quantile"], helper.get("profiles", 1)
        # Measurement sizes come from a public, possibly crafted file: bounded, so it cannot make unlock hang.
        if (helper["device"] not in ("cpu", "cuda") or type(r) is not int or not 1 <= r <= MAX_ROUNDS
                or type(n) is not int or not 1 <= n <= MAX_PROFILES
                or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0):
            raise FingerprintError("the clock helper data is damaged (measurement sizes out of range); obtain a "
                                   "fresh copy of the file")
        ops, width, offset, bits = helper["ops"], helper["width"], helper["offset"], helper["bits"]
        # The per-feature lists size the bit string (and its BCH code) built from them: bounded and typed before
        # any measurement, so a crafted helper costs no more than an honest one.
        if not (isinstance(ops, list) and 1 <= len(ops) <= MAX_OPS
                and all(isinstance(x, list) and len(x) == len(ops) for x in (width, offset, bits))
                and all(type(b) is int and 1 <= b <= MAX_BITS_PER_OP for b in bits)
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < 1e6 for w in width)
                and all(isinstance(o, (int, float)) and not isinstance(o, bool) and abs(o) < 1e6 for o in offset)):
            raise FingerprintError("the clock helper data is damaged (feature lists out of range); obtain a fresh "
                                   "copy of the file")
        if helper["device"] == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise FingerprintError("this file's clock fingerprint was enrolled on a CUDA GPU and none is usable "
                                       "here; run on the enrolled GPU machine")
        if helper["version"] == 1:
            return None
        try:
            c = helper["check"]
            params, n_bits, value = _check_params(c, str(c["salt"])), int(c["bits"]), bytes.fromhex(c["value"])
            if not 1 <= n_bits <= CHECK_BITS or len(value) != 2:
                raise ValueError("check bits or value out of range")
        except (ContainerError, KeyError, TypeError, ValueError, AttributeError):
            raise FingerprintError("the clock helper's check value is damaged or asks for more than chiplock's "
                                   "Argon2id caps; obtain a fresh copy of the file") from None
        return params, n_bits, value


# Cross-machine test ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One simulated "other machine of the same kind": a fresh process with another configuration or load.

    Attributes:
        name: Label for reports.
        env: Environment variables set in the process.
        cpus: CPUs the process is pinned to (``None``: all it may use).
        busy_cpu: A CPU kept busy by a spinning process while the variant runs (``None``: none).
    """

    name: str
    env: dict[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] | None = None
    busy_cpu: int | None = None


def _npy_dispatch_features() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy < 2 or another layout: leave the variable out.
        return ""
    return " ".join(__cpu_dispatch__)


def default_variants() -> list[Variant]:
    """The configurations an attacker reaches in software on a machine of this kind (issue 8, finding 6).

    Thread counts, one-core affinity, a busy loop on the other core or the same one, and each instruction-set
    limit the libraries honour (torch ``ATEN_CPU_CAPABILITY``, numpy ``NPY_DISABLE_CPU_FEATURES``, oneDNN,
    OpenBLAS, MKL, glibc's libm), alone and together: the variables :mod:`chiplock.fingerprint.configurations`
    enumerates for the precision source, at their most restrictive setting.
    """
    cpus = sorted(os.sched_getaffinity(0))
    first, last = cpus[0], cpus[-1]
    isa = {"ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": _npy_dispatch_features(),
           "ONEDNN_MAX_CPU_ISA": "SSE41", "ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "OPENBLAS_CORETYPE": "Prescott",
           "MKL_CBWR": "COMPATIBLE", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
           "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA"}
    isa = {k: v for k, v in isa.items() if v}

    def threads(n: int) -> dict[str, str]:
        return {k: str(n) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

    return [Variant("fresh process"), Variant("1 thread", threads(1)), Variant("8 threads", threads(8)),
            Variant(f"pinned to cpu {first}", cpus=(first,)), Variant(f"pinned to cpu {last}", cpus=(last,)),
            Variant(f"pinned to cpu {first}, busy loop on cpu {last}", cpus=(first,), busy_cpu=last),
            Variant(f"pinned to cpu {first}, busy loop on the same cpu", cpus=(first,), busy_cpu=first),
            *(Variant(f"{k}={v}", {k: v}) for k, v in isa.items()), Variant("every ISA limit at once", isa)]


@dataclass(frozen=True)
class CrossMachineResult:
    """What simulated other machines of the same kind reproduced from one enrollment's helper.

    Attributes:
        outcomes: Variant name -> ``"enrolled key"``, ``"other key N"`` or ``"failed: <reason>"``.
        distinct_keys: Distinct keys among the enrolled one and every variant's.
    """

    outcomes: dict[str, str]
    distinct_keys: int

    @property
    def reproduced(self) -> int:
        """Variants that reproduced the enrolled key."""
        return sum(v == "enrolled key" for v in self.outcomes.values())

    @property
    def credited_bits(self) -> float:
        """``log2(distinct_keys)``: the keys an attacker enumerating these configurations must try.

        Variants that fail are not counted: failing leaves the key no harder to reach from those that succeed.
        When every variant reproduces the enrolled key, the credit is 0 bits.
        """
        return math.log2(max(1, self.distinct_keys))

    def to_json(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes), "distinct_keys": self.distinct_keys, "reproduced": self.reproduced,
                "variants": len(self.outcomes), "credited_bits": self.credited_bits}


_CHILD = r"""
import hashlib, json, os, sys
cpus = json.loads(sys.argv[2])
if cpus:
    os.sched_setaffinity(0, cpus)
from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
helper = json.load(open(sys.argv[1]))
try:
    material = get_source("clock", device=helper["device"]).reproduce(helper)
    print(json.dumps({"key": hashlib.sha256(b"chiplock/clock-cross/v1" + material).hexdigest()}))
except FingerprintError as exc:
    print(json.dumps({"error": str(exc)[:120]}))
"""

_BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@contextlib.contextmanager
def busy_cpu(cpu: int | None) -> Iterator[None]:
    """Keep CPU ``cpu`` busy with a spinning process for the duration of the block (``None``: do nothing)."""
    busy = None if cpu is None else subprocess.Popen([sys.executable, "-c", _BUSY, str(cpu)])
    try:
        yield
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def _run_variant(variant: Variant, helper_path: Path, timeout: float) -> dict[str, str]:
    try:
        with busy_cpu(variant.busy_cpu):
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(helper_path), json.dumps(variant.cpus or [])],
                                  capture_output=True, text=True, timeout=timeout, env={**os.environ, **variant.env})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"process exited with code {proc.returncode}: {tail[:120]}"}
    return json.loads(lines[-1])


def cross_machine_test(helper: dict[str, Any], material: bytes, *, variants: Sequence[Variant] | None = None,
                       timeout: float = 300.0) -> CrossMachineResult:
    """Reproduce one enrollment in fresh processes that simulate other machines of the same kind.

    The entropy a timing key is worth against an attacker who owns a machine of the same kind is what such
    machines do *not* reproduce: this counts the distinct keys they give back (the same way the precision
    source counts the fingerprints of software-reachable configurations). Children get the public helper only
    and return a hash of what they reproduce; nothing secret leaves this process.

    Args:
        helper: The enrollment's public helper.
        material: The enrollment's material (compared here, never passed on).
        variants: Configurations to try; default :func:`default_variants`.
        timeout: Seconds per variant.

    Returns:
        A :class:`CrossMachineResult`; ``credited_bits`` is the figure to credit.

    Example:
        >>> e = get_source("clock").enroll()  # doctest: +SKIP
        >>> cross_machine_test(e.helper, e.material).credited_bits  # doctest: +SKIP
        0.0
    """
    enrolled = hashlib.sha256(b"chiplock/clock-cross/v1" + material).hexdigest()
    keys = [enrolled]
    outcomes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        helper_path = Path(tmp) / "helper.json"
        helper_path.write_text(json.dumps(helper))
        for variant in (default_variants() if variants is None else variants):
            result = _run_variant(variant, helper_path, timeout)
            if "key" not in result:
                outcomes[variant.name] = f"failed: {result.get('error', 'no result')}"
                continue
            if result["key"] not in keys:
                keys.append(result["key"])
            index = keys.index(result["key"])
            outcomes[variant.name] = "enrolled key" if index == 0 else f"other key {index}"
    return CrossMachineResult(outcomes=outcomes, distinct_keys=len(keys))
