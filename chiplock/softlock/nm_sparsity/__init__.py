"""N:M structured sparsity (2:4 on NVIDIA Ampere and later): in every group of M consecutive weights along the
input dimension, only the N largest in magnitude are kept.

For a convolution weight ``(out, in, kh, kw)`` the groups run along the input channels at each kernel position,
as sparse tensor cores see the weight (NHWC, K = kh * kw * in with the channels innermost) and as NVIDIA's ASP
prunes it. Configurations of schema version 1 grouped the flattened ``in * kh * kw`` (NCHW order) instead; they
load with ``order="flat"`` and evaluate as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from chiplock.softlock.registry import Handler, register

ORDERS = ("channel", "flat")


def nm_mask(w: torch.Tensor, n: int, m: int, *, order: str = "channel") -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude weights of each group of ``m`` along the input dimension.

    Args:
        w: A weight ``(out, in)`` or ``(out, in, *kernel)``, or non-negative importance scores of that shape (as
            Wanda's ``|w| * ||x||``); a 1-D tensor is one row.
        n: Weights kept per group.
        m: Group size.
        order: ``channel``: groups of ``m`` input channels at each kernel position (the hardware's grouping);
            ``flat``: groups of the flattened ``in * kh * kw`` in NCHW order (schema version 1). Both are the same
            for a linear layer.

    Returns:
        A boolean tensor of ``w``'s shape. If the grouped length is not a multiple of ``m``, the tail group is
        padded with values that are never preferred over real weights. Ties keep the earlier weight, so the mask
        is deterministic.

    Raises:
        ValueError: ``order`` is unknown.

    Example:
        >>> mask = nm_mask(conv.weight, 2, 4)   # every (o, 4c:4c+4, i, j) keeps 2
    """
    if order not in ORDERS:
        raise ValueError(f"nm_mask(order={order!r}): use one of {', '.join(ORDERS)}")
    w = w.detach()
    if w.dim() < 2:
        return nm_mask(w.reshape(1, -1), n, m, order=order).reshape(w.shape)
    # Move the input channels innermost: (out, *kernel, in), so that consecutive values share a kernel position.
    rows = w.movedim(1, -1) if order == "channel" and w.dim() > 2 else w
    flat = rows.reshape(-1, rows.shape[-1]) if order == "channel" else rows.reshape(rows.shape[0], -1)
    k = flat.shape[1]
    pad = (-k) % m
    mag = torch.nn.functional.pad(flat.abs(), (0, pad), value=-1.0).reshape(flat.shape[0], -1, m)
    # A stable descending sort keeps the earlier index on ties.
    order_idx = torch.sort(mag, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, order_idx, True)
    keep = keep.reshape(flat.shape[0], -1)[:, :k].reshape(rows.shape)
    return keep.movedim(-1, 1) if rows is not w else keep


@dataclass(frozen=True)
class NMSparsity:
    """Keep ``n`` of every ``m`` consecutive weights (by magnitude); activations stay dense.

    Args:
        n: Weights kept per group.
        m: Group size.
        order: ``channel`` (groups of input channels at each kernel position, as sparse tensor cores) or ``flat``
            (the flattened ``in * kh * kw``); ``None`` means ``channel``, or ``flat`` for ``version=1`` files.
        version: Schema version of this config (2 added ``order``; version 1 grouped ``flat``).

    Raises:
        ValueError: Unless ``0 < n < m``; an unknown ``order`` or ``version``.

    Example:
        >>> NMSparsity(2, 4).name
        '2:4'
        >>> NMSparsity(2, 4, order="flat").name
        '2:4-flat'
    """

    n: int = 2
    m: int = 4
    order: str | None = None
    version: int = 2

    family: ClassVar[str] = "sparsity"

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"NMSparsity(n={self.n}, m={self.m}): need 0 < n < m")
        if self.version not in (1, 2):
            raise ValueError(f"NMSparsity(version={self.version}): this chiplock reads versions 1 and 2; "
                             f"upgrade chiplock to read newer files")
        if self.order is None:
            object.__setattr__(self, "order", "flat" if self.version == 1 else "channel")
        if self.order not in ORDERS:
            raise ValueError(f"NMSparsity(order={self.order!r}): use one of {', '.join(ORDERS)}")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" + ("-flat" if self.order == "flat" else "")

    def lock_levers(self, authorized: Any, dense: bool) -> list[tuple[str, dict]]:
        """Against pruning from a dense float model: a logit offset carried by the smallest classifier weights."""
        return [("offset_logits", {"n_channels": 2})] if dense and authorized.family != "integer" else []

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """The mask this configuration applies to weight ``w`` (see :func:`nm_mask`)."""
        return nm_mask(w, self.n, self.m, order=self.order)


class NMHandler(Handler):
    def __init__(self, cfg: NMSparsity) -> None:
        self.cfg = cfg

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.cfg.mask(w)


register(NMSparsity, NMHandler, pattern=r"(?:nm)?(?P<n>\d+):(?P<m>\d+)(?:-(?P<order>flat|channel))?",
         parse=lambda m: NMSparsity(int(m["n"]), int(m["m"]), order=m["order"] and m["order"].lower()),
         examples=("2:4", "1:4", "2:4-flat"))

__all__ = ["NMSparsity", "nm_mask"]
