"""The fingerprint-source interface every hardware source implements.

A source turns something measured on a device into *key material*: bytes that are the same every time the
same device measures them and differ on other devices. Enrollment (on the device, by the vendor) returns the
material plus public *helper data*; reproduction (on the device, at unlock time) measures again and uses the
helper data to recover the same bytes. Stable sources (finite precision) need no helper data beyond a
description; noisy ones (clock timing, SRAM PUF) store fuzzy-extractor helper data there.

The helper data is written into the container's public metadata, so it must never reveal the material.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from chiplock.errors import UnsupportedConfig


@dataclass(frozen=True)
class Enrollment:
    """What one source yields when a device is enrolled.

    Attributes:
        source: Registered name of the source (``"precision"``, ...).
        helper: Public, JSON-serialisable data needed to reproduce the material; goes into the container.
        material: Secret key material (stable bytes). Kept in the device profile only.
        entropy_bits: Estimated min-entropy of ``material`` after accounting for what ``helper`` leaks,
            or ``None`` when unknown.
        info: Public, JSON-serialisable facts for reports (timings, bit-error rates, per-probe digests...).
    """

    source: str
    helper: dict[str, Any]
    material: bytes = field(repr=False)
    entropy_bits: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class FingerprintSource(abc.ABC):
    """A hardware fingerprint source. Subclasses register themselves with :func:`register_source`."""

    name: ClassVar[str]

    @abc.abstractmethod
    def enroll(self) -> Enrollment:
        """Measure this device and return its key material and public helper data."""

    @abc.abstractmethod
    def reproduce(self, helper: dict[str, Any]) -> bytes:
        """Measure this device again and recover the material enrolled with ``helper``.

        Raises:
            FingerprintError: The measurement cannot be taken here (missing device, unreadable dump, ...).
        """


_REGISTRY: dict[str, type[FingerprintSource]] = {}


def register_source(cls: type[FingerprintSource]) -> type[FingerprintSource]:
    """Class decorator adding a source to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_sources() -> list[str]:
    """Names of every registered source."""
    return sorted(_REGISTRY)


def get_source(name: str, **options: Any) -> FingerprintSource:
    """Instantiate the source registered as ``name`` with ``options``.

    Raises:
        UnsupportedConfig: No source has that name.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnsupportedConfig(
            f"unknown fingerprint source {name!r}; choose one of {', '.join(available_sources())}") from None
    return cls(**options)
