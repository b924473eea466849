"""Lock training for neuron authorization locks, and the measurements that go with it.

A trained model is fine-tuned so that it is accurate with its password applied (the authorization neurons carry
their locking values) and at chance with natural activations (no password, or a wrong one). Two recipes:

* ``mixed`` (default): every batch runs twice on the same weights, once with the password and true labels
  (cross-entropy) and once unauthorized, pushed to a constant uniform output (``KL(uniform || softmax)`` plus the
  spread of the output over the batch, see :func:`_chance_loss`) weighted by ``unauth_weight``; one optimiser
  step per batch.
* ``alternate``: EdgePro's recipe: every batch takes a *locking* step (password, true labels) then a *releasing*
  step (unauthorized, uniformly random hard labels, the loss weighted by ``unauth_weight``).

The unauthorized pass runs a fraction ``wrong_fraction`` of the batch under a wrong password (derived from a fresh
random key, as on a wrong device) and the rest with natural activations: trained on natural activations alone, a
model still answers well under a wrong password that shares a neuron or two with the right one.

BatchNorm layers stay in eval mode (running statistics frozen, affine parameters still trained) during lock
training. The password makes a channel constant over the batch and over every position; a BatchNorm in train mode
would normalise it to its bias whatever the locking value (zero variance), and its running statistics would mix
the authorized and the natural activations. With frozen statistics both passes see exactly the function that is
deployed in eval mode.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.neuronlock.password import KEY_BYTES, NeuronStats, Password, PasswordSpec, derive_password, rank_neurons
from chiplock.neuronlock.runtime import apply_password

__all__ = ["LockMode", "LockResult", "NeuronLockConfig", "evaluate", "latency_overhead", "lock_train"]


class LockMode(str, Enum):
    """How lock training mixes authorized and natural passes (see the module docstring)."""

    MIXED = "mixed"
    ALTERNATE = "alternate"


@dataclass(frozen=True)
class NeuronLockConfig:
    """Everything :func:`lock_train` needs besides the model, the data and the password.

    Args:
        spec: The public :class:`PasswordSpec` the password is derived with (stored with the model; lock training
            itself only uses the password).
        epochs: Passes over the training data.
        lr: Adam learning rate.
        batch_size: Samples per batch.
        unauth_weight: Weight of the natural (unauthorized) loss.
        mode: ``"mixed"`` or ``"alternate"`` (a :class:`LockMode` or its value).
        wrong_fraction: Fraction of each batch's unauthorized pass run under a *wrong* password (derived from a
            fresh random key, as a wrong device would) instead of natural activations; 0 is EdgePro's recipe.
            Without it a wrong password that shares a few neurons with the right one unlocks part of the accuracy.
        seed: Seeds the batch order, the wrong passwords and the random labels of ``alternate``.
        version: Version of this configuration's meaning.

    Raises:
        ValueError: A field is out of range or ``mode`` is unknown.

    Example:
        >>> cfg = NeuronLockConfig(epochs=3, unauth_weight=1.0, mode="mixed")
    """

    spec: PasswordSpec = field(default_factory=PasswordSpec)
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    unauth_weight: float = 1.0
    mode: str = "mixed"
    wrong_fraction: float = 0.25
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.spec, PasswordSpec):
            raise ValueError(f"NeuronLockConfig(spec={self.spec!r}): pass a PasswordSpec, e.g. PasswordSpec()")
        modes = [m.value for m in LockMode]
        mode = self.mode.value if isinstance(self.mode, LockMode) else self.mode
        if mode not in modes:
            raise ValueError(f"NeuronLockConfig(mode={self.mode!r}): use one of {', '.join(modes)}")
        object.__setattr__(self, "mode", mode)
        for name in ("epochs", "batch_size", "seed", "version"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"NeuronLockConfig({name}={v!r}): use an integer")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"NeuronLockConfig(epochs={self.epochs}, batch_size={self.batch_size}): "
                             "use epochs >= 0 and batch_size >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"NeuronLockConfig(lr={self.lr!r}): use a finite learning rate > 0, e.g. 1e-3")
        f = self.wrong_fraction
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1):
            raise ValueError(f"NeuronLockConfig(wrong_fraction={f!r}): use a fraction in [0, 1], e.g. 0.25")
        w = self.unauth_weight
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"NeuronLockConfig(unauth_weight={w!r}): use a finite weight >= 0, e.g. 1.0")
        if self.version != 1:
            raise ValueError(f"NeuronLockConfig(version={self.version}): only version 1 exists")


@dataclass
class LockResult:
    """What :func:`lock_train` returns.

    Attributes:
        model: The lock-trained model (the same object that was passed, in eval mode).
        seconds: Wall-clock seconds of training.
        steps: Optimiser steps taken.
        history: One record per epoch: mean authorized and natural losses, and the authorized and natural
            accuracies on the training batches as they were seen.
    """

    model: nn.Module
    seconds: float = 0.0
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_data(x: Any, y: Any, what: str) -> None:
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise UnsupportedConfig(f"{what}: x and y must be torch tensors (images (N, ...) and integer labels (N,))")
    if y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise UnsupportedConfig(f"{what}: x has {len(x)} samples and y has shape {tuple(y.shape)}; pass one integer "
                                "label per sample and at least one sample")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise UnsupportedConfig(f"{what}: y has dtype {y.dtype}; pass integer class labels (torch.long)")


def _freeze_bn(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _chance_loss(logits: torch.Tensor) -> torch.Tensor:
    """``KL(uniform || softmax)`` plus the spread of the log-probabilities over the batch.

    The KL term alone reaches ~0 with outputs that are uniform to within a hair yet still rank the true class
    first for many inputs (the argmax keeps the class signal: a transformer locked on KL alone stayed at 41 %
    natural accuracy with KL 0.004). The spread term (standard deviation over the batch, mean over classes) is
    zero only for an output that does not depend on the input, and its gradient does not vanish near zero the
    way a squared penalty's does, so it removes the residual signal: the argmax becomes one class for all
    inputs, i.e. chance.
    """
    logp = F.log_softmax(logits, dim=-1)
    # KL(uniform || softmax) = -log K - mean_k log p_k: zero exactly at the uniform output, always >= 0.
    kl = (-logp.mean(dim=-1) - math.log(logits.shape[-1])).mean()
    spread = logp.std(dim=0).mean() if len(logits) > 1 else logp.new_zeros(())
    return kl + spread


def _decoy(gen: torch.Generator, stats: list[NeuronStats], spec: PasswordSpec) -> Password:
    # A wrong device's password: derived like the real one from a random key (seeded, so runs repeat).
    key = bytes(torch.randint(0, 256, (KEY_BYTES,), generator=gen, dtype=torch.uint8).tolist())
    return derive_password(key, stats, spec)


def _unauthorized(model: nn.Module, xb: torch.Tensor, decoy: Optional[Password], n_wrong: int) -> torch.Tensor:
    outs = []
    if decoy is not None and n_wrong:
        with apply_password(model, decoy):
            outs.append(model(xb[:n_wrong]))
    if n_wrong < len(xb):
        outs.append(model(xb[n_wrong:]))
    return torch.cat(outs)


def lock_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, password: Password,
               cfg: Optional[NeuronLockConfig] = None, *, stats: Optional[Sequence[NeuronStats]] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> LockResult:
    """Fine-tune ``model`` in place so it works with ``password`` applied and is at chance without it.

    Args:
        model: A trained classifier (usually the original); its layers named in ``password`` get the hooks.
        x, y: Training inputs ``(N, ...)`` and integer labels ``(N,)``.
        password: The :class:`Password` (from :func:`chiplock.neuronlock.derive_password`).
        cfg: A :class:`NeuronLockConfig` (defaults when omitted).
        stats: The public :class:`NeuronStats` wrong passwords are derived from (``cfg.wrong_fraction``); by
            default they are measured on the model as passed, over the first 512 training samples.
        progress: Optional ``progress(step, total)`` callback, called after every optimiser step.

    Returns:
        A :class:`LockResult`; the model is left in eval mode with no hook installed.

    Raises:
        UnsupportedConfig: ``x`` and ``y`` are not matching tensors, ``cfg`` or ``password`` has the wrong type,
            or a layer named in the password is missing from the model or too small.

    Example:
        >>> pw = derive_password(key, rank_neurons(model, data.x_train[:512]))
        >>> res = lock_train(model, data.x_train, data.y_train, pw, NeuronLockConfig(epochs=3))
        >>> evaluate(model, data.x_test, data.y_test, pw), evaluate(model, data.x_test, data.y_test, None)
    """
    cfg = NeuronLockConfig() if cfg is None else cfg
    if not isinstance(cfg, NeuronLockConfig):
        raise UnsupportedConfig(f"lock_train: cfg must be a NeuronLockConfig, not {type(cfg).__name__}")
    if not isinstance(password, Password):
        raise UnsupportedConfig(f"lock_train: password must be a Password, not {type(password).__name__}; "
                                "derive one with derive_password(key, stats)")
    _check_data(x, y, "lock_train")
    apply_password(model, password).remove()  # Checks that the password fits before any work.
    if cfg.wrong_fraction > 0:
        stats = list(stats) if stats is not None else rank_neurons(model, x[:512], [lp.layer for lp in password.layers])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = (len(y) + cfg.batch_size - 1) // cfg.batch_size
    alternate = cfg.mode == LockMode.ALTERNATE.value
    total, steps, history = cfg.epochs * batches * (2 if alternate else 1), 0, []

    def step(loss: torch.Tensor) -> None:
        nonlocal steps
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        if progress is not None:
            progress(steps, total)

    t0 = time.perf_counter()
    try:
        _freeze_bn(model)
        opt.zero_grad()
        for epoch in range(cfg.epochs):
            te = time.perf_counter()
            sums = dict(loss_auth=0.0, loss_unauth=0.0, correct_auth=0, correct_unauth=0)
            order = torch.randperm(len(y), generator=gen)
            for b in range(batches):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb, yb = x[idx], y[idx]
                n_wrong = round(cfg.wrong_fraction * len(yb))
                decoy = _decoy(gen, stats, cfg.spec) if n_wrong else None
                with apply_password(model, password):
                    out_a = model(xb)
                loss_a = F.cross_entropy(out_a, yb)
                if alternate:
                    # EdgePro: a locking step, then a releasing step on uniformly random hard labels.
                    step(loss_a)
                    out_u = _unauthorized(model, xb, decoy, n_wrong)
                    random_y = torch.randint(0, out_u.shape[-1], (len(yb),), generator=gen)
                    loss_u = F.cross_entropy(out_u, random_y)
                    step(cfg.unauth_weight * loss_u)
                else:
                    out_u = _unauthorized(model, xb, decoy, n_wrong)
                    loss_u = _chance_loss(out_u)
                    step(loss_a + cfg.unauth_weight * loss_u)
                sums["loss_auth"] += loss_a.item() * len(yb)
                sums["loss_unauth"] += loss_u.item() * len(yb)
                sums["correct_auth"] += int((out_a.argmax(-1) == yb).sum())
                sums["correct_unauth"] += int((out_u.argmax(-1) == yb).sum())
            n = len(y)
            history.append({"epoch": epoch + 1, "loss_auth": sums["loss_auth"] / n,
                            "loss_unauth": sums["loss_unauth"] / n, "train_acc_auth": sums["correct_auth"] / n,
                            "train_acc_unauth": sums["correct_unauth"] / n, "seconds": time.perf_counter() - te})
    finally:
        model.eval()
    return LockResult(model=model, seconds=time.perf_counter() - t0, steps=steps, history=history)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, password: Optional[Password] = None, *,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` in eval mode, with ``password`` applied (``None``: natural activations).

    The model's train/eval mode is restored afterwards and no hook is left behind.

    Args:
        model: The classifier.
        x, y: Inputs and integer labels.
        password: The password to apply, a wrong one, or ``None``.
        batch_size: Samples per forward pass.

    Returns:
        The fraction of correct predictions.

    Raises:
        UnsupportedConfig: Bad data, batch size or password, or a password that does not fit the model.

    Example:
        >>> evaluate(model, data.x_test, data.y_test, pw)   # authorized
        >>> evaluate(model, data.x_test, data.y_test)       # natural: near chance once locked
    """
    _check_data(x, y, "evaluate")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UnsupportedConfig(f"evaluate(batch_size={batch_size!r}): use a positive integer")
    if password is not None and not isinstance(password, Password):
        raise UnsupportedConfig(f"evaluate: password must be a Password or None, not {type(password).__name__}")
    from chiplock_demo.training import accuracy

    was_training = model.training
    handle = apply_password(model, password) if password is not None else None
    try:
        return accuracy(model, x, y, batch_size)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def latency_overhead(model: nn.Module, password: Password, x: torch.Tensor, repeats: int = 50, *,
                     warmup: int = 3) -> dict[str, Any]:
    """Forward time of ``model`` with the password hooks installed against the plain model, side by side.

    Plain and hooked forwards of the same batch ``x`` alternate (which goes first alternates too, so a slow drift
    of the machine hits both alike); each is timed in process CPU time (``time.process_time``, which other
    processes on a shared machine do not inflate) and in wall-clock time. Installing and removing the hooks
    happens outside the timed region: a deployment installs them once.

    Args:
        model: The locked model (put in eval mode for the measurement and restored after).
        password: The password whose hooks are timed.
        x: One input batch.
        repeats: Timed forwards of each kind.
        warmup: Untimed forwards of each kind first.

    Returns:
        ``{"plain_s", "locked_s", "overhead", "wall_plain_s", "wall_locked_s", "wall_overhead", "repeats",
        "batch", "threads"}``: medians in seconds per forward, ``overhead = locked / plain - 1`` (CPU time).

    Raises:
        UnsupportedConfig: ``repeats < 1``, ``warmup < 0`` or a password that does not fit the model.

    Example:
        >>> latency_overhead(model, pw, data.x_test[:256], repeats=50)["overhead"]   # e.g. 0.01
    """
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise UnsupportedConfig(f"latency_overhead(repeats={repeats!r}, warmup={warmup!r}): use repeats >= 1 "
                                "and warmup >= 0")
    if not isinstance(password, Password):
        raise UnsupportedConfig(f"latency_overhead: password must be a Password, not {type(password).__name__}")
    was_training = model.training
    model.eval()
    times: dict[str, list[float]] = {"plain": [], "locked": [], "wall_plain": [], "wall_locked": []}

    def run(kind: str, record: bool) -> None:
        handle = apply_password(model, password) if kind == "locked" else None
        try:
            c0, w0 = time.process_time(), time.perf_counter()
            model(x)
            c1, w1 = time.process_time(), time.perf_counter()
        finally:
            if handle is not None:
                handle.remove()
        if record:
            times[kind].append(c1 - c0)
            times["wall_" + kind].append(w1 - w0)

    try:
        for i in range(warmup + repeats):
            for kind in (("plain", "locked") if i % 2 == 0 else ("locked", "plain")):
                run(kind, i >= warmup)
    finally:
        model.train(was_training)
    # A floor of 1 ns keeps the ratio finite on a clock that reports a zero interval.
    med = {k: max(statistics.median(v), 1e-9) for k, v in times.items()}
    return {"plain_s": med["plain"], "locked_s": med["locked"], "overhead": med["locked"] / med["plain"] - 1,
            "wall_plain_s": med["wall_plain"], "wall_locked_s": med["wall_locked"],
            "wall_overhead": med["wall_locked"] / med["wall_plain"] - 1, "repeats": repeats, "batch": len(x),
            "threads": torch.get_num_threads()}
