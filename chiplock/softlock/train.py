"""Lock training: ``L_lock = L(f_a(x), y) + lam * mean_u (epsilon - L(f_u(x), y))**2``.

One set of weights is run twice per step (or more, with several unauthorized configurations): once on the
authorized configuration and once on each unauthorized one, with a straight-through estimator through every
rounding or pruning step. Under ``torchrun`` the same code trains with DistributedDataParallel (gloo on CPU,
NCCL on GPU): each rank takes its slice of every global batch and gradients are averaged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chiplock._io import atomic_write_bytes
from chiplock.softlock.apply import _convert, _handler_for, strip_config
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.decoys import decoy_masks
from chiplock.softlock.levers import apply_levers, plan_levers, plan_lock


class LockPair(nn.Module):
    """Runs the wrapped model on the authorized and on each unauthorized configuration in one ``forward``.

    One forward and one backward per step is what DistributedDataParallel expects, so the pair (not the model)
    is what gets wrapped.
    """

    def __init__(self, model: nn.Module, authorized: Any, unauthorized: tuple) -> None:
        super().__init__()
        self.model = model
        self._layers = _convert(model)
        self._auth = _handler_for(authorized)
        self._unauth = [_handler_for(u) for u in unauthorized]

    def _set(self, handler) -> None:
        for m in self._layers:
            m._softlock_handler = handler

    def forward(self, x: torch.Tensor, n_unauth: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        try:
            self._set(self._auth)
            out_a = self.model(x)
            outs_u = []
            for h in self._unauth:
                self._set(h)
                outs_u.append(self.model(x[:n_unauth]))
        finally:
            self._set(None)
        return out_a, outs_u


def lock_loss(out_a: torch.Tensor, y: torch.Tensor, outs_u: list[torch.Tensor], y_u: torch.Tensor, *,
              lam: float, epsilon: float, hinge: bool = False) -> tuple[torch.Tensor, float, float]:
    """``(L_lock, L_authorized, mean L_unauthorized)`` for one batch; ``hinge`` squares only ``epsilon - L_u > 0``."""
    loss_a = F.cross_entropy(out_a, y)
    losses_u = [F.cross_entropy(o, y_u) for o in outs_u]
    gaps = [(epsilon - lu).clamp(min=0) if hinge else epsilon - lu for lu in losses_u]
    # A closed hinge has exactly zero gradient: detaching it skips the backward pass through that
    # unauthorized forward (about two thirds of its cost) without changing any parameter update.
    gaps = [g.detach() if hinge and g.item() == 0.0 else g for g in gaps]
    penalty = torch.stack([g ** 2 for g in gaps]).mean()
    return loss_a + lam * penalty, loss_a.item(), sum(lu.item() for lu in losses_u) / len(losses_u)


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- checkpoints (safetensors, no pickle)

def _save_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, cfg: SoftLockConfig,
                     history: list) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    scalars = {}
    for idx, st in state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"optim.{idx}.{name}"] = v.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = float(v)
    meta = {"epoch": str(epoch), "config": cfg.to_json(), "scalars": json.dumps(scalars),
            "history": json.dumps(history)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, cfg: SoftLockConfig):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("config") != cfg.to_json():
        return None  # A checkpoint of another run: start afresh rather than mix runs.
    tensors = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    scalars = json.loads(meta["scalars"])
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in scalars.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = torch.tensor(v)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(meta["epoch"]), json.loads(meta["history"])


# --------------------------------------------------------------------------- training

class WeakLockWarning(UserWarning):
    """Lock training planted only a legacy lever: the lock holds against a naive cast, not a real deployment."""


@dataclass
class LockResult:
    """What :func:`lock_train` returns: the locked model (plain layers) and per-epoch history."""

    model: nn.Module
    history: list = field(default_factory=list)
    seconds: float = 0.0
    levers: list = field(default_factory=list)


def _progress(enabled: bool, total: int, description: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)


def lock_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SoftLockConfig, *,
               num_classes: Optional[int] = None, checkpoint: Optional[str | os.PathLike] = None,
               progress: bool = False, on_epoch: Optional[Callable[[int, dict], None]] = None) -> LockResult:
    """Fine-tune ``model`` in place so it keeps working on ``cfg.authorized`` and fails on ``cfg.unauthorized``.

    Args:
        model: A trained model (usually the fp32 original). Its conv/linear layers are converted for training
            and turned back into plain layers before returning.
        x, y: Training images ``(N, C, H, W)`` and integer labels.
        cfg: The :class:`SoftLockConfig`.
        num_classes: Classes for the default ``epsilon = ln(num_classes)``; inferred from ``y`` when omitted.
        checkpoint: A safetensors file written after every epoch; an existing checkpoint of the *same*
            configuration is resumed from.
        progress: Show a rich progress bar (rank 0 only).
        on_epoch: Called as ``on_epoch(epoch, record)`` after every epoch (rank 0 only).

    Returns:
        A :class:`LockResult` with the model (eval mode, plain layers) and the history of per-epoch losses.

    Raises:
        ValueError: The batch size is not divisible by the DDP world size, or there are fewer samples than one
            batch.

    Example:
        >>> cfg = SoftLockConfig(authorized="fp16", unauthorized=("int8",), epochs=3)
        >>> locked = lock_train(model, data.x_train, data.y_train, cfg).model
    """
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the DDP world size {world}")
    n = len(y)
    steps = n // cfg.batch_size
    if steps == 0 and cfg.epochs > 0:
        raise ValueError(f"lock_train: {n} samples is fewer than one batch of {cfg.batch_size}")
    num_classes = num_classes or int(y.max()) + 1
    epsilon = cfg.target_loss(num_classes)
    torch.manual_seed(cfg.seed)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch, history = 0, []
    loaded = None
    if checkpoint is not None and os.path.exists(checkpoint):
        loaded = _load_checkpoint(str(checkpoint), model, opt, cfg)
        if loaded is not None:
            start_epoch, history = loaded
    levers = plan_lock(cfg.authorized, cfg.unauthorized, cfg.levers)
    if loaded is None:
        try:
            masks = apply_levers(model, levers)
        except ValueError:
            if cfg.levers != "auto" or not any(name == "decoys" for name, _ in levers):
                raise
            # A model too narrow for decoys: auto falls back to the levers.
            levers = plan_levers(cfg.authorized, cfg.unauthorized)
            masks = apply_levers(model, levers)
    elif any(name == "decoys" for name, _ in levers):
        # Decoy groups are found again in the checkpoint's weights (their choice depended on the original's).
        masks = decoy_masks(model)
    else:
        # A checkpoint already holds primed weights; the masks depend only on the architecture and the plan.
        shadow = copy.deepcopy(model)
        name_of = {id(p): n for n, p in shadow.named_parameters()}
        params = dict(model.named_parameters())
        masks = {params[name_of[id(p)]]: m for p, m in apply_levers(shadow, levers).items()}
    hooks = []
    for p, m in masks.items():
        keep = (~m).to(p.dtype)
        hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
    against = cfg.unauthorized
    if any(name == "decoys" for name, _ in levers):
        against = cfg.trained_against()
    elif cfg.levers != "none":
        # Measured (docs/softlock.md): every legacy lever falls to a standard deployment tool, and training
        # against the attacker's deployment without a mechanism that separates it only drags the authorized
        # configuration down with it (Int8 -> E4M3: 0.596 authorized). Say so; train against the naive cast.
        warnings.warn(f"no decoy lock separates {cfg.authorized.name} from "
                      f"{', '.join(u.name for u in cfg.unauthorized)}: the planted lever "
                      f"({', '.join(n for n, _ in levers) or 'none'}) holds only against a naive cast and falls to "
                      "the format's standard deployment (see docs/softlock.md)", WeakLockWarning, stacklevel=2)
    pair = LockPair(model, cfg.authorized, against)
    runner: nn.Module = pair
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(pair, broadcast_buffers=not cfg.freeze_bn)
    local = cfg.batch_size // world
    n_u = max(1, int(round(local * cfg.unauth_fraction)))
    t0 = time.perf_counter()
    with _progress(progress and rank == 0, steps * cfg.epochs, "lock") as bar:
        task = bar.add_task("lock", total=steps * cfg.epochs, completed=steps * start_epoch,
                            status="") if bar else None
        for epoch in range(start_epoch, cfg.epochs):
            _set_train_mode(model, cfg.freeze_bn)
            # The batch order depends only on (seed, epoch): resuming from a checkpoint replays it exactly.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums = [0.0, 0.0, 0.0]
            for step in range(steps):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][rank * local:(rank + 1) * local]
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                out_a, outs_u = runner(xb, n_u)
                loss, la, lu = lock_loss(out_a, yb, outs_u, yb[:n_u], lam=cfg.lam, epsilon=epsilon,
                                             hinge=cfg.hinge)
                loss.backward()
                opt.step()
                for i, v in enumerate((loss.item(), la, lu)):
                    sums[i] += v
                if bar:
                    bar.update(task, advance=1, status=f"L_a {la:.3f}  L_u {lu:.3f}")
            record = {"epoch": epoch + 1, "loss": sums[0] / max(steps, 1), "loss_authorized": sums[1] / max(steps, 1),
                      "loss_unauthorized": sums[2] / max(steps, 1)}
            history.append(record)
            if rank == 0:
                if checkpoint is not None:
                    _save_checkpoint(str(checkpoint), model, opt, epoch + 1, cfg, history)
                if on_epoch is not None:
                    on_epoch(epoch + 1, record)
    for h in hooks:
        h.remove()
    strip_config(model)
    model.eval()
    return LockResult(model, history, time.perf_counter() - t0, levers)


@torch.no_grad()
def evaluate_configs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, configs, *,
                     batch_size: int = 500) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on each configuration (``{name: accuracy}``), model left unchanged.

    Example:
        >>> evaluate_configs(model, data.x_test, data.y_test, ["fp32", "int8", "e4m3fn"])
        {'fp32': 0.98, 'int8': 0.97, 'e4m3fn': 0.11}
    """
    from chiplock.softlock.apply import apply_config
    from chiplock.softlock.registry import parse_config
    from chiplock_demo.training import accuracy

    out = {}
    for c in configs:
        c = parse_config(c)
        out[c.name] = accuracy(apply_config(model, c), x, y, batch_size=batch_size)
    return out
