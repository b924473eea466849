"""Binary floating-point formats E{e}M{m} with a configurable bias: FP16, BF16, 8-bit E4M3/E5M2, 16-bit variants.

A layer "runs in" a MiniFloat format when its weights, its input activations and its outputs (the accumulator
written back to memory) are all values of that format. Accumulation itself happens at higher precision, as on
tensor cores, and the result is rounded once when it is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from chiplock.softlock.minifloat.rounding import Overflow, Variant, format_limits, round_to_grid
from chiplock.softlock.registry import Handler, register


@dataclass(frozen=True)
class MiniFloat:
    """A binary floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Args:
        exp_bits: Exponent field width (2..8).
        man_bits: Explicit mantissa bits (0..23; at least 1 for the ``fn`` variant).
        bias: Exponent bias; ``None`` means the IEEE default ``2**(exp_bits - 1) - 1``.
        variant: ``ieee`` (top exponent reserved for inf/NaN) or ``fn`` (finite only, as E4M3FN).
        overflow: ``saturate`` or ``inf`` (IEEE: overflow to +-inf, NaN for ``fn``).
        weights, activations, outputs: Which tensors of each layer are rounded.
        version: Schema version of this config.

    Raises:
        ValueError: A field is out of range.

    Example:
        >>> e4m3 = MiniFloat(4, 3, variant="fn")            # max 448, smallest subnormal 2**-9
        >>> fp16 = MiniFloat(5, 10, overflow="inf")          # IEEE half
        >>> wide = MiniFloat(4, 3, bias=11, variant="fn")    # same 8 bits, range moved down 16x
    """

    exp_bits: int = 4
    man_bits: int = 3
    bias: Optional[int] = None
    variant: Variant = Variant.IEEE
    overflow: Overflow = Overflow.SATURATE
    weights: bool = True
    activations: bool = True
    outputs: bool = True
    version: int = 1

    # A fixed range: scaling a layer far above max_finite saturates it (the lever that breaks a MiniFloat).
    family: ClassVar[str] = "float"
    scale_invariant: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant(self.variant))
        object.__setattr__(self, "overflow", Overflow(self.overflow))
        if not 2 <= self.exp_bits <= 8:
            raise ValueError(f"MiniFloat(exp_bits={self.exp_bits}): use 2..8 exponent bits")
        if not 0 <= self.man_bits <= 23:
            raise ValueError(f"MiniFloat(man_bits={self.man_bits}): use 0..23 mantissa bits")
        if self.variant == Variant.FN and self.man_bits == 0:
            raise ValueError("MiniFloat(variant='fn') needs man_bits >= 1 (its top code is NaN)")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (self.exp_bits - 1)) - 1)
        emin, mx = format_limits(self.exp_bits, self.man_bits, self.bias, self.variant)
        if emin - self.man_bits < -149 or mx >= 2.0 ** 128:
            raise ValueError(f"MiniFloat bias={self.bias}: the format's range must fit inside fp32's")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        return format_limits(self.exp_bits, self.man_bits, self.bias, self.variant)[0]

    @property
    def max_finite(self) -> float:
        return format_limits(self.exp_bits, self.man_bits, self.bias, self.variant)[1]

    @property
    def name(self) -> str:
        aliases = {(5, 10, 15, Variant.IEEE): "fp16", (8, 7, 127, Variant.IEEE): "bf16"}
        base = aliases.get((self.exp_bits, self.man_bits, self.bias, self.variant))
        if base is not None and self.overflow == Overflow.INF:
            return base  # The aliases name the hardware formats, which overflow to infinity.
        base = f"e{self.exp_bits}m{self.man_bits}" + ("fn" if self.variant == Variant.FN else "")
        if self.bias != (1 << (self.exp_bits - 1)) - 1:
            base += f"b{self.bias}"
        return base + ("-inf" if self.overflow == Overflow.INF else "")

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against a fixed-range format from a scale-invariant one (fp32, Int8): scale the layers far above this
        format's largest value, which the authorized side does not notice."""
        if not getattr(authorized, "scale_invariant", False):
            return []
        return [("scale_layers", {"log2_alpha": max(1, math.ceil(math.log2(self.max_finite)) + 3)})]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` to this format (round-to-nearest-even, subnormals, the overflow policy), as fp32."""
        emin, mx = format_limits(self.exp_bits, self.man_bits, self.bias, self.variant)
        return round_to_grid(x, self.man_bits, emin, mx, overflow=self.overflow,
                             has_inf=self.variant == Variant.IEEE)


def FP16(**kw) -> MiniFloat:
    """IEEE binary16 (E5M10, bias 15), overflowing to infinity as the hardware does."""
    return MiniFloat(5, 10, variant=Variant.IEEE, **{"overflow": Overflow.INF, **kw})


def BF16(**kw) -> MiniFloat:
    """bfloat16 (E8M7, bias 127), overflowing to infinity."""
    return MiniFloat(8, 7, variant=Variant.IEEE, **{"overflow": Overflow.INF, **kw})


def E4M3(**kw) -> MiniFloat:
    """OCP 8-bit E4M3FN (max 448, no infinities), saturating on overflow."""
    return MiniFloat(4, 3, variant=Variant.FN, **kw)


def E5M2(**kw) -> MiniFloat:
    """OCP 8-bit E5M2 (IEEE-like, max 57344), saturating on overflow."""
    return MiniFloat(5, 2, variant=Variant.IEEE, **kw)


class MiniFloatHandler(Handler):
    def __init__(self, cfg: MiniFloat) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(w) if self.cfg.weights else w

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(x) if self.cfg.activations else x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(y) if self.cfg.outputs else y


def _parse(m) -> MiniFloat:
    e, mm = int(m["e"]), int(m["m"])
    variant = Variant.FN if m["fn"] else Variant.IEEE
    bias = int(m["bias"]) if m["bias"] is not None else None
    overflow = {"sat": Overflow.SATURATE, "inf": Overflow.INF, None: None}[m["ovf"] and m["ovf"].lower()]
    kw = {} if overflow is None else {"overflow": overflow}
    return MiniFloat(e, mm, bias=bias, variant=variant, **kw)


def _parse_alias(m) -> MiniFloat:
    name = m[0].lower()
    return {"fp16": FP16, "float16": FP16, "half": FP16, "bf16": BF16, "bfloat16": BF16,
            "fp8": E4M3, "minifloat8": E4M3, "minifloat16": lambda: MiniFloat(6, 9)}[name]()


register(MiniFloat, MiniFloatHandler,
         pattern=r"e(?P<e>\d)m(?P<m>\d+)(?P<fn>fn)?(?:b(?P<bias>-?\d+))?(?:-(?P<ovf>sat|inf))?", parse=_parse,
         examples=("e4m3fn", "e5m2", "e6m9", "e4m3fnb11", "e5m2-inf"))
register(MiniFloat, MiniFloatHandler, pattern=r"fp16|float16|half|bf16|bfloat16|fp8|minifloat8|minifloat16",
         parse=_parse_alias, examples=("fp16", "bf16"))

__all__ = ["BF16", "E4M3", "E5M2", "FP16", "MiniFloat", "Overflow", "Variant"]
