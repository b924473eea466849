"""Binary floating-point formats E{e}M{m} with a configurable bias: FP16, BF16, 8-bit E4M3/E5M2 and their fnuz
variants, the OCP MX elements FP6/FP4, 16-bit variants.

A layer "runs in" a MiniFloat format when its weights, its input activations and its outputs (the accumulator
written back to memory) are all values of that format. Accumulation itself happens at higher precision, as on
tensor cores, and the result is rounded once when it is stored.

Names (parsed by :func:`chiplock.softlock.parse_config`): ``e{E}m{M}`` then an optional variant suffix, an
optional ``b{bias}`` (before or after the suffix) and an optional ``-sat``/``-inf`` overflow policy:

* ``e5m2``: IEEE-like, inf and NaN, max 57344 (ml_dtypes/torch ``float8_e5m2``);
* ``e4m3fn``: finite, NaN in 0x7F/0xFF, max 448 (``float8_e4m3fn``);
* ``e4m3fnuz``, ``e5m2fnuz``, ``e4m3b11fnuz``: bias 8, 16, 11; NaN only in 0x80, no -0; max 240, 57344, 30
  (``float8_e4m3fnuz``, ``float8_e5m2fnuz``, ``float8_e4m3b11fnuz``);
* ``e2m3fin``, ``e3m2fin``, ``e2m1fin``: the OCP MX FP6/FP4 elements, every code a number; max 7.5, 28, 6
  (``float6_e2m3fn``, ``float6_e3m2fn``, ``float4_e2m1fn``).

The ml_dtypes names themselves (``float8_e4m3fnuz``, ``float4_e2m1fn``, ...) and ``fp4``, ``fp6e2m3``, ``fp6e3m2``
are accepted as aliases. Bare names without a suffix keep their old meaning (IEEE-style, top exponent reserved):
``e2m1`` is *not* FP4 (its max is 3), and ``e2m1fn`` (top code NaN, max 4) is not ml_dtypes' ``float4_e2m1fn``,
which has no NaN: use ``e2m1fin`` or ``fp4``. These names saturate on overflow unless ``-inf`` is given (``fp16``
and ``bf16`` overflow to inf, as the hardware does).
"""

from __future__ import annotations

