"""Hardware fingerprint sources (expert layer). Importing this package registers the built-in sources.

Sources: ``precision`` (exact floating-point results), ``clock`` (operation timing profiles), ``sram`` (SRAM
power-up state from a dump, or a simulated PUF), ``tpm`` (a secret sealed to a TPM 2.0). See ``docs/fingerprints.md`` for what each is worth.
"""

from chiplock.fingerprint.base import (SOURCES, Enrollment, FingerprintSource, available_sources, get_source,
                                       register_source, source_class, strength_group)
from chiplock.fingerprint import precision as _precision  # noqa: F401  (registers "precision")
from chiplock.fingerprint import sram as _sram  # noqa: F401  (registers "sram")
from chiplock.fingerprint import clock as _clock  # noqa: F401  (registers "clock")
from chiplock.fingerprint import tpm as _tpm  # noqa: F401  (registers "tpm"; tpm2-pytss is imported on use)

__all__ = ["SOURCES", "Enrollment", "FingerprintSource", "available_sources", "get_source", "register_source",
           "source_class", "strength_group"]
