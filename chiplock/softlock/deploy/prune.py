"""Calibration-based pruning: how a deployment engineer sparsifies a dense model for a sparse target.

The unauthorized target is a sparsity configuration (:class:`~chiplock.softlock.magnitude.MagnitudePruning`,
``prune0.5``: at least ``floor(p * n)`` zeros in every conv/linear layer; or
:class:`~chiplock.softlock.nm_sparsity.NMSparsity`, ``2:4``: at most ``n`` nonzeros per hardware group of ``m``).
Nobody deploys to it by plain magnitude pruning when a few hundred unlabelled images are at hand; the standard
one-shot tools choose the mask from the layer's inputs as well as its weights:

- ``magnitude``: what the configuration itself does (the naive baseline, listed for the table).
- ``wanda`` (Sun et al., 2023): score ``|W_ij| * ||X_j||_2``, pruned per output row (per hardware group for N:M).
- ``sparsegpt`` (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with the calibration Hessian
  ``H = X^T X``; the mask is chosen by ``w^2 / [H^-1]_jj^2`` and the surviving weights are updated to compensate.

Each step prunes layer by layer in module order, so a layer is calibrated on the outputs of the layers already
pruned before it. It returns the target configuration unchanged: the weights it produces already satisfy the
target's constraint, so running the target on them is a no-op (the tests check this exactly). Per-layer counts
are exact: a global (whole-model) magnitude ranking is not offered, because the target constrains every layer.
Convolutions are handled through their im2col inputs (``F.unfold``), the column order of ``weight.flatten(1)``.
"""

from __future__ import annotations

import functools

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.softlock.deploy import quant as _quant  # noqa: F401  (const-fold, fold-bn, bn-reestimate, dedupe)
from chiplock.softlock.deploy.base import STEPS, Calibration, family, register_recipe, register_step
from chiplock.softlock.magnitude import MagnitudePruning
from chiplock.softlock.nm_sparsity import NMSparsity
from chiplock.softlock.registry import get_handler

#: Im2col rows (input positions, whole images) sampled per layer for SparseGPT's Hessian; Wanda's norms use all.
MAX_HESSIAN_ROWS = 16384
#: SparseGPT's dampening, as a fraction of the Hessian's mean diagonal, and its lazy-update block width.
PERCDAMP = 0.01
#: The tuned variant's damping (``sparsegpt-lowdamp``, ``gptq-lowdamp``).
LOW_DAMP = 1e-5
BLOCKSIZE = 128


def _target(cfg: Any) -> MagnitudePruning | NMSparsity:
    if not isinstance(cfg, (MagnitudePruning, NMSparsity)):
        raise UnsupportedConfig(f"pruning steps deploy to a sparsity target (prune0.5, 2:4), not "
                                f"{getattr(cfg, 'name', cfg)!r}; choose a recipe without them")
    return cfg


def _applies(cfg: Any) -> bool:
    return family(cfg) == "sparsity" and isinstance(cfg, (MagnitudePruning, NMSparsity))


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers a sparsity target constrains, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --- Calibration statistics -----------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook: nothing after the layer being calibrated needs to run."""


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the layer pads it, so the layer's window at output ``(i, j)`` starts at ``(i, j) * stride``."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    ph, pw = layer.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _windows(layer: nn.Conv2d, xp: torch.Tensor) -> list[tuple[slice, slice]]:
    """For each kernel position ``(ki, kj)`` (row-major), the strided slices of ``xp`` it reads."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    return [(slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))
            for i in range(kh) for j in range(kw)]


