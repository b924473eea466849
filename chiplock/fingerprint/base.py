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

from chiplock.registry import Option, Registry


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
    """A hardware fingerprint source. Subclasses register themselves with :func:`register_source`.

    Class attributes a source declares:
        name: The registered name (``enroll(("name",))``, ``--source name``).
        strength_group: Sources in one group are expected to be correlated (an attacker who reproduces one
            reproduces the others), so :func:`chiplock.keys.combine.key_strength` credits only the largest
            estimate in a group. ``None``: the source is its own group.
        cli_options: Constructor keywords ``chiplock fingerprint`` exposes, as :class:`chiplock.registry.Option`.
    """

    name: ClassVar[str]
    strength_group: ClassVar[str | None] = None
    cli_options: ClassVar[tuple[Option, ...]] = ()

    @abc.abstractmethod
    def enroll(self) -> Enrollment:
        """Measure this device and return its key material and public helper data."""

    @abc.abstractmethod
    def reproduce(self, helper: dict[str, Any]) -> bytes:
        """Measure this device again and recover the material enrolled with ``helper``.

        Raises:
            FingerprintError: The measurement cannot be taken here (missing device, unreadable dump, ...).
        """


#: Name -> source class (see :mod:`chiplock.registry`; ``docs/extending.md`` adds one).
SOURCES: Registry[type[FingerprintSource]] = Registry("fingerprint source")


def register_source(cls: type[FingerprintSource]) -> type[FingerprintSource]:
    """Class decorator adding a source to the registry under ``cls.name``."""
    return SOURCES.register(cls.name, cls)


def available_sources() -> list[str]:
    """Names of every registered source."""
    return SOURCES.names()


def source_class(name: str) -> type[FingerprintSource]:
    """The class registered as ``name`` (its declarations, without measuring anything).

    Raises:
        UnsupportedConfig: No source has that name.
    """
    return SOURCES.get(name)


def strength_group(name: str) -> str:
    """The key-strength group of source ``name`` (its own name unless it declares one; unknown names too)."""
    cls = SOURCES.find(name)
    return (cls.strength_group if cls is not None else None) or name


def get_source(name: str, **options: Any) -> FingerprintSource:
    """Instantiate the source registered as ``name`` with ``options``.

    Raises:
        UnsupportedConfig: No source has that name.
    """
    return SOURCES.get(name)(**options)
