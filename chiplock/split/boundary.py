"""Boundary transforms: a random channel map at each stream that crosses a stage boundary, folded into the
tensors that write the stream and, inverted, into those that read it, so the model computes the same function
while no stage's weights match the plain model's.

The maps are *monomial*: a permutation of the channels times positive scales. They are the invertible maps that
commute with ReLU, batch norm (applied per channel) and average pooling, which sit between the linear layers of
the CNNs and MLPs here, so one map can be folded across a whole ResNet residual stream. (A general invertible
matrix needs a purely linear boundary, as a transformer's residual stream without normalisation.)

Folding map ``(perm, scale)`` into a tensor listed by a :class:`~chiplock.split.units.StreamEntry` gathers the
channels along ``entry.dim`` by ``perm`` and multiplies them by ``scale ** entry.power``. A gradient, or an
optimiser's first moment, of that tensor transforms with ``scale ** -power`` and a second moment with
``scale ** -2·power`` (:func:`fold` does both when given the optimiser), so a rotation during training keeps
the optimiser's state consistent: exactly so for the permutation, while the scales, like any
reparameterisation, change the effective step size per channel.

Example:
    >>> units, streams = build_units(ArchSpec("mlp", width=8))
    >>> maps = {s.name: random_boundary(s.width, rng=0) for s in streams}
    >>> x = torch.randn(2, 1, 28, 28); y = units(x)
    >>> fold(units, maps, streams); torch.allclose(units(x), y, atol=1e-5)
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.split.units import Stream

#: How each optimiser state tensor transforms, as a multiple of the parameter's power (gradients: -1).
_STATE_POWER = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}

Target = Union[nn.Module, Sequence[nn.Module], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class BoundaryMap:
    """A channel map ``x'[k] = scale[k] · x[perm[k]]``.

    Args:
        perm: int64 tensor, a permutation of ``range(width)``.
        scale: float64 tensor of positive scales, one per channel.
    """

    perm: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.perm.dtype != torch.int64 or self.perm.dim() != 1:
            raise ValueError("BoundaryMap.perm must be a 1-D int64 tensor")
        if not torch.equal(torch.sort(self.perm).values, torch.arange(len(self.perm))):
            raise ValueError("BoundaryMap.perm must be a permutation of range(width)")
        if self.scale.shape != self.perm.shape or not bool((self.scale > 0).all()):
            raise ValueError("BoundaryMap.scale must hold one positive scale per channel")

    @property
    def width(self) -> int:
        return len(self.perm)

    @classmethod
    def identity(cls, width: int) -> BoundaryMap:
        return cls(torch.arange(width), torch.ones(width, dtype=torch.float64))

    def then(self, other: BoundaryMap) -> BoundaryMap:
        """The map applying ``self`` first, then ``other``."""
        # other(self(x))[k] = other.scale[k] * self.scale[other.perm[k]] * x[self.perm[other.perm[k]]]
        return BoundaryMap(self.perm[other.perm], other.scale * self.scale[other.perm])

    def inverse(self) -> BoundaryMap:
        inv = torch.argsort(self.perm)
        return BoundaryMap(inv, 1.0 / self.scale[inv])


def random_boundary(width: int, *, rng: np.random.Generator | int | None = None,
                    scale_range: tuple[float, float] = (0.5, 2.0), permute: bool = True) -> BoundaryMap:
    """Draw a random channel map: a uniform permutation and log-uniform scales in ``scale_range``.

    Args:
        width: Channels.
        rng: A numpy generator, an integer seed (tests), or ``None`` for 256 bits from ``os.urandom``.
        scale_range: ``(low, high)`` with ``0 < low <= high``; ``(1, 1)`` draws a pure permutation.
        permute: Draw a permutation (else the identity order, scales only).

    Returns:
        The :class:`BoundaryMap`.

    Raises:
        ValueError: ``width`` is not positive or ``scale_range`` is not a positive interval.

    Example:
        >>> random_boundary(4, rng=1).width
        4
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r}: pass the stream's channel count (a positive integer)")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range={scale_range!r}: pass (low, high) with 0 < low <= high, e.g. (0.5, 2.0)")
    if rng is None:
        rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
    elif not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    perm = rng.permutation(width) if permute else np.arange(width)
    scale = np.exp(rng.uniform(np.log(low), np.log(high), width)) if high > low else np.full(width, float(low))
    return BoundaryMap(torch.from_numpy(perm.astype(np.int64)), torch.from_numpy(scale.astype(np.float64)))


