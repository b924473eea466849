"""Entropy and stability measures for fingerprint bits (numpy only).

The three min-entropy estimators follow NIST SP 800-90B (January 2018), section 6.3, for binary samples:

* most-common-value (6.3.1): the upper 99 % confidence bound on the most likely symbol's probability;
* collision (6.3.2): the mean time until two successive samples repeat, inverted for the bias;
* Markov (6.3.3): the most likely 128-bit path under a first-order Markov model fitted to the samples.

Each returns min-entropy **per bit**. On the non-IID track the assessed figure is the minimum of the three; on
the IID track (bits independent by construction, and :func:`iid_plausible` finds no dependence) it is the MCV
estimate alone, as in SP 800-90B section 3.1.3. The collision estimate is very conservative for binary data
(about 0.85 bits per bit on 100,000 fair coin flips), so the track matters. They measure how
unpredictable the bits are *as a sequence from one source*: for a fingerprint that is the entropy within the
device's reading, which bounds (from above) what an attacker who cannot measure the device faces. The
estimators' confidence bounds make them conservative on short samples (a few hundred bits lose several
percent per bit).

Also here: bit-error rate between an enrolled reading and re-readings, and per-bit flip rates.

Example:
    >>> import numpy as np
    >>> bits = np.random.default_rng(0).integers(0, 2, 100_000, dtype=np.uint8)
    >>> round(assess(bits).min_entropy, 2)  # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_Z = 2.576  # The 99 % two-sided normal quantile that SP 800-90B uses for its confidence bounds.
#: Samples below which the collision estimate is reported but not used (see EntropyAssessment.non_iid).
COLLISION_MIN_BITS = 1000


def _bits(bits: np.ndarray, minimum: int = 2) -> np.ndarray:
    b = np.asarray(bits).astype(np.uint8).ravel()
    if b.size < minimum or (b > 1).any():
        raise ValueError(f"need at least {minimum} samples of 0/1 bits, got {b.size} (max value {b.max(initial=0)})")
    return b


def most_common_value(bits: np.ndarray) -> float:
    """SP 800-90B 6.3.1: min-entropy per bit from the most common value's upper confidence bound."""
    b = _bits(bits)
    n = b.size
    p_hat = max(b.mean(), 1.0 - b.mean())
    p_u = min(1.0, p_hat + _Z * math.sqrt(p_hat * (1.0 - p_hat) / (n - 1)))
    return -math.log2(p_u)


def collision(bits: np.ndarray) -> float:
    """SP 800-90B 6.3.2 (binary only): min-entropy per bit from the mean collision time.

    Walk the sequence: if the next two bits are equal, that is a collision after 2 samples, else after 3
    (a third bit always equals one of two different bits). ``E[t] = 2 + 2p(1-p)`` for bias ``p``.
    """
    b = _bits(bits, minimum=6)
    # The walk is sequential; a list of Python bools keeps it at ~0.1 s per million bits.
    eq = (b[:-1] == b[1:]).tolist()
    times = []
    i, n = 0, b.size
    while i + 1 < n:
        if eq[i]:
            times.append(2)
            i += 2
        elif i + 2 < n:
            times.append(3)
            i += 3
        else:
            break
    t = np.asarray(times, dtype=np.float64)
    v = t.size
    if v < 2:
        raise ValueError("too few samples for the collision estimate; pass more bits")
    mean_lo = t.mean() - _Z * t.std(ddof=1) / math.sqrt(v)
    disc = 1.25 - 0.5 * mean_lo
    p = 0.5 + math.sqrt(disc) if disc > 0 else 0.5
    return -math.log2(min(p, 1.0))


def markov(bits: np.ndarray) -> float:
    """SP 800-90B 6.3.3 (binary): min-entropy per bit of the most likely 128-bit first-order Markov path."""
    b = _bits(bits, minimum=3)
    p1 = float(b.mean())
    p0 = 1.0 - p1
    prev, nxt = b[:-1], b[1:]
    counts = np.zeros((2, 2))
    np.add.at(counts, (prev, nxt), 1)
    rows = counts.sum(axis=1, keepdims=True)
    # A state never left has no observed transitions; treat both as possible with certainty (worst case).
    trans = np.divide(counts, rows, out=np.ones((2, 2)), where=rows > 0)
    p00, p01, p10, p11 = trans[0, 0], trans[0, 1], trans[1, 0], trans[1, 1]
    with np.errstate(divide="ignore"):
        logs = [
            math.log2(p0) + 127 * math.log2(p00) if p0 > 0 and p00 > 0 else -math.inf,
            math.log2(p0) + 64 * math.log2(p01) + 63 * math.log2(p10) if p0 > 0 and p01 > 0 and p10 > 0 else -math.inf,
            math.log2(p0) + math.log2(p01) + 126 * math.log2(p11) if p0 > 0 and p01 > 0 and p11 > 0 else -math.inf,
            math.log2(p1) + math.log2(p10) + 126 * math.log2(p00) if p1 > 0 and p10 > 0 and p00 > 0 else -math.inf,
            math.log2(p1) + 64 * math.log2(p10) + 63 * math.log2(p01) if p1 > 0 and p10 > 0 and p01 > 0 else -math.inf,
            math.log2(p1) + 127 * math.log2(p11) if p1 > 0 and p11 > 0 else -math.inf,
        ]
    return min(-max(logs) / 128.0, 1.0)


