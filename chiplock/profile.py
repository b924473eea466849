"""Device profiles: what enrollment measured on one device. The profile is the vendor's secret for it."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from chiplock._io import atomic_write_bytes
from chiplock.errors import ProfileError
from chiplock.fingerprint import Enrollment, get_source

PROFILE_VERSION = 1


@dataclass(frozen=True)
class DeviceProfile:
    """Key material and public helper data of one enrolled device.

    Attributes:
        enrollments: One :class:`~chiplock.fingerprint.Enrollment` per source, in enrollment order.
        created: Unix time of enrollment.
        host: Free-text description of the machine (public).
        version: Profile format version.
    """

    enrollments: tuple[Enrollment, ...]
    created: float = field(default_factory=time.time)
    host: str = field(default_factory=platform.node)
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        if not self.enrollments:
            raise ValueError("a DeviceProfile needs at least one enrollment; pass sources=('precision',)")

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

    def to_json(self) -> dict[str, Any]:
        return {
            "chiplock_profile": self.version,
            "created": self.created,
            "host": self.host,
            "enrollments": [
                {"source": e.source, "helper": e.helper, "material": e.material.hex(),
                 "entropy_bits": e.entropy_bits, "info": e.info}
                for e in self.enrollments
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON (mode 0600, atomically). It holds key material: keep it private."""
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=2).encode(), mode=0o600)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceProfile:
        if not isinstance(data, Mapping) or "chiplock_profile" not in data:
            raise ProfileError("this is not a chiplock device profile; create one with `chiplock enroll -o FILE`")
        if data["chiplock_profile"] != PROFILE_VERSION:
            raise ProfileError(f"device profile version {data['chiplock_profile']!r} is not supported by this "
                               f"chiplock (expects {PROFILE_VERSION}); re-enroll the device or upgrade")
        try:
            enrollments = tuple(
                Enrollment(source=str(e["source"]), helper=dict(e["helper"]), material=bytes.fromhex(e["material"]),
                           entropy_bits=e.get("entropy_bits"), info=dict(e.get("info", {})))
                for e in data["enrollments"])
            return cls(enrollments=enrollments, created=float(data.get("created", 0.0)),
                       host=str(data.get("host", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"the device profile is malformed ({type(exc).__name__}); re-enroll the device "
                               "with `chiplock enroll -o FILE`") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        """Read a profile written by :meth:`save`.

        Raises:
            ProfileError: The file is missing, not JSON, not a profile, or of another version.
        """
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
        except FileNotFoundError:
            raise ProfileError(f"device profile {os.fspath(path)!r} not found; create it on the device with "
                               "`chiplock enroll -o FILE`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"device profile {os.fspath(path)!r} is unreadable ({type(exc).__name__}); "
                               "re-enroll the device with `chiplock enroll -o FILE`") from None
        return cls.from_json(data)


def enroll(sources: Iterable[str] = ("precision",), *,
           options: Mapping[str, Mapping[str, Any]] | None = None) -> DeviceProfile:
    """Measure this device with each fingerprint source and return its profile.

    Args:
        sources: Names of registered sources (see :func:`chiplock.fingerprint.available_sources`).
        options: Per-source constructor options, e.g. ``{"precision": {"device": "cuda"}}``.

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
    options = options or {}
    return DeviceProfile(enrollments=tuple(get_source(n, **options.get(n, {})).enroll() for n in names))
