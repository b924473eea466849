"""Save and load soft-locked models as plain safetensors files (no pickle).

The file holds the model's ``state_dict`` and, in ``__metadata__``, a JSON description of the architecture (so
the model can be rebuilt) and of the lock (for the report). Nothing in it is needed to *run* the model: a locked
model is deployed as is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from chiplock._io import atomic_write_bytes
from chiplock.errors import UnsupportedConfig

META_KEY = "chiplock.softlock"


def build_architecture(arch: str, *, num_classes: int = 10, image_size: int = 28, width: int = 16) -> nn.Module:
    """Build one of the example architectures (:mod:`chiplock_demo.models`, plain torch) by name.

    Args:
        arch: ``resnet18``, ``resnet50``, ``smallcnn`` or ``gpt`` (a small causal transformer over image rows).
        num_classes: Output classes.
        image_size: Input side (28 or 8).
        width: First-stage channels (the hidden size for ``gpt``).

    Returns:
        A freshly initialised model (seed torch first for reproducibility).

    Raises:
        UnsupportedConfig: Unknown architecture name.

    Example:
        >>> build_architecture("resnet18", width=16)
    """
    from chiplock_demo.models import SmallCNN, resnet18, resnet50

    if arch == "resnet18":
        return resnet18(num_classes, 1, width)
    if arch == "resnet50":
        return resnet50(num_classes, 1, width)
    if arch == "smallcnn":
        return SmallCNN(num_classes, image_size, width)
    if arch == "gpt":
        from chiplock_demo.models.gpt import gpt

        return gpt(num_classes, image_size, width)
    raise UnsupportedConfig(f"unknown architecture {arch!r}; use resnet18, resnet50, smallcnn or gpt")


def save_model(model: nn.Module, path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``info`` (architecture, lock description) to a safetensors file atomically."""
    from safetensors.torch import save

    from chiplock.softlock.apply import strip_config

    import copy
    plain = strip_config(copy.deepcopy(model))
    tensors = {k: v.detach().contiguous().clone() for k, v in plain.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(info, sort_keys=True)}))


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_model`.

    Returns:
        ``(model in eval mode, info dict)``.

    Raises:
        UnsupportedConfig: The file has no chiplock soft-lock metadata.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise UnsupportedConfig(f"{path} has no {META_KEY!r} metadata; was it written by chiplock softlock?")
    info = json.loads(meta[META_KEY])
    a = info["arch"]
    model = build_architecture(a["name"], num_classes=a["num_classes"], image_size=a["image_size"],
                               width=a["width"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), info
