"""The retraining attack on a soft lock, priced against training from scratch (Clifford et al., SaTML 2025).

An attacker who holds the locked file and some labelled data fine-tunes the locked model *in the unauthorized
configuration* (every conv/linear layer rounds or prunes through that configuration, with the straight-through
estimator, exactly as lock training runs it) with a fraction of the training data. The lock is worth something
when that recovers less than training the same architecture from scratch, with the same data, the same epochs and
the same batch size (the attacker's alternative, which needs no locked file at all), and when retraining costs
about as much compute as training from scratch.

Before retraining the attacker may also run a chain of deployment steps (:mod:`chiplock.softlock.deploy`), so
the retraining starts from the best training-free deployment; when a step changes the configuration (``e4m3fn``
becomes ``e4m3fn@channel``), both the retraining and the from-scratch baseline run on the returned configuration.
Sparsity targets retrain with the pattern applied: the format's handler recomputes the mask at every step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.softlock.apply import set_config, strip_config
from chiplock.softlock.registry import parse_config


@dataclass
class RetrainRow:
    """One data fraction: what retraining the locked model and training from scratch each reached, and cost.

    ``steps`` optimizer steps of ``batch_size`` (the last batch of an epoch may be smaller) were run by each of
    the two trainings; ``*_seconds`` are their wall times on this machine.
    """

    fraction: float
    samples: int
    epochs: int
    steps: int
    unauthorized_accuracy: float
    authorized_accuracy: float
    scratch_accuracy: float
    retrain_seconds: float
    scratch_seconds: float

    @property
    def recovered_less_than_scratch(self) -> bool:
        return self.unauthorized_accuracy < self.scratch_accuracy


@dataclass
class RetrainResult:
    """What :func:`retrain_attack` returns.

    Attributes:
        target: The unauthorized configuration asked for.
        config: The configuration retrained in (``target`` unless ``pre_steps`` changed it).
        authorized: The configuration the lock authorizes (for ``authorized_accuracy``).
        pre_steps: The deployment chain run before retraining.
        pre_seconds: Its wall time.
        locked_unauthorized_accuracy: The locked model on ``config`` after ``pre_steps``, before retraining.
        locked_authorized_accuracy: The locked model on ``authorized`` (before any step).
        rows: One :class:`RetrainRow` per fraction, in the order given.
        settings: Epochs, learning rates, batch size, seed.
    """

    target: str
    config: str
    authorized: str
    pre_steps: tuple
    pre_seconds: float
    locked_unauthorized_accuracy: float
    locked_authorized_accuracy: float
    rows: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pre_steps"] = list(self.pre_steps)
        for row, r in zip(d["rows"], self.rows):
            row["recovered_less_than_scratch"] = r.recovered_less_than_scratch
        return d


def stratified_subset(y: torch.Tensor, fraction: float, *, seed: int = 0) -> torch.Tensor:
    """Indices of a deterministic, class-stratified ``fraction`` of ``y`` (at least one sample per class).

    Each class keeps ``round(fraction * count)`` of its samples, chosen by a permutation seeded with ``seed``;
    a smaller fraction's subset is a prefix of a larger one's within each class, so the subsets are nested.

    Example:
        >>> idx = stratified_subset(data.y_train, 0.1)   # about 10 % of every class
    """
    if not 0 < fraction <= 1:
        raise UnsupportedConfig(f"fraction={fraction}: use a data fraction in (0, 1], e.g. 0.1")
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        parts.append(idx[:max(1, int(round(fraction * len(idx))))])
    return torch.sort(torch.cat(parts)).values


def _fit(model: nn.Module, cfg: Any, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
         batch_size: int, seed: int) -> tuple[int, float]:
    """Adam + cross-entropy with ``model`` running on ``cfg`` (straight-through); returns (steps, seconds)."""
    set_config(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(y) / batch_size)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for step in range(per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return epochs * per_epoch, time.perf_counter() - t0


def _fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised by its module's ``reset_parameters``."""
    fresh = strip_config(copy.deepcopy(model))
    covered = set()
    for mod in fresh.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
            covered.update(id(p) for p in mod.parameters(recurse=False))
        if hasattr(mod, "reset_running_stats"):
            mod.reset_running_stats()
    missed = [n for n, p in fresh.named_parameters() if id(p) not in covered]
    if missed:
        raise UnsupportedConfig(f"retrain_attack cannot re-initialise {missed[:3]} (their modules have no "
                                "reset_parameters); pass build=<a function returning a fresh model>")
    return fresh


