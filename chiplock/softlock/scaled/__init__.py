"""A float element format deployed with scales, as FP8/FP6/FP4 are deployed in practice.

A naive cast puts each value straight into the element format; a deployment engineer first divides by a scale
chosen from the data (``amax / max_finite``) so the values use the format's range. :class:`Scaled` does that per
tensor, per output channel, or per block of ``block`` consecutive values along the reduction dimension (the
input channels at each kernel position for a convolution, the features for a linear layer). With
``scale="e8m0"`` and ``block=32`` it is the OCP Microscaling (MX) layout: the shared scale is a power of two,
``2**(floor(log2(amax)) - emax_element)``, and elements saturate at the element format's largest value.

Activations are scaled dynamically per example (or per block), so a result never depends on the batch. Outputs
stay in fp32 (a scaled GEMM writes a wide accumulator). Scaled formats are scale-invariant: multiplying a layer by
a power of two changes nothing, which is why the scale-based levers of :mod:`chiplock.softlock.levers` do not
apply to them.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.minifloat import MiniFloat
from chiplock.softlock.registry import Handler, parse_config, register

GRANULARITIES = ("none", "tensor", "channel", "block")


def _reduction_dim(x: torch.Tensor) -> int:
    """The dimension a GEMM reduces over: channels for NCHW tensors and conv weights, the last one otherwise."""
    return 1 if x.dim() == 4 else x.dim() - 1


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, tuple, int]:
    """``x`` with its reduction dimension moved last and split into blocks: ``(..., n_blocks, block)``."""
    d = _reduction_dim(x)
    moved = x.movedim(d, -1)
    n = moved.shape[-1]
    pad = (-n) % block
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, block), moved.shape, n


def _unblocks(b: torch.Tensor, moved_shape: tuple, n: int, d: int) -> torch.Tensor:
    return b.reshape(moved_shape)[..., :n].movedim(-1, d)


@dataclass(frozen=True)
class Scaled:
    """``element`` (a :class:`MiniFloat` name such as ``e4m3fn``) with data-derived scales.

    Args:
        element: Name of the element format (parsed with :func:`parse_config`; must be a MiniFloat).
        weights: ``tensor``, ``channel`` (per output channel), ``block`` or ``none`` (a naive cast).
        activations: ``tensor`` (dynamic, per example), ``block`` or ``none``.
        block: Block length along the reduction dimension when a side is ``block``.
        scale: ``fp32`` (exact ``amax / max_finite``) or ``e8m0`` (a power of two, as OCP MX).
        version: Schema version of this config.

    Raises:
        ValueError: Unknown granularity or scale, a block under 2, or an element that is not a MiniFloat.

    Example:
        >>> Scaled("e4m3fn", weights="channel").name
        'e4m3fn@channel'
        >>> Scaled("e2m1fin", weights="block", activations="block", scale="e8m0").name   # OCP MXFP4
        'e2m1fin@block32-e8m0'
        >>> parse_config("mxfp4") == Scaled("e2m1fin", weights="block", activations="block", scale="e8m0")
        True
    """

    element: str = "e4m3fn"
    weights: str = "channel"
    activations: str = "tensor"
    block: int = 32
    scale: str = "fp32"
    version: int = 1

    family: ClassVar[str] = "float"
    scale_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        fmt = parse_config(self.element)
        if not isinstance(fmt, MiniFloat):
            raise ValueError(f"Scaled(element={self.element!r}): the element must be a MiniFloat such as e4m3fn")
        if self.weights not in GRANULARITIES or self.activations not in ("none", "tensor", "block"):
            raise ValueError(f"Scaled(weights={self.weights!r}, activations={self.activations!r}): use "
                             f"{'/'.join(GRANULARITIES)} for weights and none/tensor/block for activations")
        if self.block < 2:
            raise ValueError(f"Scaled(block={self.block}): use a block of at least 2 values")
        if self.scale not in ("fp32", "e8m0"):
            raise ValueError(f"Scaled(scale={self.scale!r}): use fp32 or e8m0")
        object.__setattr__(self, "element", fmt.name)

    @functools.cached_property
    def format(self) -> MiniFloat:
        # Parsed once per config: a Scaled handler quantises every layer on every forward pass.
        return parse_config(self.element)

    @property
    def max_finite(self) -> float:
        return self.format.max_finite

    @property
    def name(self) -> str:
        g = self.weights if self.weights != "block" else f"block{self.block}"
        base = f"{self.element}@{g}"
        if self.activations != ("block" if self.weights == "block" else "tensor"):
            base += f"-act{self.activations}"
        return base + ("-e8m0" if self.scale == "e8m0" else "")

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        return []

    # ------------------------------------------------------------------ quantisation

    def _scale_of(self, amax: torch.Tensor) -> torch.Tensor:
        tiny = torch.finfo(torch.float32).tiny
        amax = amax.clamp(min=tiny)
        mx = self.max_finite
        if self.scale == "fp32":
            return amax / mx
        emax = math.floor(math.log2(mx))
        # floor(log2(amax)) from frexp, exactly: fp32 log2 rounds values just below a power of two up to it.
        e = (torch.frexp(amax)[1] - 1 - emax).float()
        return torch.exp2(e.clamp(-127, 127))

    def _quantize(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        fmt = self.format
        q = fmt.round(x / s)
        q = torch.clamp(q, -fmt.max_finite, fmt.max_finite)  # MX elements saturate (OCP spec 6.3).
        return q * s

    def quantize(self, x: torch.Tensor, granularity: str) -> torch.Tensor:
        """Scale, round to the element format and scale back (fp32 in, fp32 out)."""
        x = x.float()
        if granularity == "none":
            return self.format.round(x)
        if granularity == "block":
            b, shape, n = _blocks(x, self.block)
            s = self._scale_of(b.abs().amax(dim=-1, keepdim=True))
            return _unblocks(self._quantize(b, s), shape, n, _reduction_dim(x))
        if granularity == "tensor" or x.dim() < 2:
            amax = x.abs().amax()
        else:  # channel (weights: per output channel) or per example (activations: dim 0)
            amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
        return self._quantize(x, self._scale_of(amax))


class ScaledHandler(Handler):
    def __init__(self, cfg: Scaled) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.quantize(w, self.cfg.weights)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        g = self.cfg.activations
        # "tensor" for activations means one dynamic scale per example (row 0 of the batch dimension).
        return self.cfg.quantize(x, "channel" if g == "tensor" else g)


def _parse(m: re.Match) -> Scaled:
    g = m["g"].lower()
    kw: dict = {"element": m["el"]}
    if g.startswith("block"):
        kw.update(weights="block", activations="block", block=int(g[5:] or 32))
    else:
        kw["weights"] = g
    if m["act"]:
        kw["activations"] = m["act"].lower()
    if m["s"]:
        kw["scale"] = "e8m0"
    return Scaled(**kw)


register(Scaled, ScaledHandler,
         pattern=r"(?P<el>[a-z0-9]+)@(?P<g>tensor|channel|none|block\d*)(?:-act(?P<act>none|tensor|block))?"
                 r"(?P<s>-e8m0)?",
         parse=_parse, examples=("e4m3fn@tensor", "e4m3fn@channel", "e4m3fn@block32-e8m0"))

#: OCP Microscaling (MX v1.0) formats: name -> element. All use 32-element blocks along the reduction dimension on
#: weights and activations, E8M0 shared scales and saturating elements. :attr:`Scaled.name` spells them out
#: (``mxfp4`` is ``e2m1fin@block32-e8m0``).
MX_FORMATS = {"mxfp8": "e4m3fn", "mxfp8e5m2": "e5m2", "mxfp6": "e2m3fin", "mxfp6e3m2": "e3m2fin",
              "mxfp4": "e2m1fin"}
_MX_ALIASES = {**MX_FORMATS, "mxfp8e4m3": "e4m3fn", "mxfp6e2m3": "e2m3fin", "mxfp4e2m1": "e2m1fin"}


def mx(name: str) -> Scaled:
    """The OCP MX format ``name`` (``mxfp8``, ``mxfp8e5m2``, ``mxfp6``/``mxfp6e2m3``, ``mxfp6e3m2``, ``mxfp4``).

    Raises:
        ValueError: ``name`` is not an MX format.
    """
    element = _MX_ALIASES.get(name.lower())
    if element is None:
        raise ValueError(f"mx({name!r}): use one of {', '.join(_MX_ALIASES)}")
    return Scaled(element, weights="block", activations="block", block=32, scale="e8m0")


register(Scaled, ScaledHandler, pattern="|".join(sorted(_MX_ALIASES, key=len, reverse=True)),
         parse=lambda m: mx(m[0]), examples=tuple(MX_FORMATS))

__all__ = ["MX_FORMATS", "Scaled", "mx"]
