"""Exact rounding of fp32 tensors onto a binary floating-point grid E{e}M{m} with a given bias.

The arithmetic is fp32 only and exact: ``frexp`` splits off the exponent, the significand is scaled by a power of
two so the bits to keep form an integer part, :func:`torch.round` rounds half to even, and the result is scaled
back. Scaling by powers of two is exact in binary floating point, so the only rounding is the one we ask for.
"""

from __future__ import annotations

import enum
import math

import torch


class Variant(str, enum.Enum):
    """How the top exponent code is used.

    ``ieee``: the all-ones exponent encodes infinities and NaNs (as in FP16, BF16, E5M2).
    ``fn``: finite-only; only the all-ones exponent *and* mantissa is NaN (as in E4M3FN), so the top binade holds
    numbers too.
    ``fnuz``: finite, no negative zero (as in ml_dtypes' E4M3FNUZ, E5M2FNUZ, E4M3B11FNUZ): the "-0" code is the only
    NaN, every other code is a number, and a result that would be -0 is +0. Its default bias is ``2**(e - 1)``,
    one more than IEEE's.
    ``fin``: every code is a number, with no infinity and no NaN (as the OCP MX elements FP6 E2M3, FP6 E3M2 and
    FP4 E2M1; ml_dtypes calls them ``float6_e2m3fn`` etc.). Overflow always saturates.
    """

    IEEE = "ieee"
    FN = "fn"
    FNUZ = "fnuz"
    FIN = "fin"


class Overflow(str, enum.Enum):
    """What a value beyond the largest finite number becomes after round-to-nearest-even.

    ``saturate``: the largest finite number of the same sign (infinities too).
    ``inf``: IEEE behaviour: +-inf for the ``ieee`` variant, NaN for ``fn`` (which has no infinity).
    """

    SATURATE = "saturate"
    INF = "inf"


def format_limits(exp_bits: int, man_bits: int, bias: int, variant: Variant) -> tuple[int, float]:
    """``(emin, max_finite)``: the smallest normal exponent and the largest finite value of the format."""
    emin = 1 - bias
    if variant == Variant.IEEE:
        emax = (1 << exp_bits) - 2 - bias
        max_finite = math.ldexp(2.0 - 2.0 ** -man_bits, emax)
    elif variant == Variant.FN:
        emax = (1 << exp_bits) - 1 - bias
        if man_bits == 0:
            raise ValueError("the fn variant needs at least one mantissa bit (its top code is NaN)")
        max_finite = math.ldexp(2.0 - 2.0 ** (1 - man_bits), emax)
    else:  # fnuz and fin: the top code is a number.
        emax = (1 << exp_bits) - 1 - bias
        max_finite = math.ldexp(2.0 - 2.0 ** -man_bits, emax)
    return emin, max_finite


def round_to_grid(x: torch.Tensor, man_bits: int, emin: int, max_finite: float, *,
                  overflow: Overflow = Overflow.SATURATE, has_inf: bool = True, signed_zero: bool = True,
                  method: str = "auto") -> torch.Tensor:
    """Round ``x`` (fp32) to the nearest value with ``man_bits`` fraction bits, ties to even.

    Args:
        x: Input tensor (converted to fp32).
        man_bits: Explicit mantissa bits ``m``.
        emin: Smallest normal exponent; below ``2**emin`` the grid is subnormal with step ``2**(emin - m)``.
        max_finite: The largest finite value.
        overflow: Saturate or overflow (see :class:`Overflow`).
        has_inf: Whether the format has infinities (``False`` makes overflow produce NaN).
        signed_zero: Whether the format has -0 (``False``, as in the fnuz formats, turns every -0 into +0).
        method: ``"add"`` (fast, needs headroom in fp32's range), ``"frexp"`` (general), or ``"auto"``.

    Returns:
        An fp32 tensor whose finite values are all exactly representable in the format; the sign of zero is
        kept (unless ``signed_zero`` is false) and NaN stays NaN.
    """
    x = x.float()
    emax = math.frexp(max_finite)[1] - 1
    if method == "auto":
        method = "add" if (man_bits <= 20 and emin >= -126 and emax + 26 - man_bits <= 127) else "frexp"
    if method == "add":
        q = _round_add(x, man_bits, emin, emax)
    elif method == "frexp":
        q = _round_frexp(x, man_bits, emin)
    else:
        raise ValueError(f"round_to_grid(method={method!r}): use 'auto', 'add' or 'frexp'")
    if not signed_zero:
        q = q.add_(0.0)  # In IEEE arithmetic -0 + 0 = +0, and adding zero changes no other value.
    if overflow == Overflow.SATURATE:
        return q.clamp_(-max_finite, max_finite)  # clamp keeps NaN; +-inf saturate too
    fill = torch.copysign(torch.full_like(q, math.inf), x) if has_inf else torch.full_like(q, math.nan)
    return torch.where(q.abs() > max_finite, fill, q)


_EXP_MASK = 0x7F800000


def _round_add(x: torch.Tensor, m: int, emin: int, emax: int) -> torch.Tensor:
    # The exponent field alone (mantissa bits cleared) is 2**E for a normal x: the binade's lower edge.
    e2 = torch.bitwise_and(x.view(torch.int32), torch.tensor(_EXP_MASK, dtype=torch.int32)).view(torch.float32)
    # Below 2**emin the target grid is subnormal with the fixed step 2**(emin - m); at and above 2**(emax + 1)
    # everything overflows, so a capped step is enough (and keeps the constant finite).
    c = torch.clamp(e2, min=2.0 ** emin, max=2.0 ** (emax + 1)).mul_(1.5 * 2.0 ** (23 - m))
    # c is 1.5 * 2**23 steps; x + c lands in c's binade whose ulp is one step, so the fp32 addition itself rounds
    # x to the grid, ties to even (c is an even number of steps, so the parity is x's), and - c is exact.
    q = (x + c).sub_(c)
    return torch.copysign(q, x)


def _round_frexp(x: torch.Tensor, m: int, emin: int) -> torch.Tensor:
    mant, ex = torch.frexp(x)  # x = mant * 2**ex, |mant| in [0.5, 1)
    e = ex.float()
    # Bits kept: m + 1 for normal numbers, fewer for subnormals, and -1 (all round to zero) far below.
    keep = torch.clamp(e + (m - emin), min=-1, max=m + 1)
    r = torch.round(mant * torch.exp2(keep))  # exact scaling; round() is round-half-to-even and keeps -0
    return r * torch.exp2(e - keep)
