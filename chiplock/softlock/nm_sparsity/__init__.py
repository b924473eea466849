"""N:M structured sparsity (2:4 on NVIDIA Ampere and later): in every group of M consecutive weights along the
input dimension, only the N largest in magnitude are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, register


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude weights of each group of ``m`` along the input dimension.

    The input dimension of a conv weight ``(out, in, kh, kw)`` is ``in * kh * kw`` flattened; if its length is not
    a multiple of ``m`` the tail group is padded with zeros (which are never preferred over real weights).
    Ties keep the earlier weight, so the mask is deterministic.
    """
    flat = w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(1, -1)
    k = flat.shape[1]
    pad = (-k) % m
    mag = torch.nn.functional.pad(flat.abs(), (0, pad), value=-1.0).reshape(flat.shape[0], -1, m)
    # A stable descending sort keeps the earlier index on ties.
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(flat.shape[0], -1)[:, :k].reshape(w.shape)


@dataclass(frozen=True)
class NMSparsity:
    """Keep ``n`` of every ``m`` consecutive weights (by magnitude); activations stay dense.

    Args:
        n: Weights kept per group.
        m: Group size.
        version: Schema version of this config.

    Raises:
        ValueError: Unless ``0 < n < m``.

    Example:
        >>> NMSparsity(2, 4).name
        '2:4'
    """

    n: int = 2
    m: int = 4
    version: int = 1

    family: ClassVar[str] = "sparsity"

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"NMSparsity(n={self.n}, m={self.m}): need 0 < n < m")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against pruning from a dense float model: a logit offset carried by the smallest classifier weights."""
        return [("offset_logits", {"n_channels": 2})] if dense and authorized.family != "integer" else []


class NMHandler(Handler):
    def __init__(self, cfg: NMSparsity) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * nm_mask(w, self.cfg.n, self.cfg.m)


register(NMSparsity, NMHandler, pattern=r"(?:nm)?(?P<n>\d+):(?P<m>\d+)",
         parse=lambda m: NMSparsity(int(m["n"]), int(m["m"])), examples=("2:4", "1:4"))

__all__ = ["NMSparsity", "nm_mask"]
