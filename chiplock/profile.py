"""Device profiles: what enrollment measured on one device. The profile is the vendor's secret for it."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, NoReturn

from chiplock import _json
from chiplock._json import show as _show
from chiplock._io import atomic_write_bytes, read_capped
from chiplock.errors import ChiplockError, ProfileError
from chiplock.fingerprint import Enrollment, available_sources, get_source
from chiplock.keys.kdf import ARGON2_MAX_MEMORY_KIB, KEY_LEN, KdfParams, MasterKDF, assemble_material

PROFILE_VERSION = 1
#: Caps on a profile file (see chiplock/container/spec.md): profiles hold a few sources' helper data.
MAX_PROFILE_BYTES = 16 << 20
PROFILE_LIMITS = _json.Limits(max_bytes=MAX_PROFILE_BYTES, max_depth=64, max_containers=200_000,
                              max_items=2_000_000)
MAX_ENROLLMENTS = 16
MAX_MATERIAL_BYTES = 4096
MAX_ENTROPY_BITS = 1 << 20
MAX_HOST_CHARS = 1024
_PROFILE_FIELDS = frozenset({"chiplock_profile", "created", "host", "enrollments", "device_key"})
_ENROLLMENT_FIELDS = frozenset({"source", "helper", "material", "entropy_bits", "info"})
_HEX = re.compile(r"[0-9a-fA-F]*")


@dataclass(frozen=True)
class DeviceKey:
    """The device key: Argon2id over the device's fingerprint material (no vendor secret), with its parameters.

    Licences wrap content keys under a key derived from it (:mod:`chiplock.license`); storing it in the profile
    lets a vendor issue a licence in microseconds instead of one Argon2id run. It is as secret as the material.

    Attributes:
        kdf: The Argon2id parameters (with this device's salt) the key was derived with.
        key: The 32-byte key (kept out of ``repr``).

    Raises:
        TypeError: ``kdf`` is not a :class:`~chiplock.keys.KdfParams` or ``key`` is not bytes.
        ValueError: ``key`` is not 32 bytes.

    Example:
        >>> from chiplock.keys import INSECURE_FAST, KdfParams
        >>> dk = DeviceKey.derive({"precision": b"material"}, KdfParams(**INSECURE_FAST))
        >>> len(dk.key)
        32
    """

    kdf: KdfParams
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kdf, KdfParams):
            raise TypeError(f"kdf must be a KdfParams, got {type(self.kdf).__name__}")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LEN:
            raise ValueError(f"key must be {KEY_LEN} bytes; derive it with DeviceKey.derive(materials, kdf)")

    @classmethod
    def derive(cls, materials: Mapping[str, bytes], kdf: KdfParams) -> DeviceKey:
        """Run Argon2id (:class:`~chiplock.keys.MasterKDF`) over ``assemble_material(materials, None)``."""
        return cls(kdf=kdf, key=MasterKDF(params=kdf).derive(assemble_material(dict(materials), None)))

    def to_json(self) -> dict[str, Any]:
        return {"kdf": self.kdf.to_json(), "key": self.key.hex()}


@dataclass(frozen=True)
class DeviceProfile:
    """Key material and public helper data of one enrolled device.

    Attributes:
        enrollments: One :class:`~chiplock.fingerprint.Enrollment` per source, in enrollment order.
        created: Unix time of enrollment.
        host: Free-text description of the machine (public).
        version: Profile format version.
        device_key: The stored :class:`DeviceKey` (``None`` in profiles enrolled before it existed: it is then
            derived when needed, at one Argon2id run each time).
    """

    enrollments: tuple[Enrollment, ...]
    created: float = field(default_factory=time.time)
    host: str = field(default_factory=platform.node)
    version: int = PROFILE_VERSION
    device_key: DeviceKey | None = None

    def __post_init__(self) -> None:
        if not self.enrollments:
            raise ValueError("a DeviceProfile needs at least one enrollment; pass sources=('precision',)")
        for e in self.enrollments:
            # The helper data goes into every container locked with this profile: a value the container reader
            # would refuse (NaN, a lone surrogate, deep nesting) must fail here, not after a file is written.
            problem = _json.check_tree(e.helper, max_depth=PROFILE_LIMITS.max_depth - 3, max_str=MAX_PROFILE_BYTES)
            if not isinstance(e.helper, dict) or problem:
                raise ValueError(f"the helper data of source {e.source!r} is not a plain JSON object "
                                 f"({problem or 'not a dict'}); this is a bug in that source")
        if self.device_key is not None and not isinstance(self.device_key, DeviceKey):
            raise TypeError("device_key must be a DeviceKey or None; use profile.with_device_key(kdf)")

    @property
    def sources(self) -> list[str]:
        return [e.source for e in self.enrollments]

    def materials(self) -> dict[str, bytes]:
        """Source name -> secret key material."""
        return {e.source: e.material for e in self.enrollments}

    def helpers(self) -> dict[str, dict[str, Any]]:
        """Source name -> public helper data (what the container stores)."""
        return {e.source: e.helper for e in self.enrollments}

    def entropy_bits(self) -> float | None:
        """Summed entropy estimate of all sources, or ``None`` when any source has no estimate."""
        bits = [e.entropy_bits for e in self.enrollments]
        return None if any(b is None for b in bits) else float(sum(bits))

    def with_device_key(self, kdf: KdfParams | None = None) -> DeviceProfile:
        """A copy of this profile carrying its device key, derived now (one Argon2id run with ``kdf``).

        Use it to upgrade a profile enrolled without one: ``DeviceProfile.load(p).with_device_key().save(p)``.

        Args:
            kdf: Argon2id parameters; default :class:`~chiplock.keys.KdfParams` (fresh salt, about 0.4 s).
        """
        return replace(self, device_key=DeviceKey.derive(self.materials(), kdf or KdfParams()))

    def to_json(self) -> dict[str, Any]:
        dk = {"device_key": self.device_key.to_json()} if self.device_key is not None else {}
        return {
            "chiplock_profile": self.version,
            "created": self.created,
            "host": self.host,
            "enrollments": [
                {"source": e.source, "helper": e.helper, "material": e.material.hex(),
                 "entropy_bits": e.entropy_bits, "info": e.info}
                for e in self.enrollments
            ],
        } | dk

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON (mode 0600, atomically). It holds key material: keep it private."""
        try:
            text = json.dumps(self.to_json(), indent=2, allow_nan=False)
        except ValueError:
            raise ProfileError("the profile holds NaN or an infinity in a source's info, which JSON cannot hold; "
                               "this is a bug in that source: report it") from None
        atomic_write_bytes(path, text.encode(), mode=0o600)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """A profile from its JSON form, every field type-checked (see :meth:`load`).

        Raises:
            ProfileError: Not a profile, another version, or a field of the wrong type or size.
        """
        if not isinstance(data, Mapping) or "chiplock_profile" not in data:
            raise ProfileError("this is not a chiplock device profile; create one with `chiplock enroll -o FILE`")
        version = data["chiplock_profile"]
        if not (_json.is_int(version) and version == PROFILE_VERSION):
            raise ProfileError(f"device profile version {_show(version)} is not supported by this "
                               f"chiplock (expects {PROFILE_VERSION}); re-enroll the device or upgrade")
        unknown = set(data) - _PROFILE_FIELDS
        if unknown or "enrollments" not in data:
            _malformed("missing enrollments" if not unknown else f"unknown field(s) {_show(sorted(unknown))}")
        created, host = data.get("created", 0.0), data.get("host", "")
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
            _malformed("created is not a finite number")
        if not isinstance(host, str) or _json.check_tree(host, max_depth=1, max_str=MAX_HOST_CHARS):
            _malformed(f"host is not a string of at most {MAX_HOST_CHARS} characters")
        items = data["enrollments"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_ENROLLMENTS:
            _malformed(f"enrollments is not a list of 1 to {MAX_ENROLLMENTS} entries")
        enrollments = tuple(_enrollment(e) for e in items)
        names = [e.source for e in enrollments]
        if len(set(names)) != len(names):
            _malformed("a source is enrolled twice")
        return cls(enrollments=enrollments, created=float(created), host=host,
                   device_key=_device_key(data["device_key"]) if "device_key" in data else None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        """Read a profile written by :meth:`save`.

        The file is parsed with caps (size, nesting, number length; no NaN, Infinity or lone surrogates) and
        every field is type-checked, so a profile that loads can be used by :func:`chiplock.lock`.

        Raises:
            ProfileError: The file is missing, not JSON, over a cap, not a profile, of another version, or has a
                field of the wrong type (the message names it).
        """
        try:
            raw = read_capped(path, MAX_PROFILE_BYTES)  # A FIFO nobody writes reads as empty instead of hanging.
        except FileNotFoundError:
            raise ProfileError(f"device profile {os.fspath(path)!r} not found; create it on the device with "
                               "`chiplock enroll -o FILE`") from None
        except OSError as exc:
            raise ProfileError(f"device profile {os.fspath(path)!r} is unreadable "
                               f"({exc.strerror or type(exc).__name__}); "
                               "check the path, or re-enroll the device with `chiplock enroll -o FILE`") from None
        try:
            data = _json.loads(raw, PROFILE_LIMITS)
        except _json.JSONLimitError as exc:
            raise ProfileError(f"device profile {os.fspath(path)!r} is unreadable (it {exc}); re-enroll the "
                               "device with `chiplock enroll -o FILE`") from None
        return cls.from_json(data)


def _malformed(why: str) -> NoReturn:
    raise ProfileError(f"the device profile is malformed ({why}); re-enroll the device with "
                       "`chiplock enroll -o FILE`")


def _device_key(d: Any) -> DeviceKey:
    if not (isinstance(d, dict) and set(d) == {"kdf", "key"}):
        _malformed("device_key is not an object with kdf and key")
    key = d["key"]
    if not (isinstance(key, str) and len(key) == 2 * KEY_LEN and _HEX.fullmatch(key)):
        _malformed(f"the device key is not {KEY_LEN} bytes of hex")
    try:
        # The profile is the vendor's own file: any cost Argon2id accepts is fine here.
        kdf = KdfParams.from_json(d["kdf"], max_memory_kib=ARGON2_MAX_MEMORY_KIB)
    except ChiplockError as exc:
        _malformed(f"the device key's kdf: {str(exc).split(';')[0]}")
    return DeviceKey(kdf=kdf, key=bytes.fromhex(key))


def _enrollment(e: Any) -> Enrollment:
    """One enrollment, checked field by field so that a loaded profile never fails later in ``lock``."""
    if not isinstance(e, dict) or not {"source", "helper", "material"} <= set(e) or set(e) - _ENROLLMENT_FIELDS:
        _malformed("an enrollment lacks source, helper or material, or has unknown fields")
    source = e["source"]
    if not isinstance(source, str) or source not in available_sources():
        _malformed(f"source {_show(source)} is not one of {', '.join(available_sources())}")
    for key in ("helper", "info"):
        value = e.get(key, {})
        if not isinstance(value, dict):
            _malformed(f"the {key} of source {source} is not an object")
        # Helper data goes into every container locked with this profile: it must pass the container's caps.
        problem = _json.check_tree(value, max_depth=PROFILE_LIMITS.max_depth - 3, max_str=MAX_PROFILE_BYTES)
        if problem:
            _malformed(f"the {key} of source {source} is unfit: {problem}")
    material = e["material"]
    if not (isinstance(material, str) and 2 <= len(material) <= 2 * MAX_MATERIAL_BYTES and len(material) % 2 == 0
            and _HEX.fullmatch(material)):
        _malformed(f"the material of source {source} is not 1 to {MAX_MATERIAL_BYTES} bytes of hex")
    bits = e.get("entropy_bits")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))
                             or not math.isfinite(bits) or not 0 <= bits <= MAX_ENTROPY_BITS):
        _malformed(f"entropy_bits of source {source} is not null or a number from 0 to {MAX_ENTROPY_BITS}")
    return Enrollment(source=source, helper=e["helper"], material=bytes.fromhex(material),
                      entropy_bits=None if bits is None else float(bits), info=e.get("info", {}))