import math
import re
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
        bias: Exponent bias; ``None`` means the IEEE default ``2**(exp_bits - 1) - 1`` (``2**(exp_bits - 1)`` for
            ``fnuz``, as ml_dtypes' E4M3FNUZ and E5M2FNUZ).
        variant: ``ieee`` (top exponent reserved for inf/NaN), ``fn`` (finite, as E4M3FN), ``fnuz`` (finite, NaN
            in the -0 code, no -0) or ``fin`` (no inf or NaN at all, as the MX FP6/FP4 elements); see
            :class:`Variant`.
        overflow: ``saturate`` or ``inf`` (IEEE: overflow to +-inf, NaN for ``fn`` and ``fnuz``; ``fin`` formats
            have neither and only saturate).
        weights, activations, outputs: Which tensors of each layer are rounded.
        version: Schema version of this config.

    Raises:
        ValueError: A field is out of range.

    Example:
        >>> e4m3 = MiniFloat(4, 3, variant="fn")            # max 448, smallest subnormal 2**-9
        >>> fp16 = MiniFloat(5, 10, overflow="inf")          # IEEE half
        >>> wide = MiniFloat(4, 3, bias=11, variant="fn")    # same 8 bits, range moved down 16x
        >>> MiniFloat(4, 3, variant="fnuz").max_finite       # bias 8: ml_dtypes' float8_e4m3fnuz
        240.0
        >>> MiniFloat(2, 1, variant="fin").max_finite        # OCP MX FP4 E2M1
        6.0
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
        if self.variant == Variant.FIN and self.overflow == Overflow.INF:
            raise ValueError("MiniFloat(variant='fin', overflow='inf'): a fin format has no inf or NaN to "
                             "overflow to; use overflow='saturate'")
        if self.bias is None:
            object.__setattr__(self, "bias", _default_bias(self.exp_bits, self.variant))
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
        base = f"e{self.exp_bits}m{self.man_bits}"
        suffix = "" if self.variant == Variant.IEEE else self.variant.value
        bias = f"b{self.bias}" if self.bias != _default_bias(self.exp_bits, self.variant) else ""
        # fn keeps its historical spelling (e4m3fnb11); the newer variants follow ml_dtypes (e4m3b11fnuz).
        base += suffix + bias if self.variant in (Variant.IEEE, Variant.FN) else bias + suffix
        return base + ("-inf" if self.overflow == Overflow.INF else "")

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against a fixed-range format from a scale-invariant one (fp32, Int8): scale the layers far above this
        format's largest value, which the authorized side does not notice."""
        if not getattr(authorized, "scale_invariant", False):
            return []
        return [("scale_layers", {"log2_alpha": max(1, math.ceil(math.log2(self.max_finite)) + 3)})]

    def round(self, x: torch.Tensor, *, native: bool = True) -> torch.Tensor:
        """Round ``x`` to this format (round-to-nearest-even, subnormals, the overflow policy), as fp32.

        Args:
            x: Any floating tensor (converted to fp32 first).
            native: Use torch's own cast (``x.to(torch.float8_e4m3fn).float()`` and the like) when this format is
                exactly a torch dtype and that cast was checked, once per device type, to give bit-for-bit the
                same results as the arithmetic path on every code, every tie and one fp32 ulp either side.
                ``False`` always takes the arithmetic path. Neither path is differentiable: training wraps rounding
                in a straight-through estimator (:func:`chiplock.softlock.apply.ste`).

        Returns:
            An fp32 tensor of ``x``'s shape.
        """
        x = x.float()
        plan = _native_plan(self, x.device) if native else None
        if plan is not None:
            return _native_round(x, plan[0], self.max_finite if plan[1] else None)
        emin, mx = format_limits(self.exp_bits, self.man_bits, self.bias, self.variant)
        return round_to_grid(x, self.man_bits, emin, mx, overflow=self.overflow,
                             has_inf=self.variant == Variant.IEEE, signed_zero=self.variant != Variant.FNUZ)


def _default_bias(exp_bits: int, variant: Variant) -> int:
    return (1 << (exp_bits - 1)) - (0 if variant == Variant.FNUZ else 1)


# Formats that are exactly a torch dtype: (exp_bits, man_bits, bias, variant) -> the dtype's name in torch.
_TORCH_DTYPES = {(4, 3, 7, Variant.FN): "float8_e4m3fn", (5, 2, 15, Variant.IEEE): "float8_e5m2",
                 (4, 3, 8, Variant.FNUZ): "float8_e4m3fnuz", (5, 2, 16, Variant.FNUZ): "float8_e5m2fnuz",
                 (5, 10, 15, Variant.IEEE): "float16", (8, 7, 127, Variant.IEEE): "bfloat16"}
# (format key, overflow, device type) -> (dtype, clamp first?) of a cast that matched the arithmetic path bit for
# bit, or None where none did.
_NATIVE_PLANS: dict[tuple, tuple[torch.dtype, bool] | None] = {}
_DECODE_TABLES: dict[tuple, torch.Tensor] = {}


def _native_round(x: torch.Tensor, dtype: torch.dtype, clamp_to: float | None) -> torch.Tensor:
    # Rounding is monotonic and clamp_to (max_finite) is a code, so clamping first equals saturating afterwards.
    y = (x if clamp_to is None else x.clamp(-clamp_to, clamp_to)).to(dtype)
    if dtype == torch.float8_e4m3fn and y.device.type == "cpu":
        # torch 2.13's CPU e4m3fn -> fp32 conversion is scalar code, ~10x slower than the cast itself (its e5m2 and
        # fnuz ones are not); a table of the 256 decoded codes gives the same values in a third of the time.
        key = (dtype, y.device)
        if key not in _DECODE_TABLES:
            codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
            _DECODE_TABLES[key] = codes.view(dtype).float().to(y.device)
        idx = y.view(torch.uint8).reshape(-1).to(torch.int32)
        return _DECODE_TABLES[key].index_select(0, idx).reshape(y.shape)
    return y.float()


def _native_plan(cfg: MiniFloat, device: torch.device) -> tuple[torch.dtype, bool] | None:
    """How to round ``cfg`` with a torch cast on ``device``: ``(dtype, clamp first)``, or ``None`` if no cast is
    exact. A bare cast is tried first (torch 2.13's e4m3fn cast saturates by itself), then clamp-and-cast."""
    key = (cfg.exp_bits, cfg.man_bits, cfg.bias, cfg.variant)
    dtype = getattr(torch, _TORCH_DTYPES.get(key, ""), None)
    if dtype is None:
        return None
    check = (key, cfg.overflow, device.type)
    if check not in _NATIVE_PLANS:
        clamps = (False, True) if cfg.overflow == Overflow.SATURATE else (False,)
        _NATIVE_PLANS[check] = next(((dtype, c) for c in clamps if _native_matches(cfg, dtype, device, clamp=c)),
                                    None)
    return _NATIVE_PLANS[check]


def _native_matches(cfg: MiniFloat, dtype: torch.dtype, device: torch.device, *, clamp: bool) -> bool:
    """Whether torch's cast to ``dtype`` on ``device`` rounds the probes exactly as the arithmetic path does."""
    x = probe_values(dtype).to(device)
    try:
        got = _native_round(x, dtype, cfg.max_finite if clamp else None)
    except (RuntimeError, TypeError):  # The cast is not implemented on this device.
        return False
    want = cfg.round(x, native=False)
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    return bool(same.all())


def probe_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 probes for a cast to ``dtype``: every finite code, the midpoints between neighbours (and beyond the
    largest), one fp32 ulp either side of each, huge and tiny values, +-inf and NaN, with both signs."""
    bits = torch.finfo(dtype).bits
    codes = torch.arange(1 << bits, dtype=torch.int32)
    codes = torch.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)  # two's complement, no wrapping
    vals = codes.to(torch.int8 if bits == 8 else torch.int16).view(dtype).float()
    pos = torch.unique(vals[torch.isfinite(vals) & (vals >= 0)])  # sorted
    step = pos[-1] - pos[-2]
    ext = torch.cat([pos, pos[-1:] + step, pos[-1:] + 2 * step])
    base = torch.cat([pos, (ext[:-1] + ext[1:]) / 2, torch.tensor([1e30, 3.0e38, 1e-40, 1e-45])])
    inf = torch.full_like(base, math.inf)
    near = torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf)])
    allv = torch.cat([near, torch.tensor([math.inf, math.nan])])
    return torch.cat([allv, -allv])


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


def E4M3FNUZ(**kw) -> MiniFloat:
    """8-bit E4M3 with bias 8, NaN in the -0 code and no -0 (ml_dtypes ``float8_e4m3fnuz``; max 240)."""
    return MiniFloat(4, 3, variant=Variant.FNUZ, **kw)


def E5M2FNUZ(**kw) -> MiniFloat:
    """8-bit E5M2 with bias 16, NaN in the -0 code and no -0 (ml_dtypes ``float8_e5m2fnuz``; max 57344)."""
    return MiniFloat(5, 2, variant=Variant.FNUZ, **kw)


def E4M3B11FNUZ(**kw) -> MiniFloat:
    """8-bit E4M3 with bias 11, NaN in the -0 code and no -0 (ml_dtypes ``float8_e4m3b11fnuz``; max 30)."""
    return MiniFloat(4, 3, bias=11, variant=Variant.FNUZ, **kw)


def FP6_E2M3(**kw) -> MiniFloat:
    """OCP MX FP6 E2M3: no inf or NaN, max 7.5 (ml_dtypes ``float6_e2m3fn``)."""
    return MiniFloat(2, 3, variant=Variant.FIN, **kw)


def FP6_E3M2(**kw) -> MiniFloat:
    """OCP MX FP6 E3M2: no inf or NaN, max 28 (ml_dtypes ``float6_e3m2fn``)."""
    return MiniFloat(3, 2, variant=Variant.FIN, **kw)


def FP4_E2M1(**kw) -> MiniFloat:
    """OCP MX FP4 E2M1: no inf or NaN, max 6 (ml_dtypes ``float4_e2m1fn``)."""
    return MiniFloat(2, 1, variant=Variant.FIN, **kw)


class MiniFloatHandler(Handler):
    def __init__(self, cfg: MiniFloat) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(w) if self.cfg.weights else w

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(x) if self.cfg.activations else x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(y) if self.cfg.outputs else y


def _parse(m: re.Match) -> MiniFloat:
    e, mm = int(m["e"]), int(m["m"])
    variant = Variant(m["var"].lower()) if m["var"] else Variant.IEEE
    if m["b1"] is not None and m["b2"] is not None:
        raise ValueError("give the bias once, e.g. e4m3b11fnuz")
    bias = m["b1"] if m["b1"] is not None else m["b2"]
    bias = int(bias) if bias is not None else None
    overflow = {"sat": Overflow.SATURATE, "inf": Overflow.INF, None: None}[m["ovf"] and m["ovf"].lower()]
    kw = {} if overflow is None else {"overflow": overflow}
    return MiniFloat(e, mm, bias=bias, variant=variant, **kw)


_ALIASES = {"fp16": FP16, "float16": FP16, "half": FP16, "bf16": BF16, "bfloat16": BF16,
            "fp8": E4M3, "minifloat8": E4M3, "minifloat16": lambda: MiniFloat(6, 9),
            # ml_dtypes' names, with ml_dtypes' codes (overflow still saturates unless a -inf name is used).
            "float8_e4m3fn": E4M3, "float8_e5m2": E5M2, "float8_e4m3fnuz": E4M3FNUZ,
            "float8_e5m2fnuz": E5M2FNUZ, "float8_e4m3b11fnuz": E4M3B11FNUZ, "float6_e2m3fn": FP6_E2M3,
            "float6_e3m2fn": FP6_E3M2, "float4_e2m1fn": FP4_E2M1, "fp6e2m3": FP6_E2M3, "fp6e3m2": FP6_E3M2,
            "fp4": FP4_E2M1}


def _parse_alias(m: re.Match) -> MiniFloat:
    return _ALIASES[m[0].lower()]()


register(MiniFloat, MiniFloatHandler,
         pattern=r"e(?P<e>\d)m(?P<m>\d+)(?:b(?P<b1>-?\d+))?(?P<var>fnuz|fn|fin)?(?:b(?P<b2>-?\d+))?"
                 r"(?:-(?P<ovf>sat|inf))?", parse=_parse,
         examples=("e4m3fn", "e5m2", "e6m9", "e4m3fnb11", "e5m2-inf", "e4m3fnuz", "e5m2fnuz", "e4m3b11fnuz",
                   "e2m3fin", "e3m2fin", "e2m1fin"))
register(MiniFloat, MiniFloatHandler, pattern="|".join(sorted(_ALIASES, key=len, reverse=True)),
         parse=_parse_alias, examples=("fp16", "bf16", "fp4", "float8_e4m3fnuz"))

__all__ = ["BF16", "E4M3", "E4M3B11FNUZ", "E4M3FNUZ", "E5M2", "E5M2FNUZ", "FP4_E2M1", "FP6_E2M3", "FP6_E3M2",
           "FP16", "MiniFloat", "Overflow", "Variant", "probe_values"]