def _shape(scale: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    view = [1] * t.dim()
    view[dim] = -1
    return scale.to(t.dtype).view(view)


def _apply(t: torch.Tensor, m: BoundaryMap, dim: int, power: int) -> torch.Tensor:
    out = t.index_select(dim, m.perm.to(t.device))
    if power and t.is_floating_point():
        out = out * _shape(m.scale.to(t.device) ** power, out, dim)
    return out


def _tensors(target: Target) -> dict[str, torch.Tensor]:
    if isinstance(target, nn.Module):
        target = [target]
    if isinstance(target, Mapping):
        return dict(target)
    found: dict[str, torch.Tensor] = {}
    for module in target:
        if not isinstance(module, nn.Module):
            raise TypeError("fold: pass a module, a list of modules (stages) or a state dict")
        found.update(module.named_parameters())
        found.update(module.named_buffers())
    return found


def fold(target: Target, maps: Mapping[str, BoundaryMap], streams: Sequence[Stream], *,
         optimizer: torch.optim.Optimizer | None = None, inverse: bool = False) -> dict[str, torch.Tensor] | None:
    """Fold channel maps into the tensors of the streams they belong to.

    Tensors a target does not hold (another stage's) are skipped, so each rank folds into its own stage alone
    and the chain as a whole computes the same function.

    Args:
        target: A module or a list of modules (changed in place; ``None`` is returned), or a state dict (a new
            dict is returned, the input is left as it is).
        maps: Stream name -> map; streams without a map are left alone.
        streams: The chain's streams (:func:`chiplock.split.units.build_units`).
        optimizer: The optimiser of the target's parameters: its gradients-like state is transformed too
            (in place). Pass ``None`` and reset the optimiser to drop the state instead.
        inverse: Apply the inverse maps (:func:`unfold`).

    Raises:
        UnsupportedConfig: A map's width is not its stream's, or the optimiser holds state of an unknown kind.

    Example:
        >>> fold(stage, {"fc0": random_boundary(64)}, streams, optimizer=opt)  # doctest: +SKIP
    """
    by_name = {s.name: s for s in streams}
    unknown = [n for n in maps if n not in by_name]
    if unknown:
        raise UnsupportedConfig(f"no stream named {', '.join(unknown)}; the chain has {', '.join(by_name)}")
    tensors = _tensors(target)
    in_place = not isinstance(target, Mapping)
    out = dict(tensors)
    state = optimizer.state if optimizer is not None else {}
    for sname, m in maps.items():
        stream = by_name[sname]
        if m.width != stream.width:
            raise UnsupportedConfig(f"the map for stream {sname!r} has width {m.width}, the stream {stream.width}")
        m = m.inverse() if inverse else m
        for e in stream.entries:
            t = out.get(e.name)
            if t is None:
                continue
            new = _apply(t.detach(), m, e.dim, e.power)
            if not in_place:
                out[e.name] = new
                continue
            with torch.no_grad():
                t.copy_(new)
            if t.grad is not None:
                t.grad.copy_(_apply(t.grad, m, e.dim, -e.power))
            for key, value in state.get(t, {}).items():
                if not isinstance(value, torch.Tensor) or value.shape != t.shape:
                    continue
                if key not in _STATE_POWER:
                    raise UnsupportedConfig(f"the optimiser holds state {key!r} this fold cannot transform; "
                                            "rotate with optimizer=None and reset the optimiser instead")
                value.copy_(_apply(value, m, e.dim, _STATE_POWER[key] * e.power))
    return None if in_place else out


def unfold(target: Target, maps: Mapping[str, BoundaryMap], streams: Sequence[Stream], *,
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor] | None:
    """Undo :func:`fold` with the same maps (arguments and result as :func:`fold`)."""
    return fold(target, maps, streams, optimizer=optimizer, inverse=True)


def crossing(streams: Sequence[Stream], stage_of: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The streams whose tensors lie in more than one stage, with those stages (ascending).

    Args:
        streams: The chain's streams.
        stage_of: Tensor name -> stage index, for every tensor of the chain.
    """
    out = {}
    for s in streams:
        owners = sorted({stage_of[e.name] for e in s.entries})
        if len(owners) > 1:
            out[s.name] = tuple(owners)
    return out


__all__ = ["BoundaryMap", "crossing", "fold", "random_boundary", "unfold"]
