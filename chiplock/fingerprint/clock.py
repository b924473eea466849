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
flips that remain. Reproduction takes the median of a few profiles, and measures once more if decoding fails.

Honest entropy: the ratios identify a *kind* of machine (CPU model, memory, library build, configuration)
far more than one unit, and an attacker can measure the same model. The credited entropy is the smaller of
(a) the bin-index uncertainty if each feature ranged over a factor of ``SPREAD`` across machines and (b) the
SP 800-90B non-IID estimate on the bits, minus the BCH parity the helper reveals. It is small by nature.
"""

from __future__ import annotations

import hashlib
import math
import time
import zlib
from typing import Any, Callable

import numpy as np

from chiplock.errors import FingerprintError
from chiplock.fingerprint.base import Enrollment, FingerprintSource, register_source
from chiplock.fingerprint.entropy import assess
from chiplock.keys.fuzzy import CodeParams, FuzzyExtractor

CLOCK_VERSION = 1
#: Assumed spread of one timing ratio across machines (a factor of 4), for the entropy credit.
SPREAD = math.log(4.0)
MAX_BITS_PER_OP = 4


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
        measure: Test hook: a callable returning one profile (feature vector); replaces real timing.

    Example:
        >>> src = get_source("clock")  # doctest: +SKIP
        >>> e = src.enroll(); src.reproduce(e.helper) == e.material  # doctest: +SKIP
        True
    """

    name = "clock"

    def __init__(self, device: str = "cpu", *, rounds: int = 100, quantile: float = 0.1, enroll_profiles: int = 8,
                 reproduce_profiles: int = 3, margin: float = 4.0, sigma_floor: float = 0.1, bch_t: int = 2,
                 measure: Callable[[], np.ndarray] | None = None) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if rounds < 10 or not 0.0 < quantile < 1.0 or enroll_profiles < 3 or reproduce_profiles < 1:
            raise ValueError("need rounds >= 10, 0 < quantile < 1, enroll_profiles >= 3, reproduce_profiles >= 1")
        if margin <= 0 or sigma_floor <= 0 or bch_t < 1:
            raise ValueError("margin and sigma_floor must be > 0 and bch_t >= 1")
        self.device, self.rounds, self.quantile = device, int(rounds), float(quantile)
        self.enroll_profiles, self.reproduce_profiles = int(enroll_profiles), int(reproduce_profiles)
        self.margin, self.sigma_floor, self.bch_t = float(margin), float(sigma_floor), int(bch_t)
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
        # How often the enrollment profiles themselves would have landed in another bin: an in-sample BER.
        readings = np.vstack([gray(quantise(x, width, offset), n_bits) for x in xs])
        assessment = assess(bits)
        credit = float(np.minimum(credit_per_op, n_bits).sum())
        entropy = params.remaining_entropy(min(credit, assessment.total_bits))
        helper = {"version": CLOCK_VERSION, "device": self.device, "ops": names, "rounds": self.rounds,
                  "quantile": self.quantile, "profiles": self.reproduce_profiles,
                  "width": [round(float(w), 9) for w in width], "offset": [round(float(o), 9) for o in offset],
                  "bits": n_bits.tolist(), "fuzzy": fuzzy_helper}
        elapsed = time.perf_counter() - start
        return Enrollment(
            source=self.name, helper=helper, material=material, entropy_bits=entropy,
            info={"seconds": elapsed, "seconds_per_profile": elapsed / self.enroll_profiles,
                  "n_bits": int(bits.size), "sigma": sigma.round(4).tolist(), "credit_bits": credit,
                  "leakage_bits": params.leakage_bits, "assessment": assessment.to_json(),
                  "enroll_ber": float((readings != bits).mean()), "code": params.to_json(),
                  "entropy_note": "timing ratios identify a kind of machine more than a unit; an attacker "
                                  "with the same CPU model and libraries may reproduce most bits"})

    def raw_bits(self, helper: dict[str, Any]) -> np.ndarray:
        """One fresh reading of the quantised bits (secret; for local statistics and reports)."""
        self._check(helper)
        names, xs = self._profiles(int(helper.get("profiles", 1)), helper["device"], int(helper["rounds"]),
                                   float(helper["quantile"]))
        if names is not None and names != helper["ops"]:
            raise FingerprintError("this chiplock times a different set of operations than the one that locked "
                                   "the file; use the chiplock version that locked it")
        x = np.median(xs, axis=0)
        width, offset = np.asarray(helper["width"]), np.asarray(helper["offset"])
        if x.size != width.size:
            raise FingerprintError("the clock profile has the wrong number of features for this file; "
                                   "use the chiplock version that locked it")
        return gray(quantise(x, width, offset), np.asarray(helper["bits"]))

    def reproduce(self, helper: dict[str, Any], *, attempts: int = 3) -> bytes:
        fuzzy = helper.get("fuzzy") if isinstance(helper, dict) else None
        for attempt in range(attempts):
            try:
                bits = self.raw_bits(helper)
                return FuzzyExtractor.from_helper(fuzzy).reproduce(bits, fuzzy)
            except FingerprintError as exc:
                # A burst of load can push a profile past the margins; decoding failure is detected, so measure
                # again. Other errors (wrong version, missing GPU) do not improve with time.
                if "enrolled" not in str(exc) or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _check(helper: dict[str, Any]) -> None:
        keys = ("device", "ops", "rounds", "quantile", "width", "offset", "bits", "fuzzy")
        if not isinstance(helper, dict) or helper.get("version") != CLOCK_VERSION or any(k not in helper for k in keys):
            raise FingerprintError("the clock helper data has an unknown version or is damaged; upgrade chiplock "
                                   "or obtain a fresh copy of the file")
        if helper["device"] == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise FingerprintError("this file's clock fingerprint was enrolled on a CUDA GPU and none is usable "
                                       "here; run on the enrolled GPU machine")
