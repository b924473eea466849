"""One registry for every soft-lock configuration: number formats and sparsity patterns.

A configuration is a frozen dataclass; its handler says how a layer running on that configuration changes its
weights (:meth:`Handler.weight`), its input activations (:meth:`Handler.activation`) and its accumulated outputs
(:meth:`Handler.output`). Each format lives in its own sub-package and registers itself here, as torchao's
``quantize_`` handlers do, so a new format is one folder plus its tests.

A format also declares, on its config class, what lock training needs to know about it (see
:mod:`chiplock.softlock.levers`): ``family`` (``"float"``, ``"integer"`` or ``"sparsity"``), ``scale_invariant``,
``max_finite``, and ``lock_levers(authorized, dense)``, the levers that break it when it is the unauthorized side.
The CLI lists the formats, and their example names, from this registry.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from chiplock.errors import UnsupportedConfig
from chiplock.registry import Registry


class Handler:
    """What a configuration does to one conv/linear layer. The defaults leave everything in fp32."""

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y


@dataclass
class Format:
    """One registered configuration type: its handler, its CLI name parsers and example names."""

    cls: type
    handler: Callable[[Any], Handler]
    parsers: list[tuple[re.Pattern, Callable[[re.Match], Any]]] = field(default_factory=list)
    examples: tuple[str, ...] = ()


#: Configuration class name -> :class:`Format` (the name is what :func:`config_to_dict` writes as ``type``).
FORMATS: Registry[Format] = Registry("soft-lock configuration type")


def register(config_cls: type, handler: Callable[[Any], Handler], *, pattern: str | None = None,
             parse: Callable[[re.Match], Any] | None = None, examples: tuple[str, ...] = ()) -> None:
    """Register ``handler(config)`` for ``config_cls`` and, optionally, a name parser (call again to add more
    parsers to the same class).

    Args:
        config_cls: A frozen dataclass with a ``version`` field and a ``name`` property.
        handler: Builds the :class:`Handler` for one config instance.
        pattern: Regular expression (matched in full, case-insensitive) for CLI names such as ``e4m3``.
        parse: Turns a match of ``pattern`` into a config instance.
        examples: CLI names to show in ``chiplock softlock formats`` and in error messages.

    Raises:
        ValueError: ``pattern`` without ``parse``, or another class already registered under this class name.

    Example:
        >>> register(MyConfig, MyHandler, pattern=r"my(\\d+)", parse=lambda m: MyConfig(int(m[1])),
        ...          examples=("my4",))
    """
    if pattern is not None and parse is None:
        raise ValueError("register(): `parse` is required when `pattern` is given")
    fmt = FORMATS.find(config_cls.__name__)
    same = fmt is not None and (fmt.cls.__module__, fmt.cls.__qualname__) == (config_cls.__module__,
                                                                              config_cls.__qualname__)
    if fmt is None or not same or fmt.cls is not config_cls:
        if fmt is not None and not same:
            raise ValueError(f"a soft-lock configuration named {config_cls.__name__} is already registered "
                             f"({fmt.cls.__module__}); rename the class")
        fmt = Format(config_cls, handler)  # New, or a re-imported module: start afresh.
        FORMATS.register(config_cls.__name__, fmt)
    fmt.handler = handler
    if pattern is not None:
        fmt.parsers.append((re.compile(pattern, re.IGNORECASE), parse))
    fmt.examples += tuple(e for e in examples if e not in fmt.examples)


def example_names() -> list[str]:
    """The example CLI names every registered format declares (``fp32``, ``e4m3fn``, ``2:4``, ...)."""
    formats = sorted(FORMATS.items(), key=lambda item: item[1].cls is Compose)  # Compositions last.
    return [e for _, fmt in formats for e in fmt.examples]


def _format_of(cfg: Any) -> Format | None:
    fmt = FORMATS.find(type(cfg).__name__)
    return fmt if fmt is not None and fmt.cls is type(cfg) else None


@dataclass(frozen=True)
class Compose:
    """Several configurations applied in order (e.g. a sparsity pattern, then a number format).

    Args:
        parts: The configurations; weights go through them left to right.

    Example:
        >>> Compose((MagnitudePruning(0.5), FP16()))  # the name is "prune0.5+fp16"
    """

    parts: tuple = ()
    version: int = 1

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("Compose(parts=...) needs at least one configuration")
        flat: list = []
        for p in self.parts:
            flat.extend(p.parts if isinstance(p, Compose) else (p,))
        object.__setattr__(self, "parts", tuple(flat))

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)


class _ComposedHandler(Handler):
    def __init__(self, cfg: Compose) -> None:
        self.handlers = [get_handler(p) for p in cfg.parts]

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        for h in self.handlers:
            w = h.weight(w)
        return w

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        for h in self.handlers:
            x = h.activation(x)
        return x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        for h in self.handlers:
            y = h.output(y)
        return y


register(Compose, _ComposedHandler, examples=("2:4+fp16",))


def get_handler(cfg: Any) -> Handler:
    """The :class:`Handler` registered for ``cfg``'s type.

    Raises:
        UnsupportedConfig: No handler is registered for this type.
    """
    fmt = _format_of(cfg)
    if fmt is None:
        raise UnsupportedConfig(f"no soft-lock handler for {type(cfg).__name__}; "
                                f"known: {', '.join(FORMATS.names())}")
    return fmt.handler(cfg)


def parse_config(text: str | Any) -> Any:
    """Turn a CLI name such as ``fp16``, ``e4m3fn``, ``int8-asym``, ``2:4``, ``prune0.25`` or ``2:4+fp16``
    into a configuration. Configurations pass through unchanged.

    Args:
        text: The name; ``+`` composes several (applied left to right).

    Returns:
        A registered configuration instance (a :class:`Compose` when ``+`` is used).

    Raises:
        UnsupportedConfig: The name matches no registered format.

    Example:
        >>> parse_config("e4m3fn").name
        'e4m3fn'
    """
    if not isinstance(text, str):
        if _format_of(text) is None:
            raise UnsupportedConfig(f"{text!r} is not a soft-lock configuration")
        return text
    parts = [p.strip() for p in text.split("+") if p.strip()]
    if not parts:
        raise UnsupportedConfig(f"empty configuration name; try {', '.join(example_names())}")
    parsers = [p for _, fmt in FORMATS.items() for p in fmt.parsers]
    configs = []
    for part in parts:
        for pattern, parse in parsers:
            m = pattern.fullmatch(part)
            if m:
                try:
                    configs.append(parse(m))
                except ValueError as exc:
                    raise UnsupportedConfig(f"bad configuration {part!r}: {exc}") from None
                break
        else:
            raise UnsupportedConfig(f"unknown configuration {part!r}; try {', '.join(example_names())}")
    return configs[0] if len(configs) == 1 else Compose(tuple(configs))


def config_to_dict(cfg: Any) -> dict:
    """A JSON-safe dict (``{"type": ..., **fields}``) that :func:`config_from_dict` reads back."""
    if isinstance(cfg, Compose):
        return {"type": "Compose", "version": cfg.version, "parts": [config_to_dict(p) for p in cfg.parts]}
    out: dict = {"type": type(cfg).__name__}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out


def config_from_dict(d: dict) -> Any:
    """Inverse of :func:`config_to_dict`; types resolve only through the registry (no arbitrary imports).

    Raises:
        UnsupportedConfig: Unknown type name.
    """
    d = dict(d)
    fmt = FORMATS.find(d.pop("type", ""))
    if fmt is None:
        raise UnsupportedConfig(f"unknown soft-lock configuration type in {d!r}")
    cls = fmt.cls
    if cls is Compose:
        return Compose(tuple(config_from_dict(p) for p in d["parts"]), version=d.get("version", 1))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = d[f.name]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UnsupportedConfig(f"bad {cls.__name__} fields: {exc}") from None


def config_to_json(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> Any:
    return config_from_dict(json.loads(text))


def registered_types() -> list[str]:
    """Names of every registered configuration class."""
    return FORMATS.names()


__all__ = ["FORMATS", "Compose", "Format", "Handler", "config_from_dict", "config_from_json", "config_to_dict",
           "config_to_json", "example_names", "get_handler", "parse_config", "register", "registered_types"]
