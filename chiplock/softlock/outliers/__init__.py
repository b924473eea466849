"""Dense-and-sparse deployment: the largest weights stay in high precision, the rest run on a base format.

LLM quantisers (SpQR, SqueezeLLM, LLM.int8()'s weight-side cousin) keep a small fraction of outlier weights in
FP16 as a sparse matrix and quantise the dense remainder, so a few huge weights no longer set a channel's scale.
:class:`DenseAndSparse` emulates that for any base configuration: per layer, the ``fraction`` of weights with the
largest magnitude pass through unrounded (fp32 here, i.e. at least FP16), the others (with the outliers removed
before the base format computes its scales) go through the base handler; activations and outputs follow the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, get_handler, parse_config, register


@dataclass(frozen=True)
class DenseAndSparse:
    """``base`` with the top ``fraction`` of each layer's weights (by magnitude) kept in high precision.

    Args:
        base: Name of the base configuration (``int8``, ``e4m3fn@channel``...).
        fraction: Fraction of each layer's weights kept as sparse outliers, in ``(0, 0.5]``.
        version: Schema version of this config.

    Raises:
        ValueError: ``fraction`` out of range.

    Example:
        >>> DenseAndSparse("int8", 0.01).name
        'int8@sparse0.01'
    """

    base: str = "int8"
    fraction: float = 0.01
    version: int = 1

    family: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.fraction) <= 0.5:
            raise ValueError(f"DenseAndSparse(fraction={self.fraction}): use a fraction in (0, 0.5]")
        object.__setattr__(self, "fraction", float(self.fraction))
        object.__setattr__(self, "base", parse_config(self.base).name)

    @property
    def name(self) -> str:
        return f"{self.base}@sparse{self.fraction:g}"

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        return []


class DenseAndSparseHandler(Handler):
    def __init__(self, cfg: DenseAndSparse) -> None:
        self.cfg = cfg
        self.base = get_handler(parse_config(cfg.base))

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        k = int(self.cfg.fraction * w.numel())
        if k == 0:
            return self.base.weight(w)
        idx = torch.topk(w.detach().abs().reshape(-1), k).indices
        keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        keep[idx] = True
        keep = keep.reshape(w.shape)
        dense = self.base.weight(torch.where(keep, torch.zeros_like(w), w))
        return torch.where(keep, w, dense)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.activation(x)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.base.output(y)


register(DenseAndSparse, DenseAndSparseHandler, pattern=r"(?P<base>.+)@sparse(?P<f>[0-9.]+)",
         parse=lambda m: DenseAndSparse(m["base"], float(m["f"])), examples=("int8@sparse0.01",))

__all__ = ["DenseAndSparse"]
