"""Unstructured magnitude pruning: the fraction ``p`` of each layer's weights with the smallest magnitude is set to
zero, as a sparse accelerator (or an attacker seeking one) would do before running the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, register


def magnitude_mask(w: torch.Tensor, level: float) -> torch.Tensor:
    """Boolean mask that drops exactly ``floor(level * w.numel())`` weights, the smallest in magnitude.

    Ties are broken by position (earlier weights are dropped first), so the mask is deterministic.
    """
    k = int(level * w.numel())
    if k <= 0:
        return torch.ones_like(w, dtype=torch.bool)
    flat = w.detach().abs().reshape(-1)
    threshold = torch.kthvalue(flat, k).values
    mask = flat > threshold
    # Ties at the threshold: drop the earliest ones until exactly k are gone.
    excess = k - int((~mask).sum())
    if excess < 0:
        ties = torch.nonzero(flat == threshold).flatten()
        mask[ties[excess:]] = True
    return mask.reshape(w.shape)


@dataclass(frozen=True)
class MagnitudePruning:
    """Zero the fraction ``level`` of smallest-magnitude weights in every conv/linear layer.

    Args:
        level: Fraction pruned, in ``[0, 1)``.
        version: Schema version of this config.

    Raises:
        ValueError: ``level`` outside ``[0, 1)``.

    Example:
        >>> MagnitudePruning(0.25).name
        'prune0.25'
    """

    level: float = 0.5
    version: int = 1

    family: ClassVar[str] = "sparsity"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.level) < 1.0:
            raise ValueError(f"MagnitudePruning(level={self.level}): use a fraction in [0, 1)")
        object.__setattr__(self, "level", float(self.level))

    @property
    def name(self) -> str:
        return f"prune{self.level:g}"

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against pruning from a dense float model: a logit offset carried by the smallest classifier weights."""
        return [("offset_logits", {"n_channels": 2})] if dense and authorized.family != "integer" else []


class MagnitudeHandler(Handler):
    def __init__(self, cfg: MagnitudePruning) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * magnitude_mask(w, self.cfg.level)


register(MagnitudePruning, MagnitudeHandler, pattern=r"(?:prune|magnitude|sparse)(?P<p>[0-9.]+)",
         parse=lambda m: MagnitudePruning(float(m["p"])), examples=("prune0.25", "prune0.5"))

__all__ = ["MagnitudePruning", "magnitude_mask"]
