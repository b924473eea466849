"""The structural panel: statistics that tell trained weights from i.i.d. draws of their own marginal.

A wrong key decodes a pre-aes tensor to independent draws from the public model: the right marginal, no
structure. Trained weights have structure (a few large singular values, rows of different scale, smooth conv
kernels, layers whose scales agree), and each statistic here measures one such trait in milliseconds, with no
data and no model evaluation. Where one separates right from wrong keys, cracking costs Argon2id × 2^entropy of
the key, not a model run per guess.

Each function takes a weight tensor (or two, for the cross-layer statistic) and returns a float.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch


def _array(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """``w`` as a float64 array of its own shape."""
    return w.detach().double().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)


def _matrix(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows = output units (conv: one row per output channel), float64."""
    a = _array(w)
    return a.reshape(a.shape[0], -1)


def spectral_edge_ratio(w: torch.Tensor | np.ndarray) -> float:
    """Top singular value of the centred weight matrix over the Marchenko-Pastur edge ``σ(√m + √n)``
    (about 1 for i.i.d. entries, larger when a few directions dominate)."""
    a = _matrix(w)
    a = a - a.mean()
    sigma = a.std()
    if sigma == 0:
        return 1.0
    # The top eigenvalue of the smaller Gram matrix: 4x faster than a full SVD at 256 x 1152.
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    top = np.sqrt(max(float(np.linalg.eigvalsh(g)[-1]), 0.0))
    return float(top / (sigma * (np.sqrt(a.shape[0]) + np.sqrt(a.shape[1]))))


def _cv(x: np.ndarray) -> float:
    m = x.mean()
    return float(x.std() / m) if m > 0 else 0.0


def row_norm_cv(w: torch.Tensor | np.ndarray) -> float:
    """Coefficient of variation of the rows' L2 norms (output units of different scale)."""
    return _cv(np.linalg.norm(_matrix(w), axis=1))


def col_norm_cv(w: torch.Tensor | np.ndarray) -> float:
    """Coefficient of variation of the columns' L2 norms (inputs of different importance)."""
    return _cv(np.linalg.norm(_matrix(w), axis=0))


def row_mean_dispersion(w: torch.Tensor | np.ndarray) -> float:
    """Variance of the row means times the row length over the overall variance (about 1 for i.i.d. entries)."""
    a = _matrix(w)
    v = a.var()
    return float(a.mean(axis=1).var() * a.shape[1] / v) if v > 0 else 1.0


def _excess_kurtosis(a: np.ndarray) -> np.ndarray:
    d = a - a.mean(axis=-1, keepdims=True)
    d2 = d * d
    m2 = d2.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (d2 * d2).mean(axis=-1) / (m2 * m2) - 3.0


def row_kurtosis(w: torch.Tensor | np.ndarray) -> float:
    """Mean excess kurtosis within rows minus the excess kurtosis of the whole tensor (rows of different scale
    make the whole heavier-tailed than its rows)."""
    a = _matrix(w)
    if a.shape[1] < 4 or a.var() == 0:
        return 0.0
    return float(np.nanmean(_excess_kurtosis(a)) - _excess_kurtosis(a.reshape(-1)))


def col_sign_agreement(w: torch.Tensor | np.ndarray) -> float:
    """Mean over columns of ``|mean sign|`` across rows, over its i.i.d. expectation ``sqrt(2 / (π m))``: inputs
    that all units weigh the same way."""
    a = _matrix(w)
    s = np.sign(a - np.median(a))
    return float(np.abs(s.mean(axis=0)).mean() / np.sqrt(2.0 / (np.pi * a.shape[0])))


def kernel_neighbour_corr(w: torch.Tensor | np.ndarray) -> float:
    """Correlation of horizontally and vertically adjacent taps inside conv kernels (0 for i.i.d. entries).

    Raises:
        ValueError: ``w`` is not a conv weight with kernels of at least 2 taps in one direction.
    """
    a = _array(w)
    if a.ndim != 4 or max(a.shape[2], a.shape[3]) < 2:
        raise ValueError("kernel_neighbour_corr needs a conv weight (out, in, kh, kw) with kh or kw >= 2")
    a = a - a.mean()
    x = np.concatenate([a[..., :, :-1].reshape(-1), a[..., :-1, :].reshape(-1)])
    y = np.concatenate([a[..., :, 1:].reshape(-1), a[..., 1:, :].reshape(-1)])
    return float(np.corrcoef(x, y)[0, 1])