class _Stats:
    """A layer's input statistics over the calibration set, columns in ``weight.flatten(1)`` (im2col) order:
    ``sq`` (``sum_rows x_j^2`` over every row, for Wanda) and, with ``hessian``, ``h = X^T X`` over the positions
    of a uniform sample of images giving about ``max_rows`` rows (for SparseGPT), both float64 on the CPU."""

    def __init__(self, layer: nn.Module, hessian: bool, max_rows: int, n_images: int) -> None:
        k = layer.weight[0].numel()
        self.layer, self.n_images, self.max_rows = layer, n_images, max_rows
        self.sq = torch.zeros(k, dtype=torch.float64)
        self.h = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        self.gen = torch.Generator().manual_seed(0)

    def _sample(self, rows: torch.Tensor, per_image: int) -> torch.Tensor:
        keep = min(1.0, self.max_rows / max(per_image * self.n_images, 1))
        return rows if keep >= 1.0 else rows[torch.rand(len(rows), generator=self.gen) < keep]

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if isinstance(self.layer, nn.Linear):
            rows = x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
            self.sq += (rows * rows).sum(0)
            if self.h is not None:
                rows = self._sample(rows, rows.shape[0] // max(x.shape[0], 1))
                self.h += rows.T @ rows
            return
        # Convolutions: im2col without materialising it (F.unfold of every position is the slow part).
        xp = _padded(self.layer, x)
        wins = _windows(self.layer, xp)
        s2 = (xp * xp).sum(0).to("cpu", torch.float64)
        self.sq += torch.stack([s2[:, a, b].sum((1, 2)) for a, b in wins], 1).reshape(-1)
        if self.h is not None:
            # A uniform sample of whole images (about max_rows positions in all), unfolded.
            per_image = len(range(*wins[0][0].indices(xp.shape[-2]))) * len(range(*wins[0][1].indices(xp.shape[-1])))
            keep = min(1.0, self.max_rows / max(per_image * self.n_images, 1))
            n = max(1, round(keep * x.shape[0]))
            pick = torch.randperm(x.shape[0], generator=self.gen)[:n].sort().values if n < x.shape[0] else None
            sub = xp if pick is None else xp[pick.to(xp.device)]
            cols = F.unfold(sub, self.layer.kernel_size, dilation=self.layer.dilation, stride=self.layer.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to("cpu", torch.float32)
            # Each entry sums products of one pair of columns, so float32 keeps its relative precision even
            # next to outlier channels; the factorisation runs in float64.
            self.h += (rows.T @ rows).double()


_PRUNABLE = (nn.Conv2d, nn.Linear)
#: One cached call of a module: ``(args, kwargs)``.
_Call = tuple[tuple, dict]


def _has_layers(module: nn.Module) -> bool:
    return any(isinstance(m, _PRUNABLE) for m in module.modules())


def _detached(obj: Any) -> Any:
    # A module may modify its input in place (ReLU(inplace=True)); the cache keeps its own copy.
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _inputs_of(module: nn.Module, calls: list[_Call], target: nn.Module) -> list[_Call]:
    """Run ``module`` on each cached call up to ``target``'s first call; ``target``'s inputs, one per call."""
    seen: list[_Call] = []

    def hook(mod, args, kwargs):
        seen.append((_detached(args), _detached(kwargs)))
        raise _Stop

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in calls:
            try:
                module(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _call_counts(model: nn.Module, x: torch.Tensor) -> dict[int, int]:
    """How many times each module (by ``id``) runs in one forward pass of ``model`` on ``x``."""
    counts: dict[int, int] = {}

    def hook(mod, args):
        counts[id(mod)] = counts.get(id(mod), 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _has_layers(m)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def _walk(module: nn.Module, calls: list[_Call], counts: dict[int, int],
          visit: Callable[[nn.Module, list[_Call]], None]) -> None:
    """Visit every conv/linear layer under ``module`` (which runs once per forward pass) in module order with its
    inputs on the calibration set, as computed by the model whose earlier layers are already visited (pruned).

    A child that also runs exactly once per pass is entered with its own inputs cached, so a layer deep in the
    network does not rerun everything before it; a child that runs several times (or not at all) is handled
    through its parent, each of its layers seeing its first call.
    """
    if isinstance(module, _PRUNABLE):
        visit(module, calls)
        return
    for kid in (k for k in module.children() if _has_layers(k)):
        count = counts.get(id(kid), 0)
        if count == 1:
            _walk(kid, _inputs_of(module, calls, kid), counts, visit)
            continue
        for layer in kid.modules():
            if isinstance(layer, _PRUNABLE):
                visit(layer, _inputs_of(module, calls, layer) if count else [])


def _calibrate(model: nn.Module, calib: Calibration, visit: Callable[[nn.Module, list[_Call]], None]) -> None:
    device = next(model.parameters()).device
    calls = [((calib.x[i:i + calib.batch_size].to(device),), {}) for i in range(0, len(calib.x), calib.batch_size)]
    if not calls:
        raise UnsupportedConfig("calibration-based pruning needs calibration inputs; pass a few hundred images")
    with torch.no_grad():
        # Which modules run once per pass does not depend on the batch: count on two images.
        _walk(model, calls, _call_counts(model, calls[0][0][0][:2]), visit)


def _stats(layer: nn.Module, calls: list[_Call], n_images: int, *, hessian: bool,
           max_rows: int = MAX_HESSIAN_ROWS) -> _Stats:
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise UnsupportedConfig("grouped convolutions are not supported by the calibration-based pruning steps; "
                                "use the magnitude step")
    stats = _Stats(layer, hessian, max_rows, n_images)
    for args, kwargs in calls:
        stats.add(args[0] if args else next(iter(kwargs.values())))
    return stats


# --- Masks -----------------------------------------------------------------------------------------------------


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest entries of a 1-D score (ties: earliest first)."""
    return torch.sort(score, stable=True).indices[:k]


def row_mask(score: torch.Tensor, level: float) -> torch.Tensor:
    """Keep-mask pruning ``floor(level * numel)`` weights of a ``(rows, cols)`` score: per output row first
    (``floor(level * cols)`` each, as Wanda does), then the remainder at the lowest surviving scores of the layer.

    Args:
        score: Nonnegative importance, one per weight, shaped ``(rows, cols)``.
        level: Fraction pruned.

    Returns:
        Boolean keep-mask of ``score``'s shape with exactly ``floor(level * numel)`` ``False`` entries.
    """
    rows, cols = score.shape
    total, per_row = int(level * score.numel()), int(level * cols)
    keep = torch.ones_like(score, dtype=torch.bool)
    if per_row:
        order = torch.sort(score, dim=1, stable=True).indices[:, :per_row]
        keep.scatter_(1, order, False)
    rest = total - rows * per_row
    if rest > 0:
        flat = score.reshape(-1).masked_fill(~keep.reshape(-1), math.inf)
        keep.view(-1)[_lowest(flat, rest)] = False
    return keep


def _runs(shape: tuple, layout: str) -> list[torch.Tensor]:
    """Runs of flat column indices (``weight.flatten(1)`` order) along which a grouping lays its groups."""
    cols = math.prod(shape[1:])
    if layout == "flat" or len(shape) != 4:
        return [torch.arange(cols)]
    cin, pos = shape[1], shape[2] * shape[3]
    by_pos = torch.arange(cols).reshape(cin, pos).T  # (positions, in): input channels at each kernel position
    return list(by_pos) if layout == "channels" else [by_pos.reshape(-1)]


def _grouped(runs: list[torch.Tensor], m: int) -> torch.Tensor:
    return torch.cat([F.pad(r, (0, (-len(r)) % m), value=-1).reshape(-1, m) for r in runs])


#: Candidate hardware layouts: the flattened input dimension; input channels at each kernel position (a run per
#: position); the flattened (kh, kw, in) order.
_LAYOUTS = ("flat", "channels", "position-major")
_GROUP_CACHE: dict[tuple, torch.Tensor] = {}


def _mask_from_groups(score: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of the ``n`` best of each group (ties: earliest position in the group; padding never kept)."""
    flat = score.reshape(score.shape[0], -1)
    padded = torch.cat([flat, torch.full((flat.shape[0], 1), -1.0)], 1)
    g = padded[:, groups]  # (rows, groups, m); index -1 reads the padding column
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    keep_g = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep[:, groups.reshape(-1)] = keep_g.reshape(flat.shape[0], -1)
    return keep[:, :-1].reshape(score.shape)


def hardware_groups(cfg: NMSparsity, shape: tuple) -> torch.Tensor:
    """The N:M hardware groups of a weight of ``shape`` under ``cfg``, as flat column indices of
    ``weight.flatten(1)``.

    The grouping is read off the target itself: of the candidate layouts, the one whose masks equal the target's
    own masks on random weights, so a weight with at most ``n`` nonzeros per returned group passes the target
    unchanged (whatever grouping its ``order`` or version selects).

    Returns:
        ``(groups, m)`` long tensor; ``-1`` marks padding at the end of a run.

    Raises:
        UnsupportedConfig: The target groups the weights in none of the known layouts.

    Example:
        >>> hardware_groups(NMSparsity(2, 4), (8, 8, 3, 3))[0]   # channels 0-3 at kernel position (0, 0)
        tensor([ 0,  9, 18, 27])
    """
    shape = tuple(shape)
    if len(shape) == 1:
        shape = (1,) + shape
    key = (cfg, shape)
    if key not in _GROUP_CACHE:
        gen = torch.Generator().manual_seed(1)
        handler = get_handler(cfg)
        probes = [torch.randn((2,) + shape[1:], generator=gen) for _ in range(3)]
        for layout in _LAYOUTS:
            groups = _grouped(_runs(shape, layout), cfg.m)
            if all(torch.equal(_mask_from_groups(p.abs(), groups, cfg.n), handler.weight(p) != 0) for p in probes):
                _GROUP_CACHE[key] = groups
                break
        else:
            raise UnsupportedConfig(f"{cfg.name} groups a weight of shape {shape} in no layout known to the pruning "
                                    "steps; teach chiplock.softlock.deploy.prune.hardware_groups the new one")
    return _GROUP_CACHE[key]


# --- Wanda -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def wanda_prune(model: nn.Module, cfg: Any, calib: Calibration) -> nn.Module:
    """Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, layer by layer, in place.

    Args:
        model: Plain conv/linear layers (the attacker's copy); pruned in place.
        cfg: :class:`MagnitudePruning` (``floor(p * n)`` per layer, ranked per output row) or
            :class:`NMSparsity` (the ``n`` best per hardware group).
        calib: Unlabelled calibration inputs.

    Returns:
        ``model``, every conv/linear weight satisfying ``cfg`` exactly.

    Raises:
        UnsupportedConfig: ``cfg`` is not one of those sparsity targets.

    Example:
        >>> wanda_prune(model, NMSparsity(2, 4), Calibration(x_train[:256]))
    """
    cfg = _target(cfg)

    def visit(layer: nn.Module, calls: list[_Call]) -> None:
        if not calls:
            return _unused(layer, cfg)
        w = layer.weight
        norms = _stats(layer, calls, len(calib.x), hessian=False).sq.sqrt().to(w.device, torch.float32)
        score = w.detach().abs().reshape(w.shape[0], -1) * norms[None, :]
        if isinstance(cfg, NMSparsity):
            keep = _mask_from_groups(score, hardware_groups(cfg, w.shape), cfg.n)
        else:
            keep = row_mask(score, cfg.level)
        w.mul_(keep.reshape(w.shape))

    _calibrate(model, calib, visit)
    return model


def _unused(layer: nn.Module, cfg: Any) -> None:
    """A layer the calibration never reaches has no data to rank by: prune it as the target does."""
    layer.weight.copy_(get_handler(cfg).weight(layer.weight))


# --- SparseGPT -------------------------------------------------------------------------------------------------


def _blocks(sizes: list[int], blocksize: int) -> list[tuple[int, int]]:
    """Column blocks of about ``blocksize`` that never split a group (``sizes``: group widths, in order)."""
    out, start, end = [], 0, 0
    for s in sizes:
        end += s
        if end - start >= blocksize:
            out.append((start, end))
            start = end
    if end > start:
        out.append((start, end))
    return out


def _inverse_upper_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``), SparseGPT's ``Hinv``.

    With ``h = R R^T`` for an upper-triangular ``R`` (the Cholesky factor of ``h`` with rows and columns reversed),
    ``h^-1 = (R^-1)^T R^-1``, so ``U = R^-1``: one factorisation and one triangular solve instead of three
    cubic steps.
    """
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(r, torch.eye(len(h), dtype=h.dtype), upper=True)


def sparsegpt_weight(w: torch.Tensor, h: torch.Tensor, cfg: Any, *, percdamp: float = PERCDAMP,
                     blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """SparseGPT on one layer: prune ``w`` to ``cfg`` and update the survivors to keep ``w X`` close.

    Args:
        w: The weight (conv ``(out, in, kh, kw)`` or linear ``(out, in)``).
        h: ``X^T X`` of the layer's (im2col) inputs, ``(k, k)`` with ``k = w[0].numel()``.
        cfg: :class:`MagnitudePruning` (exactly ``floor(p * n)`` pruned, spread evenly over the column blocks
            and chosen across rows within each) or :class:`NMSparsity` (per hardware group, in hardware order).
        percdamp: Dampening added to the diagonal, as a fraction of its mean.
        blocksize: Columns per lazy-update block.

    Returns:
        The pruned, compensated weight (same shape and dtype as ``w``).

    Example:
        >>> layer.weight.data = sparsegpt_weight(layer.weight, h, MagnitudePruning(0.5))
    """
    cfg = _target(cfg)
    rows = w.shape[0]
    W = w.detach().reshape(rows, -1).to("cpu", torch.float64).clone()
    k = W.shape[1]
    if isinstance(cfg, NMSparsity):
        groups = hardware_groups(cfg, w.shape)
        sizes = (groups >= 0).sum(1).tolist()
        perm = groups[groups >= 0]
    else:
        sizes, perm = [1] * k, torch.arange(k)
    W, H = W[:, perm], h.to(torch.float64)[perm][:, perm].clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    hinv = _inverse_upper_cholesky(H)

    if isinstance(cfg, MagnitudePruning):
        # Dead columns (inputs always zero) are zero already; the rest of the layer's exact count floor(p * n)
        # is shared among the blocks in proportion to their live columns.
        need = max(0, int(cfg.level * W.numel()) - rows * int(dead.sum()))
        live_before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum((~dead).long(), 0)]).tolist()
        n_live = max(live_before[-1], 1)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    for i1, i2 in _blocks(sizes, blocksize):
        W1, Hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errs = torch.zeros(i2 - i1, rows, dtype=W.dtype)
        d = torch.diag(Hinv1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if isinstance(cfg, MagnitudePruning):
            count = need * live_before[i2] // n_live - need * live_before[i1] // n_live
            tmp = (W1 ** 2 / d[None, :] ** 2).masked_fill(dead[None, i1:i2], math.inf)
            prune.view(-1)[_lowest(tmp.reshape(-1), count)] = True
        pm = prune.to(W1.dtype) / d[None, :]  # err_i = w_i * prune_i / [H^-1]_ii
        group_starts = {o - i1: s for o, s in zip(offsets, sizes) if i1 <= o < i2} \
            if isinstance(cfg, NMSparsity) else {}
        for i in range(i2 - i1):
            if i in group_starts and group_starts[i] > cfg.n:
                s = group_starts[i]
                tmp = W1[:, i:i + s] ** 2 / d[None, i:i + s] ** 2
                # Prune the s - n lowest (ties: earliest), i.e. keep the n best of the group.
                low = torch.sort(tmp, dim=1, stable=True).indices[:, :s - cfg.n]
                prune[:, i:i + s].scatter_(1, low, True)
                pm[:, i:i + s] = prune[:, i:i + s] / d[i:i + s]
            # OBS update: a pruned weight's error, spread over the block's remaining columns.
            err = torch.mul(W1[:, i], pm[:, i], out=errs[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
        W[:, i1:i2] = W1.masked_fill(prune, 0.0)
        W[:, i2:].addmm_(errs.T, hinv[i1:i2, i2:], alpha=-1.0)
    out = torch.empty_like(W)
    out[:, perm] = W
    return out.reshape(w.shape).to(w.device, w.dtype)


@torch.no_grad()
def sparsegpt_prune(model: nn.Module, cfg: Any, calib: Calibration, *,
                    max_rows: int = MAX_HESSIAN_ROWS, percdamp: float = PERCDAMP) -> nn.Module:
    """SparseGPT (Frantar & Alistarh, 2023) on every conv/linear layer, in module order, in place.

    Args:
        model: Plain conv/linear layers (the attacker's copy); pruned in place.
        cfg: :class:`MagnitudePruning` or :class:`NMSparsity`.
        calib: Unlabelled calibration inputs; convolutions sample at most ``max_rows`` im2col rows.
        max_rows: Rows sampled for each layer's Hessian.

    Returns:
        ``model``, every conv/linear weight satisfying ``cfg`` exactly.

    Raises:
        UnsupportedConfig: ``cfg`` is not one of those sparsity targets.

    Example:
        >>> sparsegpt_prune(model, MagnitudePruning(0.5), Calibration(x_train[:256]))
    """
    cfg = _target(cfg)

    def visit(layer: nn.Module, calls: list[_Call]) -> None:
        if not calls:
            return _unused(layer, cfg)
        h = _stats(layer, calls, len(calib.x), hessian=True, max_rows=max_rows).h
        layer.weight.copy_(sparsegpt_weight(layer.weight, h, cfg, percdamp=percdamp))

    _calibrate(model, calib, visit)
    return model


@torch.no_grad()
def magnitude_prune(model: nn.Module, cfg: Any, calib: Optional[Calibration] = None) -> nn.Module:
    """The target's own per-layer magnitude pruning, written into the weights (in place)."""
    handler = get_handler(_target(cfg))
    for _, layer in prunable_layers(model):
        layer.weight.copy_(handler.weight(layer.weight))
    return model


def _step(fn: Callable) -> Callable:
    def run(model: nn.Module, cfg: Any, calib: Calibration) -> tuple[nn.Module, Any]:
        return fn(model, cfg, calib), cfg
    return run


register_step("magnitude", _step(magnitude_prune), _applies,
              doc="per-layer magnitude pruning (what the target does itself)")
register_step("wanda", _step(wanda_prune), _applies,
              doc="Wanda: prune by |W| x input-feature norm, per output row / per N:M group")
register_step("sparsegpt", _step(sparsegpt_prune), _applies,
              doc="SparseGPT: OBS one-shot pruning with the calibration Hessian, survivors compensated")
# The same tool with its one hyperparameter tuned: 1 % damping limits how exactly the survivors compensate for
# perfectly correlated inputs (decoy copies); a deployer whose pruned model is poor lowers it.
register_step("sparsegpt-lowdamp", _step(functools.partial(sparsegpt_prune, percdamp=LOW_DAMP)), _applies,
              doc="SparseGPT with damping 1e-5 of the mean Hessian diagonal (exact compensation)")

# Compositions with the reparametrisations of :mod:`.quant`: ``const-fold`` first (a classifier input that is
# constant over the calibration set moves into the bias, so pruning its weights costs nothing), ``fold-bn`` first
# (pruning sees the weights as deployed), ``bn-reestimate`` last (BatchNorm statistics of the pruned network).
_RECIPES = [("magnitude",), ("wanda",), ("sparsegpt",),
            ("const-fold", "magnitude"), ("const-fold", "wanda"), ("const-fold", "sparsegpt"),
            ("magnitude", "bn-reestimate"), ("wanda", "bn-reestimate"), ("sparsegpt", "bn-reestimate"),
            ("const-fold", "magnitude", "bn-reestimate"), ("const-fold", "wanda", "bn-reestimate"),
            ("const-fold", "sparsegpt", "bn-reestimate"),
            ("fold-bn", "sparsegpt"), ("sparsegpt-lowdamp", "bn-reestimate"),
            ("const-fold", "sparsegpt-lowdamp", "bn-reestimate"),
            # Bespoke: merge decoy copies of a channel before ranking.
            ("dedupe", "magnitude"), ("dedupe", "const-fold", "wanda", "bn-reestimate"),
            ("dedupe", "const-fold", "sparsegpt", "bn-reestimate")]
for _chain in _RECIPES:
    if all(name in STEPS for name in _chain):
        register_recipe(*_chain)

__all__ = ["MAX_HESSIAN_ROWS", "hardware_groups", "magnitude_prune", "prunable_layers", "row_mask",
           "sparsegpt_prune", "sparsegpt_weight", "wanda_prune"]