def iid_plausible(bits: np.ndarray, *, alpha: float = 0.001) -> bool:
    """A light screen for independence: chi-square tests of each bit against the bits 1, 2 and 8 places later.

    SP 800-90B (section 5) uses a battery of permutation tests before it takes the IID track; this screen is
    much weaker (it catches bias that depends on neighbours and byte structure, nothing subtler). Use it only
    for bits that are independent by construction or by physics (SRAM cells), and report the non-IID figure too.
    """
    from scipy.stats import chi2_contingency

    b = _bits(bits, minimum=64)
    for lag in (1, 2, 8):
        table = np.zeros((2, 2))
        np.add.at(table, (b[:-lag], b[lag:]), 1)
        if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
            return False
        if chi2_contingency(table, correction=False)[1] < alpha:
            return False
    return True


@dataclass(frozen=True)
class EntropyAssessment:
    """Per-bit min-entropy estimates of one bit string, and the figure SP 800-90B would assess.

    Attributes:
        n_bits: Sample size.
        mcv, collision, markov: The three estimates, bits of min-entropy per bit.
        iid: Whether :func:`iid_plausible` accepted the sample (and the caller allowed the IID track).
    """

    n_bits: int
    mcv: float
    collision: float
    markov: float
    iid: bool = False

    @property
    def non_iid(self) -> float:
        """The non-IID track's figure: the smallest of the three estimates.

        The collision estimate is left out below :data:`COLLISION_MIN_BITS` samples: its confidence bound then
        exceeds the whole range of collision times and it returns 0 whatever the source (on 45 fair coin
        flips, for instance). MCV and Markov still carry their own small-sample penalties.
        """
        if self.n_bits < COLLISION_MIN_BITS:
            return min(self.mcv, self.markov)
        return min(self.mcv, self.collision, self.markov)

    @property
    def min_entropy(self) -> float:
        """Assessed min-entropy per bit: the MCV estimate on the IID track, else the smallest estimate."""
        return self.mcv if self.iid else self.non_iid

    @property
    def total_bits(self) -> float:
        """Assessed min-entropy of the whole string, in bits."""
        return self.min_entropy * self.n_bits

    def to_json(self) -> dict:
        return {**asdict(self), "non_iid": self.non_iid, "min_entropy": self.min_entropy,
                "total_bits": self.total_bits}


def assess(bits: np.ndarray, *, allow_iid: bool = False) -> EntropyAssessment:
    """Run the three SP 800-90B estimators on ``bits`` (0/1 values, at least 6).

    Args:
        bits: The sample.
        allow_iid: Take the IID track (MCV only) when :func:`iid_plausible` accepts the sample. Leave it off
            for bits with structure (timings, digests); the result is then the minimum of all three.

    Raises:
        ValueError: Fewer than 6 bits, or values other than 0 and 1.
    """
    b = _bits(bits, minimum=6)
    iid = bool(allow_iid and b.size >= 64 and iid_plausible(b))
    return EntropyAssessment(n_bits=int(b.size), mcv=most_common_value(b), collision=collision(b), markov=markov(b),
                             iid=iid)


def bit_error_rates(reference: np.ndarray, readings: np.ndarray) -> np.ndarray:
    """Per-bit flip rate of ``readings`` (trials x bits) against the enrolled ``reference`` (bits)."""
    ref = np.asarray(reference).astype(np.uint8).ravel()
    r = np.atleast_2d(np.asarray(readings).astype(np.uint8))
    if r.shape[1] != ref.size:
        raise ValueError(f"readings have {r.shape[1]} bits, reference has {ref.size}; compare equal-length readings")
    return (r != ref).mean(axis=0)


def bit_error_rate(reference: np.ndarray, readings: np.ndarray) -> float:
    """Mean fraction of bits that differ between the reference and each re-reading."""
    return float(bit_error_rates(reference, readings).mean())
