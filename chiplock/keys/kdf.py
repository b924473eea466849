"""Key derivation (expert layer): device material -> Argon2id master key -> HKDF sub-keys.

Argon2id makes every key guess cost a fixed amount of time and memory; HKDF-SHA256 then derives independent
keys per purpose and per tensor from the one master key, so the expensive step runs once per unlock.
"""

from __future__ import annotations

import hmac
import os
import re
import struct
from dataclasses import asdict, dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chiplock._json import is_int as _is_int
from chiplock._json import show as _show
from chiplock.errors import AlreadyFinalized, ContainerError, InvalidKey, UnsupportedConfig

KEY_LEN = 32
MAX_ITERATIONS = 1000
MAX_LANES = 64
#: The most Argon2id memory a file may ask of this device unless raised (``max_kdf_memory_kib=`` on
#: :func:`chiplock.unlock`, or the environment variable below): 1 GiB, in KiB.
DEFAULT_MAX_MEMORY_KIB = 1 << 20
#: Environment variable that sets the device's cap on a file's Argon2id memory, in KiB.
MAX_MEMORY_ENV = "CHIPLOCK_MAX_KDF_MEMORY_KIB"
#: Argon2's own limit on the memory cost (KiB).
ARGON2_MAX_MEMORY_KIB = (1 << 32) - 1
#: A file may ask for at most this many passes over the capped memory (iterations x memory_kib <= 16 x cap):
#: 16 x 1 GiB is about 6 s here, against 0.4 s for the defaults (16 x 64 MiB).
MAX_WORK_PASSES = 16
MAX_SALT_BYTES = 64
_KDF_FIELDS = frozenset({"algorithm", "salt", "iterations", "lanes", "memory_kib", "version"})
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


