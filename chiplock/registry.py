"""One small registry for every kind of plug-in: transforms, fingerprint sources and soft-lock formats.

A plug-in is one file that registers itself under a name, and declares what the rest of chiplock needs to know
about it (its command-line options as :class:`Option` specs, a fingerprint source's key-strength group, a
soft-lock format's lock levers) as class attributes, so the CLI and the key-strength policy read the registry
instead of keeping their own lists. See ``docs/extending.md``.

Plug-ins outside this package are found through the ``chiplock.plugins`` entry-point group: each entry point
names a module that registers its plug-ins when imported (:func:`load_plugins`, called by the CLI).

Example:
    >>> colours = Registry("colour")
    >>> @colours.register("red")
    ... class Red: ...
    >>> colours.names()
    ['red']
    >>> colours.get("blue")
    Traceback (most recent call last):
    chiplock.errors.UnsupportedConfig: unknown colour 'blue'; choose one of red
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

from chiplock.errors import UnsupportedConfig

T = TypeVar("T")

#: Entry-point group of out-of-tree plug-ins: ``toy = "my_package.toy_transform"``.
PLUGIN_GROUP = "chiplock.plugins"


class Registry(Generic[T]):
    """Name -> plug-in, for one ``kind`` of plug-in (the word used in error messages).

    Args:
        kind: What is registered, e.g. ``"transform"``; an unknown name raises
            ``UnsupportedConfig("unknown <kind> 'x'; choose one of a, b")``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, a decorator that registers what it decorates.

        Registering the same class (or an instance of it) again under a name replaces it, so re-importing a
        plug-in module is harmless; another object under a taken name is refused.

        Raises:
            ValueError: ``name`` is empty or already holds a different plug-in.
        """
        if obj is None:
            def decorator(o: T) -> T:
                self.register(name, o)
                return o
            return decorator
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names are non-empty strings, not {name!r}")
        old = self._items.get(name)
        if old is not None and _identity(old) != _identity(obj):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_identity(old)}); choose another name")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``.

        Raises:
            UnsupportedConfig: No plug-in has that name; the message lists the choices.
        """
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnsupportedConfig(f"unknown {self.kind} {name!r}; choose one of "
                                    f"{', '.join(self.names())}") from None

    def unregister(self, name: str) -> None:
        """Remove ``name`` if registered (tests that register a toy plug-in clean up with it)."""
        self._items.pop(name, None)

    def find(self, name: str, default: T | None = None) -> T | None:
        """The plug-in registered as ``name``, or ``default``."""
        return self._items.get(name, default)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, plug-in)`` pairs, sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _identity(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


#: Entry points already imported by :func:`load_plugins` (each is imported once per process).
_LOADED: list[str] = []


def load_plugins() -> list[str]:
    """Import every module named by a ``chiplock.plugins`` entry point (each registers its own plug-ins).

    Returns:
        The names of the entry points loaded.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in _LOADED:
            ep.load()
            _LOADED.append(ep.name)
    return list(_LOADED)


def choices_enum(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A ``str`` enum of ``values`` for a CLI choice (member names are the values with ``-`` as ``_``)."""
    return enum.Enum(name, {v.replace("-", "_").replace(":", "_"): v for v in values}, type=str)


@dataclass(frozen=True)
class Option:
    """A command-line option a plug-in declares, free of any CLI library.

    Args:
        name: Python name; the flag is ``--`` + ``name`` with ``_`` as ``-`` unless ``flag`` is given.
        type: ``str``, ``int``, ``float``, ``bool`` or ``pathlib.Path``.
        default: The default (``None``: not given, and the plug-in's own default applies).
        help: One line for ``--help``.
        choices: Allowed values (checked by the CLI), or ``None``.
        kwarg: Keyword of the plug-in's constructor this option fills (default ``name``).
        convert: Maps the CLI value to the keyword's value (e.g. ``"auto"`` -> ``"cpu"`` for a source that
            cannot choose).
        flag: The flag, when it is not derived from ``name`` (``"--lambda"`` for ``lam``).

    Example:
        >>> Option("device", str, "cpu", "Where to measure.", choices=("cpu", "cuda")).flags
        ('--device',)
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    kwarg: str | None = None
    convert: Callable[[Any], Any] | None = None
    flag: str | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """The option's flags for the CLI: ``flag``, ``--name`` (``_`` as ``-``), or ``--name/--no-name`` for a
        ``bool``."""
        if self.flag is not None:
            return (self.flag,)
        if self.type is bool:
            stem = self.name.replace("_", "-")
            return (f"--{stem}/--no-{stem}",)
        return ("--" + self.name.replace("_", "-"),)

    def value(self, given: Any) -> Any:
        """The constructor keyword's value for the CLI value ``given``.

        Raises:
            UnsupportedConfig: ``given`` is not one of :attr:`choices`.
        """
        if self.choices is not None and given is not None and given not in self.choices:
            raise UnsupportedConfig(f"{self.flags[0]} must be one of {', '.join(map(str, self.choices))}, "
                                    f"not {given!r}")
        return self.convert(given) if self.convert is not None and given is not None else given


def options_from_dataclass(cls: type, *, exclude: Iterable[str] = ()) -> tuple[Option, ...]:
    """:class:`Option` specs for a config dataclass's fields, read from each field's ``metadata``
    (``help``, and optionally ``flag``/``choices``); fields without ``help`` metadata are left out.

    Example:
        >>> [o.name for o in options_from_dataclass(SoftLockConfig)]  # doctest: +SKIP
        ['lam', 'epsilon', 'epochs', ...]
    """
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args:  # Optional[X] -> X
            tp = args[0]
        out.append(Option(f.name, tp, f.default, f.metadata["help"], choices=f.metadata.get("choices"),
                          flag=f.metadata.get("flag")))
    return tuple(out)


def merge_options(groups: Iterable[tuple[str, Iterable[Option]]]) -> dict[str, Option]:
    """One :class:`Option` per name across several plug-ins (``(plug-in name, options)`` pairs), for a CLI
    that shows each flag once; help texts that differ are joined as ``"plug-in: help"``."""
    merged: dict[str, Option] = {}
    helps: dict[str, dict[str, str]] = {}
    for owner, options in groups:
        for opt in options:
            helps.setdefault(opt.name, {})[owner] = opt.help
            if opt.name not in merged:
                merged[opt.name] = opt
            elif opt.choices is not None and merged[opt.name].choices is not None:
                extra = tuple(c for c in opt.choices if c not in merged[opt.name].choices)
                merged[opt.name] = dataclasses.replace(merged[opt.name], choices=merged[opt.name].choices + extra)
    for name, by_owner in helps.items():
        texts = set(by_owner.values())
        if len(texts) > 1:
            merged[name] = dataclasses.replace(
                merged[name], help="; ".join(f"{o}: {h.rstrip('.')}" for o, h in by_owner.items()) + ".")
        merged[name] = dataclasses.replace(merged[name], convert=None, kwarg=None)
    return merged


def with_options(options: Iterable[Option]) -> Callable[[Callable], Callable]:
    """Decorator for a typer command ``f(..., **values)``: adds one typer option per :class:`Option` to its
    signature and passes their values in ``values`` (keyed by option name).

    typer reads parameters from ``inspect.signature``, so the command's options come from the plug-ins'
    declarations instead of a hand-written list.
    """
    import functools

    import typer

    options = tuple(options)

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for opt in options:
            help_ = opt.help
            if opt.choices is not None and opt.type is not bool:
                help_ = f"{help_.rstrip('.')} ({', '.join(map(str, opt.choices))})."
            annotation = opt.type if opt.default is not None or opt.type is bool else Optional[opt.type]
            params.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(opt.default, *opt.flags, help=help_)))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, "return": sig.return_annotation}
        return wrapper

    return decorate


__all__ = ["Option", "PLUGIN_GROUP", "Registry", "choices_enum", "load_plugins", "merge_options",
           "options_from_dataclass", "with_options"]
