"""Fuzzy extraction (expert layer): stable key material from noisy bit readings, with public helper data.

Two textbook constructions (Dodis, Reyzin and Smith, "Fuzzy extractors", 2004), both over binary BCH codes
from ``bchlib``:

* **syndrome** (used when no repetition code is needed): the helper data is the BCH parity of the enrolled
  reading ``w``. At reproduction the fresh reading ``w'`` plus that parity decode back to ``w`` when at most
  ``t`` bits per block flipped. The helper leaks at most its length: ``blocks * ecc_bits`` bits.
* **code-offset** (used when the bit-error rate needs an inner repetition code): a random message is encoded
  with BCH, each code bit is repeated ``R`` times, and the helper data is ``w XOR codeword``. At reproduction
  ``w' XOR helper`` is a noisy codeword: majority votes undo most flips, BCH corrects the rest, and
  ``w = helper XOR codeword``. The helper leaks at most ``n - k`` bits (code length minus message length).

In both cases the key is ``SHA-256(domain, seed, params, w)``: what remains secret is at most
``H(w) - leakage``, which :meth:`CodeParams.remaining_entropy` computes and every source reports.

Decoding failures raise :class:`~chiplock.errors.FingerprintError`. When more than ``t`` bits flip, BCH can also
*miscorrect* silently to another codeword; the key is then wrong, which the failure probability already counts.

Example:
    >>> import numpy as np
    >>> params = CodeParams.design(ber=0.15, key_bits=128)
    >>> w = np.random.default_rng(0).integers(0, 2, params.input_bits, dtype=np.uint8)
    >>> key, helper = FuzzyExtractor(params=params).generate(w)
    >>> noisy = w ^ (np.random.default_rng(1).random(w.size) < 0.15)
    >>> FuzzyExtractor.from_helper(helper).reproduce(noisy, helper) == key
    True
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import bchlib
import numpy as np

from chiplock.errors import FingerprintError

FUZZY_VERSION = 1
_DOMAIN = b"chiplock/fuzzy/v1"


@functools.lru_cache(maxsize=None)
def _bch(m: int, t: int) -> bchlib.BCH:
    return bchlib.BCH(t=t, m=m)


@functools.lru_cache(maxsize=None)
def _ecc_bits(m: int, t: int) -> int:
    return _bch(m, t).ecc_bits


def repetition_error_rate(ber: float, repetition: int) -> float:
    """Probability that a majority vote over ``repetition`` independent copies is wrong."""
    from scipy.stats import binom  # imported here: scipy.stats costs ~1 s at `import chiplock`

    return float(binom.sf(repetition // 2, repetition, ber))


@dataclass(frozen=True)
class CodeParams:
    """Parameters of the concatenated code: ``blocks`` BCH blocks inside a ``repetition`` code.

    Args:
        repetition: Odd repetition factor of the inner code (1 = none, syndrome construction).
        bch_m: Galois field order of the BCH code (code length ``2**m - 1``), 5..15.
        bch_t: Bits the BCH code corrects per block.
        data_bytes: Message (code-offset) or reading (syndrome) bytes per block.
        blocks: Number of BCH blocks.
        input_bits: Reading length. Code-offset: exactly ``code_bits``. Syndrome: up to ``8*data_bytes*blocks``;
            the reading is zero-padded to whole blocks (padding is public and adds no entropy).
    """

    repetition: int
    bch_m: int
    bch_t: int
    data_bytes: int
    blocks: int = 1
    input_bits: int = 0
    version: int = FUZZY_VERSION

    def __post_init__(self) -> None:
        if self.repetition < 1 or self.repetition % 2 == 0:
            raise ValueError(f"repetition must be an odd number >= 1, got {self.repetition}")
        if not 5 <= self.bch_m <= 15 or self.bch_t < 1:
            raise ValueError(f"bch_m must be in 5..15 and bch_t >= 1, got m={self.bch_m}, t={self.bch_t}")
        if self.data_bytes < 1 or self.blocks < 1:
            raise ValueError("data_bytes and blocks must be >= 1")
        try:
            ecc = _ecc_bits(self.bch_m, self.bch_t)
        except Exception:  # bchlib raises a bare RuntimeError for impossible (m, t).
            raise ValueError(f"no BCH code with m={self.bch_m}, t={self.bch_t}; lower bch_t") from None
        if 8 * self.data_bytes + ecc > (1 << self.bch_m) - 1:
            raise ValueError(f"data_bytes={self.data_bytes} does not fit a BCH block with m={self.bch_m}, "
                             f"t={self.bch_t}; use fewer bytes, more blocks or a larger m")
        if self.repetition > 1 and self.input_bits not in (0, self.code_bits):
            raise ValueError(f"code-offset readings must have code_bits={self.code_bits} bits")
        if self.repetition == 1 and not 0 <= self.input_bits <= 8 * self.data_bytes * self.blocks:
            raise ValueError(f"input_bits must be <= {8 * self.data_bytes * self.blocks} for these blocks")
        if self.input_bits == 0:
            object.__setattr__(self, "input_bits",
                               self.code_bits if self.repetition > 1 else 8 * self.data_bytes * self.blocks)

    # Sizes -----------------------------------------------------------------------------------------------
    @property
    def construction(self) -> str:
        return "syndrome" if self.repetition == 1 else "code-offset"

    @property
    def ecc_bits(self) -> int:
        return _ecc_bits(self.bch_m, self.bch_t)

    @property
    def block_bits(self) -> int:
        """BCH code bits per block (message + parity), before repetition."""
        return 8 * self.data_bytes + self.ecc_bits

    @property
    def code_bits(self) -> int:
        return self.repetition * self.block_bits * self.blocks

    @property
    def leakage_bits(self) -> int:
        """Upper bound on what the helper data reveals about the reading, in bits."""
        if self.construction == "syndrome":
            return self.ecc_bits * self.blocks
        return self.code_bits - 8 * self.data_bytes * self.blocks

    def remaining_entropy(self, source_entropy_bits: float) -> float:
        """Entropy left in the key: the reading's min-entropy minus the helper's leakage (never below 0)."""
        return max(0.0, float(source_entropy_bits) - self.leakage_bits)

    def failure_probability(self, ber: float) -> float:
        """Analytic probability that reproduction fails, for independent bit flips at rate ``ber``.

        A block fails when more than ``t`` of its BCH bits are wrong after the majority vote; blocks are
        independent, so the key fails with ``1 - (1 - p_block) ** blocks``.
        """
        from scipy.stats import binom

        if self.construction == "syndrome":
            per_block_bits = math.ceil(self.input_bits / self.blocks)
            p_block = float(binom.sf(self.bch_t, per_block_bits, ber))
        else:
            p_block = float(binom.sf(self.bch_t, self.block_bits, repetition_error_rate(ber, self.repetition)))
        if p_block >= 1.0:
            return 1.0
        return float(-np.expm1(self.blocks * np.log1p(-p_block)))

    # Serialisation and design ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["construction"] = self.construction
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CodeParams:
        try:
            return cls(repetition=int(d["repetition"]), bch_m=int(d["bch_m"]), bch_t=int(d["bch_t"]),
                       data_bytes=int(d["data_bytes"]), blocks=int(d.get("blocks", 1)),
                       input_bits=int(d.get("input_bits", 0)), version=int(d.get("version", FUZZY_VERSION)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FingerprintError(f"the fuzzy-extractor helper data is malformed ({type(exc).__name__}); "
                                   "the file is damaged or from another chiplock: obtain a fresh copy") from None

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def design(*, ber: float, key_bits: int = 128, failure: float = 1e-6, entropy_per_bit: float = 1.0,
               margin: float = 10.0) -> CodeParams:
        """The shortest code-offset code that keeps ``key_bits`` of entropy and fails with at most ``failure``.

        Args:
            ber: Design bit-error rate of a re-reading (e.g. 0.15).
            key_bits: Entropy the key must keep after the helper's leakage.
            failure: Acceptable probability that a genuine re-reading does not reproduce the key.
            entropy_per_bit: Min-entropy per reading bit (from :mod:`chiplock.fingerprint.entropy`).
            margin: The analytic failure probability must be ``failure / margin`` or less, to absorb
                modelling error (bits that are not quite independent).

        Raises:
            ValueError: No code up to 15 repetitions, m <= 11 and 4 blocks meets the targets.
        """
        if not 0.0 <= ber < 0.5 or not 0.0 < entropy_per_bit <= 1.0:
            raise ValueError(f"ber must be in [0, 0.5) and entropy_per_bit in (0, 1]; got {ber}, {entropy_per_bit}")
        deficit = 1.0 - entropy_per_bit
        best: tuple | None = None
        for rep in range(1, 16, 2):
            for m in range(6, 12):
                for blocks in range(1, 5):
                    # For fixed (rep, m, blocks) the code only grows with t, so the first t that meets the
                    # failure target is the best one.
                    for t in range(1, (1 << m) // m):
                        try:
                            ecc = _ecc_bits(m, t)
                        except Exception:
                            break
                        max_db = ((1 << m) - 1 - ecc) // 8
                        # Solve  h*n - leakage >= key_bits  for the message bytes per block.
                        if rep > 1:
                            gain, cost = 8 * blocks * (1.0 - rep * deficit), rep * ecc * blocks * deficit
                        else:
                            gain, cost = 8 * blocks * entropy_per_bit, ecc * blocks
                        if gain <= 0:
                            break
                        db = max(1, math.ceil((key_bits + cost) / gain - 1e-9))
                        if db > max_db:
                            break
                        params = CodeParams(repetition=rep, bch_m=m, bch_t=t, data_bytes=db, blocks=blocks)
                        fail = params.failure_probability(ber)
                        if fail <= failure / margin:
                            score = (params.code_bits, fail)
                            if best is None or score < best[0]:
                                best = (score, params)
                            break
        if best is None:
            raise ValueError(f"no code reaches {key_bits} key bits at BER {ber} with failure <= {failure}; "
                             "lower key_bits or ber, or read more bits")
        return best[1]


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8)).tobytes()


def _unpack(data: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, np.uint8))[:n].copy()


class FuzzyExtractor:
    """Generate a key and public helper data from a reading; reproduce the key from a noisy re-reading.

    Args:
        params: The code (see :meth:`CodeParams.design`).
    """

    def __init__(self, *, params: CodeParams) -> None:
        self.params = params

    @classmethod
    def from_helper(cls, helper: dict[str, Any]) -> FuzzyExtractor:
        if not isinstance(helper, dict) or helper.get("fuzzy") != FUZZY_VERSION:
            raise FingerprintError("the fuzzy-extractor helper data has an unknown version; upgrade chiplock")
        return cls(params=CodeParams.from_json(helper.get("params", {})))

    def _check(self, bits: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits).astype(np.uint8).ravel()
        if bits.size != self.params.input_bits or (bits > 1).any():
            raise FingerprintError(f"the reading has {bits.size} bits but the code expects "
                                   f"{self.params.input_bits} zeros and ones; read the same region as at enrollment")
        return bits

    def _key(self, seed: bytes, w: np.ndarray) -> bytes:
        h = hashlib.sha256(_DOMAIN + seed)
        h.update(json.dumps(self.params.to_json(), sort_keys=True).encode())
        h.update(_pack(w))
        return h.digest()

    # Code-offset helpers ---------------------------------------------------------------------------------
    def _codeword(self, messages: list[bytes]) -> np.ndarray:
        p, bch = self.params, _bch(self.params.bch_m, self.params.bch_t)
        blocks = [np.concatenate([_unpack(msg, 8 * p.data_bytes), _unpack(bch.encode(msg), p.ecc_bits)])
                  for msg in messages]
        return np.repeat(np.concatenate(blocks), p.repetition)

    def generate(self, bits: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        """Return ``(key, helper)`` for the enrolled reading ``bits``. ``key`` is 32 secret bytes."""
        p, w = self.params, self._check(bits)
        seed = os.urandom(16)
        if p.construction == "syndrome":
            padded = np.zeros(8 * p.data_bytes * p.blocks, np.uint8)
            padded[: w.size] = w
            bch = _bch(p.bch_m, p.bch_t)
            per = 8 * p.data_bytes
            data = b"".join(bch.encode(_pack(padded[i * per:(i + 1) * per])) for i in range(p.blocks))
        else:
            messages = [os.urandom(p.data_bytes) for _ in range(p.blocks)]
            data = _pack(w ^ self._codeword(messages))
        helper = {"fuzzy": FUZZY_VERSION, "params": p.to_json(), "seed": seed.hex(),
                  "data": base64.b64encode(data).decode()}
        return self._key(seed, w), helper

    def reproduce(self, bits: np.ndarray, helper: dict[str, Any]) -> bytes:
        """Recover the key from a noisy re-reading ``bits`` and the enrollment's ``helper``.

        Raises:
            FingerprintError: Too many bits differ from the enrolled reading (another device, or more noise
                than the code was designed for), or the helper data is malformed.
        """
        p, w = self.params, self._check(bits)
        try:
            seed, data = bytes.fromhex(helper["seed"]), base64.b64decode(helper["data"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise FingerprintError("the fuzzy-extractor helper data is malformed; the file is damaged: "
                                   "obtain a fresh copy") from None
        bch = _bch(p.bch_m, p.bch_t)
        if p.construction == "syndrome":
            per, eb = 8 * p.data_bytes, bch.ecc_bytes
            if len(data) != eb * p.blocks:
                raise FingerprintError("the fuzzy-extractor helper data has the wrong length; the file is damaged")
            padded = np.zeros(per * p.blocks, np.uint8)
            padded[: w.size] = w
            out = []
            for i in range(p.blocks):
                block = bytearray(_pack(padded[i * per:(i + 1) * per]))
                ecc = bytearray(data[i * eb:(i + 1) * eb])
                self._decode(bch, block, ecc, i)
                out.append(_unpack(bytes(block), per))
            return self._key(seed, np.concatenate(out)[: w.size])
        if len(data) != (p.code_bits + 7) // 8:
            raise FingerprintError("the fuzzy-extractor helper data has the wrong length; the file is damaged")
        offset = _unpack(data, p.code_bits)
        noisy = (w ^ offset).reshape(-1, p.repetition)
        voted = (noisy.sum(axis=1) * 2 > p.repetition).astype(np.uint8)
        messages = []
        for i in range(p.blocks):
            block = voted[i * p.block_bits:(i + 1) * p.block_bits]
            msg = bytearray(_pack(block[: 8 * p.data_bytes]))
            ecc = bytearray(_pack(np.concatenate([block[8 * p.data_bytes:],
                                                  np.zeros(8 * bch.ecc_bytes - p.ecc_bits, np.uint8)])))
            self._decode(bch, msg, ecc, i)
            messages.append(bytes(msg))
        return self._key(seed, offset ^ self._codeword(messages))

    def _decode(self, bch: bchlib.BCH, data: bytearray, ecc: bytearray, block: int) -> None:
        if bch.decode(data, ecc) < 0:
            raise FingerprintError(
                f"the fresh reading differs from the enrolled one in more bits than the error-correcting code "
                f"fixes (block {block + 1} of {self.params.blocks}): this is not the enrolled device, or it is "
                "noisier than the code was designed for; re-enroll it with a higher design bit-error rate")
        bch.correct(data, ecc)