def max_memory_kib() -> int:
    """The device's cap on the Argon2id memory a file may ask for, in KiB.

    ``$CHIPLOCK_MAX_KDF_MEMORY_KIB`` when set (a positive integer), else :data:`DEFAULT_MAX_MEMORY_KIB` (1 GiB).

    Raises:
        UnsupportedConfig: The environment variable is set to something other than a positive integer.
    """
    raw = os.environ.get(MAX_MEMORY_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_MEMORY_KIB
    try:
        value = int(raw.strip()) if len(raw) <= 12 else -1
    except ValueError:
        value = -1
    if not 8 <= value <= ARGON2_MAX_MEMORY_KIB:
        raise UnsupportedConfig(f"{MAX_MEMORY_ENV} must be a number of KiB between 8 and {ARGON2_MAX_MEMORY_KIB}, "
                                f"got {raw[:40]!r}; fix it or unset it (default {DEFAULT_MAX_MEMORY_KIB} = 1 GiB)")
    return value


def _damaged(why: str) -> ContainerError:
    return ContainerError(f"the file's key-derivation parameters are malformed ({why}); the file is damaged: "
                          "obtain a fresh copy")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the container so unlocking reproduces them.

    The defaults take about 0.4 s and 64 MiB on a 2-core x86 machine (measured 2026-11-22).

    Args:
        salt: 16 random bytes, fresh per container.
        iterations: Argon2id time cost (passes over memory), ``>= 1``.
        lanes: Parallelism, ``>= 1``.
        memory_kib: Memory cost in KiB, ``>= 8 * lanes``.

    Raises:
        TypeError: A parameter of the wrong type (``salt`` not bytes, a count not an int).
        ValueError: A parameter out of range.
    """

    salt: bytes = field(default_factory=lambda: os.urandom(16))
    iterations: int = 16
    lanes: int = 4
    memory_kib: int = 64 * 1024
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) < 16:
            raise ValueError("salt must be at least 16 bytes; omit it to get a random one")
        for name in ("iterations", "lanes", "memory_kib", "version"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {type(getattr(self, name)).__name__}")
        if self.iterations < 1 or self.lanes < 1:
            raise ValueError("iterations and lanes must be >= 1")
        if self.memory_kib < 8 * self.lanes:
            raise ValueError(f"memory_kib must be >= 8 * lanes ({8 * self.lanes}), got {self.memory_kib}")
        if self.memory_kib > ARGON2_MAX_MEMORY_KIB:
            raise ValueError(f"memory_kib must be <= {ARGON2_MAX_MEMORY_KIB} (Argon2's limit), got {self.memory_kib}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["salt"] = self.salt.hex()
        d["algorithm"] = "argon2id"
        return d

    @classmethod
    def from_json(cls, d: dict, *, max_memory_kib: int | None = None) -> KdfParams:
        """Parameters read from a file, type-checked and capped before any work is done.

        Args:
            d: The ``kdf`` object of a container.
            max_memory_kib: The most memory this device grants a file (KiB); default :func:`max_memory_kib`.

        Raises:
            ContainerError: A missing, extra or mistyped field, an unknown algorithm, or a cost over the caps
                (iterations <= 1000, lanes <= 64, memory <= the cap, iterations x memory <= 16 x the cap).
        """
        cap = max_memory_kib_checked(max_memory_kib)
        if not isinstance(d, dict):
            raise _damaged("not an object")
        if d.get("algorithm") != "argon2id":
            alg = d.get("algorithm")
            raise ContainerError(f"unsupported KDF {_show(alg)}; upgrade chiplock, or obtain an intact file")
        if set(d) - _KDF_FIELDS or not {"salt", "iterations", "lanes", "memory_kib"} <= set(d):
            raise _damaged("missing or unknown fields")
        salt = d["salt"]
        if not (isinstance(salt, str) and 32 <= len(salt) <= 2 * MAX_SALT_BYTES and _HEX.fullmatch(salt)):
            raise _damaged("the salt is not 16 to 64 bytes of lowercase hex")
        version = d.get("version", 1)
        if not all(_is_int(d[k]) for k in ("iterations", "lanes", "memory_kib")) or not _is_int(version):
            raise _damaged("a cost is not an integer")
        if version != 1:
            raise ContainerError(f"KDF parameter version {version} is not supported; upgrade chiplock")
        it, lanes, mem = d["iterations"], d["lanes"], d["memory_kib"]
        if it < 1 or lanes < 1 or mem < 8 * lanes:
            raise _damaged("a cost is below Argon2id's minimum")
        # Caps keep a crafted file from asking for hours of work or many GiB of memory.
        if it > MAX_ITERATIONS or lanes > MAX_LANES:
            raise ContainerError(f"the file asks for Argon2id cost beyond chiplock's caps (iterations <= "
                                 f"{MAX_ITERATIONS}, lanes <= {MAX_LANES}); refusing it: obtain a file from the vendor")
        if mem > cap or it * mem > MAX_WORK_PASSES * cap:
            raise ContainerError(
                f"the file asks for Argon2id memory of {_mib(mem)} x {it} passes, beyond this device's cap "
                f"({_mib(cap)}, at most {MAX_WORK_PASSES} passes over it); refusing it: obtain a file from the vendor, "
                f"or if you trust it raise the cap (unlock(..., max_kdf_memory_kib=...) or {MAX_MEMORY_ENV})")
        return cls(salt=bytes.fromhex(salt), iterations=it, lanes=lanes, memory_kib=mem, version=version)


def max_memory_kib_checked(value: int | None) -> int:
    """``value`` checked as a memory cap in KiB, or :func:`max_memory_kib` when ``None``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is out of Argon2's range.
    """
    if value is None:
        return max_memory_kib()
    if not _is_int(value):
        raise TypeError(f"max_kdf_memory_kib must be an int (KiB), got {type(value).__name__}")
    if not 8 <= value <= ARGON2_MAX_MEMORY_KIB:
        raise ValueError(f"max_kdf_memory_kib must be between 8 and {ARGON2_MAX_MEMORY_KIB} KiB, got {value}")
    return value


def _mib(kib: int) -> str:
    return f"{kib / 1024:g} MiB"


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
