"""A toy soft-lock format plug-in, the whole of it (docs/extending.md): fixed point with ``frac_bits``
fractional bits (``fixed4`` rounds weights and activations to multiples of 1/16, saturating at +-8).

It declares its traits and the lever that breaks it, so ``plan_levers`` and ``chiplock softlock formats`` need no
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, register


@dataclass(frozen=True)
class ToyFixed:
    frac_bits: int = 4
    version: int = 1

    family: ClassVar[str] = "integer"
    scale_invariant: ClassVar[bool] = False  # A fixed range of +-8.

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 12:
            raise ValueError(f"ToyFixed(frac_bits={self.frac_bits}): use 0..12")

    @property
    def name(self) -> str:
        return f"fixed{self.frac_bits}"

    def round(self, x: torch.Tensor) -> torch.Tensor:
        step = 2.0 ** -self.frac_bits
        return torch.clamp(torch.round(x / step) * step, -8.0, 8.0 - step)

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        # From a scale-invariant format, scaling the layers far above +-8 saturates this one.
        return [("scale_layers", {"log2_alpha": 6})] if getattr(authorized, "scale_invariant", False) else []


class ToyFixedHandler(Handler):
    def __init__(self, cfg: ToyFixed) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(w)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.round(x)


# The one registration line: the handler, the CLI name pattern and an example name.
register(ToyFixed, ToyFixedHandler, pattern=r"fixed(?P<f>\d+)", parse=lambda m: ToyFixed(int(m["f"])),
         examples=("fixed4",))