def _accuracy(model: nn.Module, cfg: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    from chiplock_demo.training import accuracy

    set_config(model, cfg)
    try:
        return accuracy(model, x, y)
    finally:
        set_config(model, "fp32")


def retrain_attack(locked_model: nn.Module, unauthorized_cfg: Any, x_train: torch.Tensor, y_train: torch.Tensor,
                   x_test: torch.Tensor, y_test: torch.Tensor, *, fractions: Iterable[float] = (0.01, 0.1, 1.0),
                   epochs: int = 10, lr: float = 1e-3, scratch_lr: float = 2e-3, batch_size: int = 64,
                   seed: int = 0, pre_steps: Iterable[str] = (), authorized: Any = "fp32",
                   calib_x: torch.Tensor | None = None, build: Callable[[], nn.Module] | None = None,
                   on_row: Callable[[RetrainRow], None] | None = None) -> RetrainResult:
    """Fine-tune the locked model on the unauthorized configuration with each fraction of the labelled data, and
    train the same architecture from scratch on the same data, for the same epochs and batch size.

    Args:
        locked_model: The soft-locked model (left unchanged; each fraction starts from a fresh copy).
        unauthorized_cfg: The configuration the attacker wants to run on (a name such as ``"int8"`` or a config).
        x_train, y_train: The labelled data the attacker is given a fraction of.
        x_test, y_test: Held-out data for every accuracy.
        fractions: Data fractions in ``(0, 1]``; subsets are stratified by class, deterministic and nested.
        epochs: Passes over the subset, for both trainings.
        lr: Adam learning rate of the retraining (fine-tuning).
        scratch_lr: Adam learning rate of the from-scratch baseline (``train_classifier``'s default).
        batch_size: Batch size of both trainings.
        seed: Seeds the subsets, the batch order and the from-scratch initialisation.
        pre_steps: Deployment steps (names registered in :mod:`chiplock.softlock.deploy`) run before retraining;
            the retraining and the baseline run on the configuration they return.
        authorized: The lock's authorized configuration, for the retrained model's authorized accuracy.
        calib_x: Unlabelled calibration inputs for ``pre_steps`` (default: the first 256 training images).
        build: Returns a freshly initialised model of the same architecture for the baseline (torch is seeded
            first); default: a copy of ``locked_model`` with every module's ``reset_parameters`` called.
        on_row: Called with each :class:`RetrainRow` as it is finished (progress).

    Returns:
        A :class:`RetrainResult` (``to_dict()`` for JSON).

    Raises:
        UnsupportedConfig: A fraction outside ``(0, 1]``, ``epochs``/``batch_size`` below 1, ``lr`` not positive,
            mismatched data lengths, an unknown configuration or step, or a model whose parameters cannot be
            re-initialised without ``build``.

    Example:
        >>> res = retrain_attack(locked, "int8", d.x_train, d.y_train, d.x_test, d.y_test, authorized="fp16")
        >>> [(r.fraction, r.unauthorized_accuracy, r.scratch_accuracy) for r in res.rows]
    """
    fractions = tuple(float(f) for f in fractions)
    pre_steps = tuple(pre_steps)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UnsupportedConfig(f"fractions={fractions}: give data fractions in (0, 1], e.g. (0.01, 0.1, 1.0)")
    if epochs < 1 or batch_size < 1 or not lr > 0 or not scratch_lr > 0:
        raise UnsupportedConfig("retrain_attack: epochs >= 1, batch_size >= 1 and positive learning rates are "
                                f"required (got epochs={epochs}, batch_size={batch_size}, lr={lr}, "
                                f"scratch_lr={scratch_lr})")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise UnsupportedConfig("retrain_attack: x_train/y_train and x_test/y_test must have matching lengths")
    target = parse_config(unauthorized_cfg)
    auth = parse_config(authorized)

    t0 = time.perf_counter()
    base = strip_config(copy.deepcopy(locked_model)).eval()
    start, cfg = base, target
    if pre_steps:
        from chiplock.softlock.deploy import Calibration, run_recipe

        calib = Calibration(x_train[:256] if calib_x is None else calib_x)
        start, cfg = run_recipe(locked_model, target, pre_steps, calib)
    pre_seconds = time.perf_counter() - t0
    result = RetrainResult(target.name, cfg.name, auth.name, pre_steps, pre_seconds,
                           _accuracy(start, cfg, x_test, y_test), _accuracy(base, auth, x_test, y_test),
                           settings={"epochs": epochs, "lr": lr, "scratch_lr": scratch_lr, "batch_size": batch_size,
                                     "seed": seed, "optimizer": "adam"})
    for fraction in fractions:
        idx = stratified_subset(y_train, fraction, seed=seed)
        xs, ys = x_train[idx], y_train[idx]
        model = copy.deepcopy(start)
        steps, r_s = _fit(model, cfg, xs, ys, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        unauth_acc = _accuracy(model, cfg, x_test, y_test)
        auth_acc = _accuracy(model, auth, x_test, y_test)
        torch.manual_seed(seed)
        scratch = build() if build is not None else _fresh_copy(base)
        _, s_s = _fit(scratch, cfg, xs, ys, epochs=epochs, lr=scratch_lr, batch_size=batch_size, seed=seed)
        row = RetrainRow(fraction, len(idx), epochs, steps, unauth_acc, auth_acc,
                         _accuracy(scratch, cfg, x_test, y_test), r_s, s_s)
        result.rows.append(row)
        if on_row is not None:
            on_row(row)
    return result


__all__ = ["RetrainResult", "RetrainRow", "retrain_attack", "stratified_subset"]
