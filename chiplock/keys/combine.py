"""Combination policy (expert layer): how much entropy a key that rests on several sources is credited.

Sources are not always independent. ``precision`` and ``clock`` both identify the device's *configuration*
(CPU model, library builds, thread count): an attacker who reproduces one configuration gets both, so within
that group only the larger estimate counts. Groups are then added. Each source declares its group
(``FingerprintSource.strength_group``; by default its own name), so a new source needs no change here. A source whose entropy is unknown
(``None``) makes the total unknown. A vendor secret is outside the fingerprint and is not counted; it makes the
key strong enough by itself (the vendor chooses it with full entropy).

``lock`` refuses a key that is not :attr:`KeyStrength.sufficient` (``WeakKey``) unless told
``allow_weak_key=True``. ``precision`` is credited a measured 12.5 bits (the configurations software can reach on
one machine, see :mod:`chiplock.fingerprint.configurations`), so precision and clock alone are never enough.

Example:
    >>> s = key_strength({"clock": 6.4, "sram": 131.5})
    >>> s.bits, s.sufficient
    (137.9, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

MIN_ENTROPY_BITS = 64
_UNIT_SOURCES = "a source that binds the unit (sram, tpm)"


@dataclass(frozen=True)
class KeyStrength:
    """What a key rests on.

    Attributes:
        bits: Credited entropy of the fingerprint part, or ``None`` when any source is unestimated.
        per_source: Each source's own estimate.
        unknown: Sources without an estimate.
        vendor_secret: Whether a vendor secret is mixed in.
        minimum: Threshold below which a key without a vendor secret is weak.
    """

    bits: float | None
    per_source: dict[str, float | None]
    unknown: tuple[str, ...]
    vendor_secret: bool
    minimum: float = MIN_ENTROPY_BITS

    @property
    def sufficient(self) -> bool:
        return self.vendor_secret or (self.bits is not None and self.bits >= self.minimum)

    def message(self) -> str:
        """One line for users: the figure, and what to do when it is too low."""
        if self.vendor_secret:
            return "the key includes a vendor secret"
        if self.bits is None:
            return (f"the entropy of {', '.join(self.unknown)} is not estimated and there is no vendor secret: "
                    f"pass a vendor secret (secret= / --secret-file) or add {_UNIT_SOURCES}")
        if self.bits < self.minimum:
            return (f"the key rests on about {self.bits:.1f} bits of estimated entropy (< {self.minimum:g}) and no "
                    f"vendor secret: pass a vendor secret (secret= / --secret-file) or add {_UNIT_SOURCES}")
        return f"the key rests on about {self.bits:.1f} bits of estimated entropy"


def key_strength(sources: Mapping[str, float | None] | Iterable, *, secret: bytes | None = None,
                 minimum: float = MIN_ENTROPY_BITS) -> KeyStrength:
    """Credit the entropy of a set of sources under the grouping policy above.

    Args:
        sources: Source name -> entropy estimate (bits or ``None``), or enrollments (objects with ``source``
            and ``entropy_bits``, e.g. ``profile.enrollments``).
        secret: The vendor secret, if any (only its presence matters).
        minimum: The threshold for :attr:`KeyStrength.sufficient`.
    """
    if not isinstance(sources, Mapping):
        sources = {e.source: e.entropy_bits for e in sources}
    if not sources:
        raise ValueError("sources is empty; pass at least one source's estimate")
    from chiplock.fingerprint import strength_group  # The package registers the built-in sources.

    unknown = tuple(sorted(n for n, b in sources.items() if b is None))
    bits = None
    if not unknown:
        best: dict[str, float] = {}
        for name, b in sources.items():
            group = strength_group(name)
            best[group] = max(best.get(group, 0.0), float(b))
        bits = round(sum(best.values()), 6)
    return KeyStrength(bits=bits, per_source=dict(sources), unknown=unknown, vendor_secret=secret is not None,
                       minimum=minimum)
