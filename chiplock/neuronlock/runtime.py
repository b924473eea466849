"""Apply a neuron-lock password to a model with forward hooks.

Each locked layer gets one forward hook that overwrites its authorization neurons' outputs in place with
``value * scale`` (a conv channel is filled over every spatial position; a linear unit over every leading
dimension). Only those neurons are written, so the other outputs are bit-identical to the plain model's and the
cost is one small indexed write per locked layer. Autograd sees the write: no gradient flows into an overwritten
neuron, as in EdgePro's locked training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.neuronlock.password import Password

__all__ = ["PasswordHandle", "PasswordedModel", "apply_password"]


class _LockHook:
    """Forward hook writing ``value * scale`` into one layer's authorization neurons."""

    def __init__(self, neurons: tuple[int, ...], values: tuple[float, ...], scale: float, conv: bool) -> None:
        self.conv = conv
        self._idx = torch.tensor(neurons, dtype=torch.long)
        # Multiply in float64 once, so every dtype gets the correctly rounded product.
        self._fill = torch.tensor(values, dtype=torch.float64) * scale
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _tensors(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (out.device, out.dtype)
        got = self._cache.get(key)
        if got is None:
            fill = self._fill.to(device=out.device, dtype=out.dtype)
            got = (self._idx.to(out.device), fill[:, None, None] if self.conv else fill)
            self._cache[key] = got
        return got

    def __call__(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        idx, fill = self._tensors(out)
        if self.conv:
            # [N, C, H, W] or unbatched [C, H, W]: the channel axis is third from the end.
            out[(slice(None),) * (out.dim() - 3) + (idx,)] = fill
        else:
            out[..., idx] = fill


class PasswordHandle:
    """Removes a password's hooks: ``handle.remove()``, or use the handle as a context manager.

    ``remove()`` is idempotent; after it the model computes its natural outputs again.

    Example:
        >>> with apply_password(model, pw):
        ...     logits = model(x)
    """

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Uninstall every hook this handle installed."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> PasswordHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _check(model: nn.Module, password: Password) -> list[tuple[nn.Module, bool]]:
    if not isinstance(password, Password):
        raise UnsupportedConfig(f"password must be a Password, got {type(password).__name__}; derive it with "
                                "derive_password or read it with Password.from_json")
    modules = dict(model.named_modules())
    out = []
    for lp in password.layers:
        m = modules.get(lp.layer)
        if m is None:
            raise UnsupportedConfig(f"the password locks layer {lp.layer!r}, which the model lacks; use the password "
                                    "derived for this architecture")
        if isinstance(m, nn.Conv2d):
            n, conv = m.out_channels, True
        elif isinstance(m, nn.Linear):
            n, conv = m.out_features, False
        else:
            raise UnsupportedConfig(f"the password locks layer {lp.layer!r}, a {type(m).__name__}; only Conv2d and "
                                    "Linear layers hold authorization neurons")
        if max(lp.neurons) >= n:
            raise UnsupportedConfig(f"the password locks neuron {max(lp.neurons)} of layer {lp.layer!r}, which has "
                                    f"{n}; use the password derived for this model")
        out.append((m, conv))
    return out


def apply_password(model: nn.Module, password: Password) -> PasswordHandle:
    """Install ``password`` on ``model`` (in place) with forward hooks.

    All layers are checked before any hook is installed, so a bad password leaves the model untouched.

    Args:
        model: The lock-trained model.
        password: From :func:`chiplock.neuronlock.derive_password`.

    Returns:
        A :class:`PasswordHandle`; ``.remove()`` (or leaving its ``with`` block) restores the natural model.

    Raises:
        UnsupportedConfig: A locked layer the model lacks or that is not Conv2d/Linear, a neuron index out of range.

    Example:
        >>> handle = apply_password(model, pw); acc = accuracy(model, x, y); handle.remove()
    """
    checked = _check(model, password)
    handles = [m.register_forward_hook(_LockHook(lp.neurons, lp.values, lp.scale, conv))
               for lp, (m, conv) in zip(password.layers, checked)]
    return PasswordHandle(handles)


class PasswordedModel(nn.Module):
    """``model`` with ``password`` applied (hooks installed on construction); ``forward`` is ``model.forward``.

    The password is not a parameter or buffer, so ``state_dict()`` holds only the wrapped model's weights (under
    the ``model.`` prefix) and never the secret. :meth:`remove` uninstalls the hooks and returns the plain model.

    Args:
        model: The lock-trained model (hooked in place).
        password: The password.

    Raises:
        UnsupportedConfig: As :func:`apply_password`.

    Example:
        >>> locked = PasswordedModel(model, pw); logits = locked(x)
    """

    def __init__(self, model: nn.Module, password: Password) -> None:
        super().__init__()
        self.model = model
        self._handle = apply_password(model, password)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Uninstall the password's hooks and return the wrapped model."""
        self._handle.remove()
        return self.model