def enroll(sources: Iterable[str] = ("precision",), *,
           options: Mapping[str, Mapping[str, Any]] | None = None, kdf: KdfParams | None = None) -> DeviceProfile:
    """Measure this device with each fingerprint source and return its profile.

    Args:
        sources: Names of registered sources (see :func:`chiplock.fingerprint.available_sources`).
        options: Per-source constructor options, e.g. ``{"precision": {"device": "cuda"}}``.
        kdf: Argon2id parameters of the device key stored in the profile (derived here, once, so that issuing
            a licence never runs Argon2id); default :class:`~chiplock.keys.KdfParams` (fresh salt, about 0.4 s).

    Returns:
        The :class:`DeviceProfile`; save it with ``profile.save(path)`` and keep it secret.

    Raises:
        UnsupportedConfig: An unknown source name.
        FingerprintError: A source cannot measure this device.

    Example:
        >>> profile = enroll(("precision",))  # doctest: +SKIP
    """
    names = list(dict.fromkeys(sources))
    if not names:
        raise ValueError("sources is empty; pass at least one source name, e.g. ('precision',)")
    if kdf is not None and not isinstance(kdf, KdfParams):
        raise TypeError(f"kdf must be a KdfParams or None, got {type(kdf).__name__}")
    options = options or {}
    profile = DeviceProfile(enrollments=tuple(get_source(n, **options.get(n, {})).enroll() for n in names))
    return profile.with_device_key(kdf)
