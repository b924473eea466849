"""Int8 affine quantisation: ``q = clamp(round(x / scale) + zero_point)``, ``x_hat = (q - zero_point) * scale``.

Weights use a static scale from their own range (per tensor or per output channel). Activations use a dynamic
scale computed per example, so a result never depends on which other images share the batch. Products of int8
values accumulate exactly in int32 on real hardware; in fp32 emulation the sums of products of integers stay
exact while they are below 2**24, which holds for every layer size used here, so outputs are not rounded again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, register


class Granularity(str, enum.Enum):
    """One scale for the whole weight tensor, or one per output channel (row of a linear layer)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


def quantize_affine(x: torch.Tensor, *, dims: tuple[int, ...] | None, symmetric: bool,
                    bits: int = 8) -> torch.Tensor:
    """Fake-quantise ``x`` to ``bits``-bit integers and back, with ranges reduced over ``dims``.

    Args:
        x: Tensor to quantise.
        dims: Dimensions reduced to find the range (``None``: all of them, one scale).
        symmetric: Zero point 0 and codes ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``; else an asymmetric
            range ``[min, max]`` (always containing 0) mapped onto ``[-2**(bits-1), 2**(bits-1) - 1]``.
        bits: Integer width.

    Returns:
        The dequantised tensor (fp32), same shape as ``x``.
    """
    x = x.float()
    qmax = (1 << (bits - 1)) - 1
    qmin = -qmax - 1
    if dims is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = torch.maximum(torch.maximum(-lo, hi) / qmax, torch.full_like(hi, tiny))
        q = torch.clamp(torch.round(x / scale), -qmax, qmax)
        return q * scale
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.maximum((hi - lo) / (qmax - qmin), torch.full_like(hi, tiny))
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


@dataclass(frozen=True)
class Int8:
    """Int8 affine quantisation of weights and activations.

    Args:
        granularity: Weight scales ``per_channel`` (default) or ``per_tensor``.
        symmetric: Symmetric weights (zero point 0). Activations use ``act_symmetric``.
        act_symmetric: Symmetric activation codes; the default asymmetric range suits post-ReLU values.
        weights, activations: Which tensors are quantised.
        bits: Integer width (8 for Int8; smaller values are allowed for experiments).
        version: Schema version of this config.

    Raises:
        ValueError: ``bits`` outside 2..16.

    Example:
        >>> Int8()                                        # per-channel symmetric weights
        >>> Int8(granularity="per_tensor", symmetric=False)
    """

    granularity: Granularity = Granularity.PER_CHANNEL
    symmetric: bool = True
    act_symmetric: bool = False
    weights: bool = True
    activations: bool = True
    bits: int = 8
    version: int = 1

    # Per-channel weight scales and per-example activation scales: rescaling a layer by 2**k changes nothing.
    family: ClassVar[str] = "integer"
    scale_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if not 2 <= self.bits <= 16:
            raise ValueError(f"Int8(bits={self.bits}): use 2..16 bits")

    @property
    def name(self) -> str:
        base = "int8" if self.bits == 8 else f"int{self.bits}"
        if self.granularity == Granularity.PER_TENSOR:
            base += "-per_tensor"
        if not self.symmetric:
            base += "-asym"
        return base

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against Int8 from a wide float format: outlier channels that set a per-tensor activation scale, plus
        a logit offset. None when the authorized format would overflow an outlier 2**8 above O(1) values."""
        if authorized.family != "float" or authorized.max_finite < 2.0 ** 14:
            return []
        return [("outlier_channels", {"log2_k": 8, "fraction": 0.0}),
                ("stream_outliers", {"log2_k": 8, "fraction": 0.0}),
                ("offset_logits", {"n_channels": 2, "log2_c": 12, "first": 4})]

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        dims = None if self.granularity == Granularity.PER_TENSOR or w.dim() < 2 else tuple(range(1, w.dim()))
        return quantize_affine(w, dims=dims, symmetric=self.symmetric, bits=self.bits)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim())) if x.dim() > 1 else None
        return quantize_affine(x, dims=dims, symmetric=self.act_symmetric, bits=self.bits)


class Int8Handler(Handler):
    def __init__(self, cfg: Int8) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.quantize_weight(w) if self.cfg.weights else w

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.quantize_activation(x) if self.cfg.activations else x


def _parse(m) -> Int8:
    opts = [o for o in (m["opts"] or "").lower().split("-") if o]
    kw: dict = {"bits": int(m["bits"])}
    for o in opts:
        if o in ("per_tensor", "tensor"):
            kw["granularity"] = Granularity.PER_TENSOR
        elif o in ("per_channel", "channel"):
            kw["granularity"] = Granularity.PER_CHANNEL
        elif o in ("asym", "asymmetric"):
            kw["symmetric"] = False
        elif o in ("sym", "symmetric"):
            kw["symmetric"] = True
        else:
            raise ValueError(f"unknown int option {o!r} (use per_tensor, per_channel, sym, asym)")
    return Int8(**kw)


register(Int8, Int8Handler, pattern=r"int(?P<bits>\d+)(?P<opts>(?:-[a-z_]+)*)", parse=_parse,
         examples=("int8", "int8-per_tensor", "int8-asym", "int4"))

__all__ = ["Granularity", "Int8", "quantize_affine"]
