"""FP32: the reference configuration. Nothing is rounded (the emulation itself runs in fp32)."""

from __future__ import annotations

from dataclasses import dataclass

from chiplock.softlock.registry import Handler, register


@dataclass(frozen=True)
class FP32:
    """Run the layer in IEEE single precision, i.e. unchanged.

    Example:
        >>> apply_config(model, FP32())  # a copy of the model, numerically identical
    """

    version: int = 1

    @property
    def name(self) -> str:
        return "fp32"


register(FP32, lambda cfg: Handler(), pattern=r"fp32|float32|f32", parse=lambda m: FP32())

__all__ = ["FP32"]
