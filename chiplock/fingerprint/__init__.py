"""Hardware fingerprint sources (expert layer). Importing this package registers the built-in sources."""

from chiplock.fingerprint.base import (Enrollment, FingerprintSource, available_sources, get_source,
                                       register_source)
from chiplock.fingerprint import precision as _precision  # noqa: F401  (registers "precision")

__all__ = ["Enrollment", "FingerprintSource", "available_sources", "get_source", "register_source"]
