"""FP32: the reference configuration. Nothing is rounded (the emulation itself runs in fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chiplock.softlock.registry import Handler, register


@dataclass(frozen=True)
class FP32:
    """Run the layer in IEEE single precision, i.e. unchanged.

    Example:
        >>> apply_config(model, FP32())  # a copy of the model, numerically identical
    """

    version: int = 1

    # What lock training's lever planner reads (chiplock.softlock.levers): a wide float format whose results do
    # not change when a layer and its BatchNorm are rescaled by a power of two. No lever breaks fp32 itself.
    family: ClassVar[str] = "float"
    scale_invariant: ClassVar[bool] = True
    max_finite: ClassVar[float] = 3.4028234663852886e38

    @property
    def name(self) -> str:
        return "fp32"


register(FP32, lambda cfg: Handler(), pattern=r"fp32|float32|f32", parse=lambda m: FP32(), examples=("fp32",))

__all__ = ["FP32"]
