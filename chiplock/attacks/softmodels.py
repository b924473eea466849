"""The soft-locked models the soft-lock attacks (``noise``, ``retrain``) run against, built once and cached.

A ResNet-18 is pre-trained in fp32 (Adam 2e-3 for ``pretrain_epochs``, then one epoch each at 5e-4 and 2e-4, the
recipe of ``benchmarks/softlock_robust.py``) and soft-locked with :func:`chiplock.softlock.train.lock_train` and
the default :class:`~chiplock.config.SoftLockConfig` mechanism (decoy cancellation where it applies). Two pairs,
the paper's two families:

* ``"fp32->e4m3fn"``: quantisation (authorized fp32, unauthorized FP8 E4M3FN);
* ``"dense->2:4"``: sparsity (authorized dense fp32, unauthorized 2:4 semi-structured pruning).

With ``cache`` (a folder), the pre-trained original and each locked model are written there as safetensors
(:func:`chiplock.softlock.model_io.save_model`) under names that encode every setting, so a later run (the other
attack, ``make paper`` again) loads them instead of training. Within one process the models are also memoised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from torch import nn

from chiplock.errors import UnsupportedConfig

#: ``pair -> (authorized, unauthorized, family)``; the names are :func:`chiplock.softlock.parse_config` names.
PAIRS: dict[str, tuple[str, str, str]] = {"fp32->e4m3fn": ("fp32", "e4m3fn", "quantisation"),
                                          "dense->2:4": ("fp32", "2:4", "sparsity")}
DATASETS = ("digits8", "mnist5000")
#: ``SoftLockConfig.levers`` values: ``auto`` (decoys where they apply) is the default; ``none`` the paper's lock.
MECHANISMS = ("auto", "decoys", "levers", "none")

_MEMO: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
_DATA: dict[tuple[str, int], Any] = {}


def load_data(name: str, *, seed: int = 0):
    """The data set ``name`` (``digits8``: 8x8, fast; ``mnist5000``: 28x28):
    :func:`chiplock.softlock.pipeline.load_dataset`, loaded once per process (the attacks only read it).

    Raises:
        UnsupportedConfig: Unknown name, or the data set's package is missing.
    """
    from chiplock.softlock.pipeline import load_dataset

    if (name, seed) not in _DATA:
        _DATA[name, seed] = load_dataset(name, seed=seed)
    return _DATA[name, seed]


def pair_configs(pair: str) -> tuple[str, str, str]:
    """``(authorized, unauthorized, family)`` of a pair name such as ``"fp32->e4m3fn"``.

    Raises:
        UnsupportedConfig: Unknown pair.
    """
    if pair not in PAIRS:
        raise UnsupportedConfig(f"unknown soft-lock pair {pair!r}; use {', '.join(PAIRS)}")
    return PAIRS[pair]


def _arch(data, width: int) -> dict[str, Any]:
    return {"name": "resnet18", "num_classes": int(data.num_classes), "image_size": data.image_size,
            "width": int(width)}


def pretrain_steps(n_train: int, pretrain_epochs: int, batch_size: int = 64) -> int:
    """Optimizer steps of the pre-training recipe (``pretrain_epochs`` plus two polishing epochs)."""
    return (pretrain_epochs + 2) * math.ceil(n_train / batch_size)


def _save(model: nn.Module, path: Path, info: dict[str, Any]) -> None:
    from chiplock.softlock.model_io import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, info)


def _load(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from chiplock.softlock.model_io import load_model

    return load_model(path)


def original_model(*, data, width: int, pretrain_epochs: int, cache: Path | None = None,
                   seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The fp32 original (trained, or loaded from ``cache``): ``(model, info)``.

    ``info`` holds ``seconds`` (pre-training wall time when it was trained, kept in the cached file) and
    ``steps`` (optimizer steps), the attacker's reference for "as much compute as training".
    """
    import torch

    from chiplock.softlock.model_io import build_architecture
    from chiplock_demo.training import train_classifier

    key = f"original_resnet18_{data.name}_w{width}_e{pretrain_epochs}_s{seed}"
    path = Path(cache) / f"{key}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        model, info = _load(path)
        _MEMO[key] = (model, info)
        return copy.deepcopy(model), dict(info, cached=True)
    if key in _MEMO:
        model, info = _MEMO[key]
        if path is not None:  # memoised by a run without a cache folder: write it now
            _save(model, path, info)
        return copy.deepcopy(model), dict(info, cached=True)
    torch.manual_seed(seed)
    arch = _arch(data, width)
    model = build_architecture("resnet18", width=width, num_classes=arch["num_classes"],
                               image_size=arch["image_size"])
    t = time.perf_counter()
    train_classifier(model, data.x_train, data.y_train, epochs=pretrain_epochs, batch_size=64, seed=seed)
    for lr in (5e-4, 2e-4):
        train_classifier(model, data.x_train, data.y_train, epochs=1, lr=lr, batch_size=64, seed=seed + 1)
    info = {"arch": arch, "data": data.name, "pretrain_epochs": pretrain_epochs, "seed": seed,
            "seconds": time.perf_counter() - t, "steps": pretrain_steps(len(data.y_train), pretrain_epochs)}
    if path is not None:
        _save(model, path, info)
    _MEMO[key] = (copy.deepcopy(model), info)
    return model, dict(info, cached=False)


