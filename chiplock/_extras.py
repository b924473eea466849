"""Optional dependencies: one clear error naming the extra that installs them, before any long-running work."""

from __future__ import annotations

import importlib.util
from typing import Iterable

from chiplock.errors import UnsupportedConfig


def require(modules: Iterable[str], extra: str, *, what: str, any_of: bool = False) -> None:
    """Raise :class:`UnsupportedConfig` when optional modules are missing.

    Args:
        modules: Importable module names (``"matplotlib"``, ``"sklearn"``).
        extra: The chiplock extra that installs them (``"demo"``).
        what: What needs them, for the message (``"the demo"``).
        any_of: One of ``modules`` is enough.

    Raises:
        UnsupportedConfig: A needed module is not installed; the message gives the pip command.

    Example:
        >>> require(("matplotlib",), "demo", what="the demo")  # doctest: +SKIP
    """
    modules = tuple(modules)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing and (not any_of or len(missing) == len(modules)):
        raise UnsupportedConfig(f"{what} needs {' or '.join(missing) if any_of else ', '.join(missing)}, which is "
                                f"not installed; install it with: pip install 'chiplock[{extra}]'")