def in_channel_norms(w: torch.Tensor | np.ndarray, channels: int) -> np.ndarray:
    """L2 norm of the weights that read each of ``channels`` input channels (a linear layer after a flatten
    reads ``in_features / channels`` positions per channel)."""
    a = _matrix(w)
    if a.shape[1] % channels:
        raise ValueError(f"a layer with {a.shape[1]} inputs per unit cannot read {channels} channels")
    return np.sqrt((a.reshape(a.shape[0], channels, -1) ** 2).sum(axis=(0, 2)))


def cross_layer_spearman(w: torch.Tensor | np.ndarray, w_next: torch.Tensor | np.ndarray) -> float:
    """Spearman correlation of layer ``l``'s output-unit norms with layer ``l + 1``'s input-channel norms
    (trained layers agree on which channels matter; i.i.d. layers do not)."""
    from scipy.stats import spearmanr

    rows = np.linalg.norm(_matrix(w), axis=1)
    return float(spearmanr(rows, in_channel_norms(w_next, rows.size)).statistic)


#: The per-tensor statistics, by name, with a predicate saying which tensors they apply to.
PANEL: dict[str, tuple[Callable[[torch.Tensor], float], Callable[[torch.Tensor], bool]]] = {
    "spectrum": (spectral_edge_ratio, lambda w: w.dim() >= 2 and min(w.shape[0], w[0].numel()) >= 8),
    "row_norm_cv": (row_norm_cv, lambda w: w.dim() >= 2 and w.shape[0] >= 8),
    "col_norm_cv": (col_norm_cv, lambda w: w.dim() >= 2 and w.shape[0] >= 8 and w[0].numel() >= 8),
    "row_mean_dispersion": (row_mean_dispersion, lambda w: w.dim() >= 2 and w.shape[0] >= 8),
    "row_kurtosis": (row_kurtosis, lambda w: w.dim() >= 2 and w[0].numel() >= 8),
    "col_sign_agreement": (col_sign_agreement, lambda w: w.dim() >= 2 and w.shape[0] >= 8),
    "kernel_neighbour_corr": (kernel_neighbour_corr, lambda w: w.dim() == 4 and max(w.shape[2:]) >= 2),
}


def measure_panel(weights: dict[str, torch.Tensor], chain: list[str], *, n_locks: int = 4, n_wrong_keys: int = 200,
                  lock: Callable[[torch.Tensor, bytes], object] | None = None,
                  stats: tuple[str, ...] | None = None) -> dict[str, dict[str, object]]:
    """The panel's right-key and wrong-key samples for every applicable (statistic, tensor) pair.

    Args:
        weights: tensors by name (the trained model's state dict, or part of it).
        chain: names of consecutive layers, for the cross-layer statistic (``"a->b"`` rows of the result).
        n_locks: independent locks of each tensor (the right-key instances).
        n_wrong_keys: random wrong keys per tensor.
        lock: ``lock(tensor, key)`` returning a :class:`~chiplock.attacks.locked.LockedTensor`;
            default :func:`~chiplock.attacks.locked.lock_pre_aes`.
        stats: names from :data:`PANEL` (and ``"cross_layer_spearman"``) to run; default all.

    Returns:
        ``{"<statistic> <tensor>": {"pos": array, "neg": array, "ms": fastest evaluation in milliseconds}}``.
    """
    from chiplock.attacks.locked import lock_pre_aes

    lock = lock or lock_pre_aes
    locks = {n: [(lock(w, k := os.urandom(32)), k) for _ in range(n_locks)] for n, w in weights.items()}
    right = {n: [lk.decode(k) for lk, k in v] for n, v in locks.items()}
    wrong = {n: [v[i % n_locks][0].decode(os.urandom(32)) for i in range(n_wrong_keys)] for n, v in locks.items()}
    out: dict[str, dict[str, object]] = {}

    def timed(fn: Callable[..., float], args: tuple) -> tuple[float, float]:
        t0 = time.perf_counter()
        v = fn(*args)
        return v, time.perf_counter() - t0

    def run(label: str, fn: Callable[..., float], pos_args: list, neg_args: list) -> None:
        neg = [timed(fn, a) for a in neg_args]
        # The fastest evaluation: on a shared machine the others measure the neighbours as much as the statistic.
        out[label] = {"pos": np.array([fn(*a) for a in pos_args]), "neg": np.array([v for v, _ in neg]),
                      "ms": min(t for _, t in neg) * 1e3}

    for name, w in weights.items():
        for stat, (fn, applies) in PANEL.items():
            if applies(w) and (stats is None or stat in stats):
                run(f"{stat} {name}", fn, [(x,) for x in right[name]], [(x,) for x in wrong[name]])
    for a, b in zip(chain, chain[1:]) if stats is None or "cross_layer_spearman" in stats else ():
        run(f"cross_layer_spearman {a}->{b}", cross_layer_spearman, list(zip(right[a], right[b])),
            list(zip(wrong[a], wrong[b])))
    return out