def lock_config(pair: str, *, lock_epochs: int, seed: int = 0, mechanism: str = "auto"):
    """The :class:`~chiplock.config.SoftLockConfig` a pair is locked with: the defaults but the epochs, the seed and
    ``mechanism`` (``SoftLockConfig.levers``: ``auto``, the project's default, plants decoys; ``none`` is the
    paper's plain lock loss).

    Raises:
        UnsupportedConfig: Unknown pair or mechanism.
    """
    from chiplock.softlock.config import SoftLockConfig

    auth, unauth, _ = pair_configs(pair)
    if mechanism not in MECHANISMS:
        raise UnsupportedConfig(f"unknown lock mechanism {mechanism!r}; use {', '.join(MECHANISMS)}")
    return SoftLockConfig(authorized=auth, unauthorized=(unauth,), epochs=lock_epochs, seed=seed,
                          levers=mechanism)


def locked_model(pair: str, *, data: str, width: int, pretrain_epochs: int, lock_epochs: int,
                 cache: str | Path | None = None, seed: int = 0,
                 mechanism: str = "auto") -> tuple[nn.Module, Any, dict[str, Any]]:
    """A soft-locked ResNet-18 for ``pair`` and the data it was trained on, built or loaded from ``cache``.

    Args:
        pair: ``"fp32->e4m3fn"`` or ``"dense->2:4"`` (:data:`PAIRS`).
        data: ``"digits8"`` (8x8, seconds) or ``"mnist5000"`` (28x28).
        width: ResNet-18 first-stage channels (64 is the standard network; below 8, too narrow for decoys,
            ``auto`` falls back to the legacy levers with a ``WeakLockWarning``).
        pretrain_epochs: Epochs of fp32 pre-training at 2e-3 (two polishing epochs follow).
        lock_epochs: Lock-training epochs.
        cache: A folder for the pre-trained original and the locked model (safetensors); ``None``: no files.
        seed: Seeds pre-training and lock training.
        mechanism: What lock training plants (``SoftLockConfig.levers``): ``auto`` (the default: decoys where
            they apply), ``decoys``, ``levers`` or ``none`` (the paper's plain lock loss).

    Returns:
        ``(locked model in eval mode, the Dataset, info)``; ``info`` has the pair's ``authorized`` and
        ``unauthorized`` configuration names, the original's and the locked model's accuracy on both
        (``original_authorized``, ``original_unauthorized``, ``locked_authorized``, ``locked_unauthorized``),
        the lock ``mechanism``, ``pretrain_seconds``/``pretrain_steps``, ``lock_seconds``, ``seconds`` (this call)
        and ``cached`` (loaded rather than trained).

    Raises:
        UnsupportedConfig: Unknown pair, data set or mechanism, width or epochs below 1, or the ``demo`` extra
            missing.

    Example:
        >>> model, d, info = locked_model("fp32->e4m3fn", data="digits8", width=8, pretrain_epochs=3,
        ...                               lock_epochs=2)
        >>> info["locked_authorized"], info["locked_unauthorized"]
    """
    from chiplock.softlock import parse_config
    from chiplock.softlock.train import evaluate_configs, lock_train

    t0 = time.perf_counter()
    auth, unauth, family = pair_configs(pair)
    if width < 1 or pretrain_epochs < 1 or lock_epochs < 1:
        raise UnsupportedConfig(f"locked_model: width, pretrain_epochs and lock_epochs must be >= 1 (got "
                                f"{width}, {pretrain_epochs}, {lock_epochs})")
    ds = load_data(data, seed=0)
    cfg = lock_config(pair, lock_epochs=lock_epochs, seed=seed, mechanism=mechanism)
    a, u = parse_config(auth).name, parse_config(unauth).name
    digest = hashlib.sha256(cfg.to_json().encode()).hexdigest()[:8]
    key = f"locked_{a}-{u.replace(':', '_')}_{data}_w{width}_e{pretrain_epochs}_l{lock_epochs}_{digest}"
    path = Path(cache) / f"{key}.safetensors" if cache is not None else None
    meta = {"arch": _arch(ds, width), "data": data, "lock": json.loads(cfg.to_json())}
    if path is not None and path.exists():
        model, stored = _load(path)
        info = stored["attack"]
        _MEMO[key] = (model, info)
        return copy.deepcopy(model), ds, dict(info, cached=True, seconds=time.perf_counter() - t0)
    if key in _MEMO:
        model, info = _MEMO[key]
        if path is not None:  # memoised by a run without a cache folder: write it now
            _save(model, path, dict(meta, attack=info))
        return copy.deepcopy(model), ds, dict(info, cached=True, seconds=time.perf_counter() - t0)

    original, pre = original_model(data=ds, width=width, pretrain_epochs=pretrain_epochs, cache=cache, seed=seed)
    before = evaluate_configs(original, ds.x_test, ds.y_test, [a, u])
    res = lock_train(original, ds.x_train, ds.y_train, cfg)
    model = res.model
    after = evaluate_configs(model, ds.x_test, ds.y_test, [a, u])
    info = {"pair": pair, "family": family, "lock_levers": mechanism, "authorized": a, "unauthorized": u,
            "data": data, "width": width, "pretrain_epochs": pretrain_epochs, "lock_epochs": lock_epochs, "seed": seed,
            "mechanism": [name for name, _ in res.levers] or ["none"],
            "original_authorized": before[a], "original_unauthorized": before[u],
            "locked_authorized": after[a], "locked_unauthorized": after[u],
            "pretrain_seconds": pre.get("seconds"), "pretrain_steps": pre.get("steps"), "lock_seconds": res.seconds,
            "lock_steps": lock_epochs * (len(ds.y_train) // cfg.batch_size)}
    if path is not None:
        _save(model, path, dict(meta, attack=info))
    _MEMO[key] = (copy.deepcopy(model), info)
    return model, ds, dict(info, cached=False, seconds=time.perf_counter() - t0)


def clear_memo() -> None:
    """Forget the models and data sets memoised in this process (the cache folder is left alone)."""
    _MEMO.clear()
    _DATA.clear()


__all__ = ["DATASETS", "MECHANISMS", "PAIRS", "clear_memo", "load_data", "lock_config", "locked_model",
           "original_model", "pair_configs", "pretrain_steps"]
