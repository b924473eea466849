"""Key derivation (expert layer): device material -> Argon2id master key -> HKDF sub-keys.

Argon2id makes every key guess cost a fixed amount of time and memory; HKDF-SHA256 then derives independent
keys per purpose and per tensor from the one master key, so the expensive step runs once per unlock.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import asdict, dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chiplock.errors import AlreadyFinalized, ContainerError, InvalidKey

KEY_LEN = 32
MAX_ITERATIONS = 1000
MAX_LANES = 64
MAX_MEMORY_KIB = 4 << 20


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the container so unlocking reproduces them.

    The defaults take about 0.4 s and 64 MiB on a 2-core x86 machine (measured 2026-11-22).

    Args:
        salt: 16 random bytes, fresh per container.
        iterations: Argon2id time cost (passes over memory), ``>= 1``.
        lanes: Parallelism, ``>= 1``.
        memory_kib: Memory cost in KiB, ``>= 8 * lanes``.
    """

    salt: bytes = field(default_factory=lambda: os.urandom(16))
    iterations: int = 16
    lanes: int = 4
    memory_kib: int = 64 * 1024
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) < 16:
            raise ValueError("salt must be at least 16 bytes; omit it to get a random one")
        if self.iterations < 1 or self.lanes < 1:
            raise ValueError("iterations and lanes must be >= 1")
        if self.memory_kib < 8 * self.lanes:
            raise ValueError(f"memory_kib must be >= 8 * lanes ({8 * self.lanes}), got {self.memory_kib}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["salt"] = self.salt.hex()
        d["algorithm"] = "argon2id"
        return d

    @classmethod
    def from_json(cls, d: dict) -> KdfParams:
        if not isinstance(d, dict):
            raise ContainerError("the file's key-derivation parameters are malformed; the file is damaged: "
                                 "obtain a fresh copy")
        try:
            if d.get("algorithm") != "argon2id":
                raise ContainerError(f"unsupported KDF {d.get('algorithm')!r}; upgrade chiplock")
            params = cls(salt=bytes.fromhex(d["salt"]), iterations=int(d["iterations"]), lanes=int(d["lanes"]),
                         memory_kib=int(d["memory_kib"]), version=int(d.get("version", 1)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContainerError(f"the file's key-derivation parameters are malformed ({type(exc).__name__}); "
                                 "the file is damaged: obtain a fresh copy") from None
        # Caps keep a crafted file from asking for hours of work or many GiB of memory.
        if params.iterations > MAX_ITERATIONS or params.lanes > MAX_LANES or params.memory_kib > MAX_MEMORY_KIB:
            raise ContainerError(f"the file asks for Argon2id cost beyond chiplock's caps (iterations <= "
                                 f"{MAX_ITERATIONS}, lanes <= {MAX_LANES}, memory <= {MAX_MEMORY_KIB >> 20} GiB); "
                                 "refusing it: obtain a file from the vendor")
        return params


#: Fast parameters for tests and examples only: they make guessing cheap.
INSECURE_FAST = dict(iterations=1, lanes=1, memory_kib=8)


class MasterKDF:
    """Argon2id over assembled device material, one derivation per instance (pyca's KDF shape).

    Args:
        params: The container's :class:`KdfParams`.

    Example:
        >>> key = MasterKDF(params=KdfParams(**INSECURE_FAST)).derive(b"material")
        >>> len(key)
        32
    """

    def __init__(self, *, params: KdfParams) -> None:
        self._params = params
        self._used = False

    def derive(self, material: bytes) -> bytes:
        """Return the 32-byte master key. Raises :class:`AlreadyFinalized` on a second call."""
        if self._used:
            raise AlreadyFinalized("MasterKDF.derive can be called once per instance; create a new one")
        self._used = True
        p = self._params
        return Argon2id(salt=p.salt, length=KEY_LEN, iterations=p.iterations, lanes=p.lanes,
                        memory_cost=p.memory_kib).derive(material)

    def verify(self, material: bytes, expected: bytes) -> None:
        """Derive and compare in constant time; raise :class:`InvalidKey` on mismatch."""
        if not hmac.compare_digest(self.derive(material), expected):
            raise InvalidKey("the key derived here does not match")


def assemble_material(materials: dict[str, bytes], secret: bytes | None = None) -> bytes:
    """Concatenate per-source material (sorted by source name) and the vendor secret, length-prefixed.

    Length prefixes and names keep the encoding injective, so two different inputs never collide.
    """
    out = [b"chiplock/material/v1"]
    for name in sorted(materials):
        for part in (name.encode(), materials[name]):
            out.append(struct.pack(">I", len(part)) + part)
    tag = b"secret" if secret is not None else b"no-secret"
    out.append(struct.pack(">I", len(tag)) + tag)
    if secret is not None:
        out.append(struct.pack(">I", len(secret)) + secret)
    return b"".join(out)


def subkey(master: bytes, purpose: str, context: str = "", length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256 sub-key for ``purpose`` (e.g. ``"tensor"``) and ``context`` (e.g. a tensor name)."""
    info = b"chiplock/v1/" + purpose.encode() + b"\0" + context.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)
