"""Run a model "as it would on" a configuration: conv and linear layers round or prune their weights, input
activations and outputs through the configuration's handler, with a straight-through estimator for training.

The layers are converted in place by swapping their class for a subclass (``nn.Conv2d`` -> :class:`SoftConv2d`),
so parameters, buffers and ``state_dict`` keys are unchanged: the converted model saves to the same file as the
original, and one set of weights can be switched between configurations during lock training.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.softlock.registry import Handler, get_handler, parse_config


class _STE(torch.autograd.Function):
    """Forward: ``fn(x)``. Backward: the identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):  # noqa: D102
        return fn(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def ste(x: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x)`` in the forward pass with an identity gradient (only built when autograd needs it)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _STE.apply(x, fn)
    return fn(x)


class _SoftLayer:
    _softlock_handler: Handler | None = None

    def _run(self, x: torch.Tensor, op) -> torch.Tensor:
        h = self._softlock_handler
        if h is None:
            return op(x, self.weight)
        y = op(ste(x, h.activation), ste(self.weight, h.weight))
        return ste(y, h.output)


class SoftConv2d(nn.Conv2d, _SoftLayer):
    """``nn.Conv2d`` whose weights, inputs and outputs go through the active soft-lock handler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda a, w: self._conv_forward(a, w, self.bias))


class SoftLinear(nn.Linear, _SoftLayer):
    """``nn.Linear`` whose weights, inputs and outputs go through the active soft-lock handler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda a, w: F.linear(a, w, self.bias))


_SWAP = {nn.Conv2d: SoftConv2d, nn.Linear: SoftLinear}
_UNSWAP = {v: k for k, v in _SWAP.items()}


def _handler_for(cfg: Any) -> Handler | None:
    cfg = parse_config(cfg)
    h = get_handler(cfg)
    return None if type(h) is Handler else h


def set_config(model: nn.Module, cfg: Any) -> nn.Module:
    """Convert ``model`` in place (if needed) and make every conv/linear layer run on ``cfg``.

    Args:
        model: Any module; layers that are exactly ``nn.Conv2d`` or ``nn.Linear`` are converted.
        cfg: A configuration or a name accepted by :func:`parse_config`.

    Returns:
        ``model`` itself.

    Raises:
        UnsupportedConfig: ``cfg`` is not a known configuration.

    Example:
        >>> set_config(model, "int8"); set_config(model, "fp32")  # same weights, two configurations
    """
    handler = _handler_for(cfg)
    for mod in _convert(model):
        mod._softlock_handler = handler
    return model


def _convert(model: nn.Module) -> list:
    layers = []
    for mod in model.modules():
        cls = _SWAP.get(type(mod))
        if cls is not None:
            mod.__class__ = cls
        if isinstance(mod, _SoftLayer):
            layers.append(mod)
    return layers


def apply_config(model: nn.Module, cfg: Any, *, inplace: bool = False) -> nn.Module:
    """The model as it would run on configuration ``cfg`` (a number format, a sparsity pattern, or both).

    Configurations compose: ``apply_config(m, "2:4+fp16")`` or ``apply_config(m, Compose((NMSparsity(), FP16())))``
    prunes the weights 2:4 and then runs everything in FP16. Applying a new configuration to an already converted
    model replaces (does not stack on) the previous one.

    Args:
        model: The model (left untouched unless ``inplace``).
        cfg: A configuration instance or name (``"fp16"``, ``"e4m3fn"``, ``"int8"``, ``"2:4"``, ``"prune0.5"``...).
        inplace: Convert ``model`` itself instead of a deep copy.

    Returns:
        The converted model; its ``state_dict`` has the same keys and values as the original.

    Raises:
        UnsupportedConfig: ``cfg`` is not a known configuration.

    Example:
        >>> from chiplock.softlock import apply_config
        >>> acc_fp16 = accuracy(apply_config(model, "fp16"), x, y)
    """
    target = model if inplace else copy.deepcopy(model)
    return set_config(target, cfg)


def strip_config(model: nn.Module) -> nn.Module:
    """Turn converted layers back into plain ``nn.Conv2d``/``nn.Linear`` in place (for saving or deployment)."""
    for mod in model.modules():
        cls = _UNSWAP.get(type(mod))
        if cls is not None:
            mod.__dict__.pop("_softlock_handler", None)
            mod.__class__ = cls
    return model


@contextlib.contextmanager
def using_config(model: nn.Module, cfg: Any) -> Iterator[nn.Module]:
    """Run ``model`` on ``cfg`` inside the block, then restore the layers' previous handlers."""
    handler = _handler_for(cfg)
    layers = _convert(model)
    saved = [m._softlock_handler for m in layers]
    for m in layers:
        m._softlock_handler = handler
    try:
        yield model
    finally:
        for m, h in zip(layers, saved):
            m._softlock_handler = h
