"""Attacks on neuron authorization locks (EdgePro, issue 12): ``chiplock neuronlock attack``.

The defender trains a model, ranks its neurons on a calibration set (the :class:`NeuronStats` are public: they are
stored with the model), derives the password from a secret key and lock-trains the model. The attacker holds the
locked weights, the public statistics and :class:`PasswordSpec`, and (where stated) a little labelled data. Each
attack reports the accuracy it reaches without the password against the locked model's authorized accuracy:

- ``fine-tune``: train the locked model without the password on 1 % / 10 % of the training data, against a model
  trained from scratch on the same data (the lock is worth something only where fine-tuning does not beat scratch
  by much).
- ``prune``: global magnitude pruning of all Conv2d / Linear weights, 10-50 %; authorized and natural accuracy.
- ``brute force``: a model locked on one small layer (≤ 16 neurons); every choice of k neurons (k from the public
  gamma) times a grid of constants from the public statistics (``scale · (mean ± m · std)``), scored on the
  attacker's 1 % labelled set (cross-entropy) or on unlabelled images (confidence). Does any candidate recover?
  The size of the full password's neuron-choice space is reported beside it.
- ``fold``: an attacker who knows the neurons and values turns the password into plain weights
  (:func:`fold_password`: the neuron's incoming weights set to zero and its bias to the constant, which is exact:
  the hook sets the layer's output, and a zero-weight unit with that bias outputs it everywhere); one who knows only
  the neurons fits the constants on 1 % labelled data (:func:`fit_constants`).
- ``find neurons``: can the authorization neurons be found from the locked weights or natural activations?
  Precision@k (k = the password's neurons per layer) and AUC of per-neuron scores.
- ``detect``: can right and wrong passwords (random keys) be told apart from the model's outputs on unlabelled
  inputs (mean max-probability, mean entropy)? AUC via :func:`chiplock.attacks.auc.auc`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from chiplock.attacks.result import AttackResult, Progress, Table, new_figure, resolve, save_figure
from chiplock.errors import UnsupportedConfig

_COMMON: dict[str, Any] = {
    "lock_mode": "mixed", "lock_unauth_weight": 1.0, "gamma": 0.1, "seed": 0, "test_images": None,
    "ft_fractions": [0.01, 0.1], "ft_epochs": 5, "ft_lr": 1e-3, "bf_arch": "smallcnn", "bf_layer": "features.0",
    "bf_sigmas": [2.0, 3.0, 4.0], "bf_scales": [1.5, 2.25, 3.0], "bf_max_candidates": 20000,
    "attacker_fraction": 0.01, "attacker_min": 16, "det_batch": 32,
}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"data": "digits8", "archs": ["smallcnn"], "width": 8, "pretrain_epochs": 10, "lock_epochs": 10,
              "lock_lr": 3e-3, "calib_images": 256, "prune_ratios": [0.1, 0.3, 0.5], "bf_unlabelled": 128,
              "fit_steps": 100, "fit_restarts": 2, "wrong_keys": 8, "det_batches": 8, **_COMMON},
    "paper": {"data": "mnist5000", "archs": ["smallcnn", "resnet18"], "width": 16, "pretrain_epochs": 5,
              # ResNet-18 (BatchNorm frozen in lock training) needs more, gentler lock epochs than the small CNN.
              "lock_epochs": {"resnet18": 8, "default": 3}, "lock_lr": {"smallcnn": 3e-3, "default": 1e-3},
              "calib_images": 512, "prune_ratios": [0.1, 0.2, 0.3, 0.4, 0.5],
              "bf_unlabelled": 256, "fit_steps": 150, "fit_restarts": 2, "wrong_keys": 20, "det_batches": 20,
              **_COMMON},
}

#: The per-neuron scores :func:`neuron_scores` computes (the attacker's ways to find the authorization neurons).
SCORES = ("public importance", "incoming weight norm", "downstream gradient", "natural std", "mean drift",
          "importance drift")


def _key(label: str, seed: int) -> bytes:
    """A reproducible 32-byte test key (the attack's own defender; not a secret anyone relies on)."""
    return hashlib.sha256(f"chiplock neuronlock attack {label} {seed}".encode()).digest()


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _locked_module(model: nn.Module, layer: str) -> nn.Module:
    mod = _modules(model).get(layer)
    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise UnsupportedConfig(f"layer {layer!r} is not a Conv2d or Linear of this model; pick one of "
                                f"{', '.join(names)}")
    return mod


def _mask_shape(mod: nn.Module, n: int) -> tuple[int, ...]:
    return (1, n, 1, 1) if isinstance(mod, nn.Conv2d) else (n,)


@contextmanager
def constants(model: nn.Module, layers: Mapping[str, tuple[Sequence[int], torch.Tensor]]) -> Iterator[None]:
    """Within the block, set each named layer's outputs ``neurons`` to ``consts`` (differentiable in ``consts``).

    The attacker's own version of the password hook: ``layers`` maps a module name to ``(neurons, consts)``; a conv
    layer's constant is broadcast over the spatial positions, a linear layer's over the leading dimensions.

    Example:
        >>> with constants(model, {"features.0": ([3], torch.tensor([1.5]))}):
        ...     logits = model(x)
    """
    handles = []
    try:
        for name, (neurons, consts) in layers.items():
            mod = _locked_module(model, name)
            n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            idx = torch.as_tensor(list(neurons), dtype=torch.long)
            mask = torch.zeros(n)
            mask[idx] = 1.0
            mask = mask.reshape(_mask_shape(mod, n))

            def hook(_m, _inp, out, idx=idx, mask=mask, consts=consts, n=n, conv=isinstance(mod, nn.Conv2d)):
                full = torch.zeros(n, dtype=out.dtype).index_put((idx,), consts.to(out.dtype))
                full = full.reshape((1, n, 1, 1) if conv else (n,))
                return out * (1 - mask.to(out.dtype)) + full * mask.to(out.dtype)

            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def fold_password(model: nn.Module, password) -> nn.Module:
    """A hook-free copy of ``model`` that computes what ``model`` computes with ``password`` applied.

    For every authorization neuron ``c`` of a locked layer, the incoming weights ``weight[c]`` are set to zero and
    the bias ``bias[c]`` to ``value · scale`` (a bias is added where the layer has none). A unit with zero weights
    outputs its bias at every position, which is exactly what the password hook writes there, so everything
    downstream (BatchNorm, activation, the next layer's padding) sees the same numbers. This is the attack of a
    party who learns the password once (say from one unlocked device): the result runs anywhere without it.

    Raises:
        UnsupportedConfig: A password layer that is not a Conv2d / Linear of ``model`` or a neuron out of range.

    Example:
        >>> plain = fold_password(locked, password)   # accuracy(plain) == evaluate(locked, ..., password)
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for lp in password.layers:
            mod = _locked_module(out, lp.layer)
            n = mod.weight.shape[0]
            if any(not 0 <= c < n for c in lp.neurons):
                raise UnsupportedConfig(f"password layer {lp.layer!r} names neurons outside 0..{n - 1}; "
                                        "was it derived for this model?")
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(n, dtype=mod.weight.dtype))
            for c, v in zip(lp.neurons, lp.values):
                mod.weight[c] = 0.0
                mod.bias[c] = float(v) * float(lp.scale)
    return out


def prune_global(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``model`` with the smallest-magnitude ``ratio`` of all Conv2d / Linear weights set to zero.

    Raises:
        UnsupportedConfig: ``ratio`` outside [0, 1).
    """
    if not 0 <= ratio < 1:
        raise UnsupportedConfig(f"pruning ratio {ratio}: use a fraction in [0, 1), e.g. 0.3")
    out = copy.deepcopy(model)
    weights = [m.weight for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if ratio == 0 or not weights:
        return out
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = int(ratio * flat.numel())
    if k == 0:
        return out
    threshold = flat.kthvalue(k).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return out


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, password=None) -> float:
    logits = _logits(model, x) if password is None else _with(model, password, x)
    return float((logits.argmax(1) == y).float().mean())


def fit_constants(model: nn.Module, neurons: Mapping[str, Sequence[int]], x: torch.Tensor, y: torch.Tensor, *,
                  init: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None, steps: int = 200,
                  lr: float = 0.1, restarts: int = 3, seed: int = 0):
    """Fit the locking constants of known authorization neurons on a small labelled set, weights frozen.

    Args:
        model: The locked model.
        neurons: Layer name → the authorization neurons the attacker knows.
        x, y: The attacker's labelled images.
        init: Layer name → ``(mean, std)`` per neuron (the public statistics); restarts start at
            ``mean + N(0, 3²) · std``, the first at ``mean``. ``None``: start at zero, unit spread.
        steps, lr, restarts, seed: Adam on the cross-entropy of the whole set; the best restart (lowest loss) wins.

    Returns:
        A :class:`~chiplock.neuronlock.Password` (scale 1.0) with the fitted constants as values.

    Example:
        >>> guess = fit_constants(locked, {lp.layer: lp.neurons for lp in password.layers}, x[:40], y[:40])
    """
    from chiplock.neuronlock import LayerPassword, Password

    gen = torch.Generator().manual_seed(seed)
    names = list(neurons)
    spread = {}
    for name in names:
        k = len(neurons[name])
        mean, std = (init[name] if init is not None and name in init else ([0.0] * k, [1.0] * k))
        spread[name] = (torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32))
    was = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    best, best_loss = None, math.inf
    try:
        for r in range(max(restarts, 1)):
            params = {}
            for name in names:
                mean, std = spread[name]
                noise = torch.zeros_like(mean) if r == 0 else torch.randn(mean.shape, generator=gen) * 3.0
                params[name] = (mean + noise * std).clone().requires_grad_(True)
            opt = torch.optim.Adam(params.values(), lr=lr)
            spec = {name: (neurons[name], params[name]) for name in names}
            with constants(model, spec):
                for _ in range(steps):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    final = float(nn.functional.cross_entropy(model(x), y))
            if final < best_loss:
                best_loss, best = final, {n: params[n].detach().clone() for n in names}
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was)
    return Password(layers=tuple(LayerPassword(layer=n, neurons=tuple(int(c) for c in neurons[n]),
                                               values=tuple(float(v) for v in best[n]), scale=1.0) for n in names))


def brute_force(model: nn.Module, layer: str, k: int, stats, x: torch.Tensor, y: torch.Tensor | None = None, *,
                sigmas: Sequence[float] = (2.0, 3.0, 4.0), scales: Sequence[float] = (1.5, 2.25, 3.0),
                candidates: Sequence[int] | None = None, max_candidates: int = 20000,
                progress: Progress | None = None) -> list[dict[str, Any]]:
    """Try every choice of ``k`` neurons of ``layer`` with every constant on a grid; rank the candidates.

    Each neuron's constant is ``scale · (mean + sign · m · std)`` from the public ``stats`` (the
    :class:`NeuronStats` of ``layer``), ``m`` in ``sigmas``, ``scale`` in ``scales`` (shared by the candidate's
    neurons), the signs per neuron. With labels ``y`` a candidate's score is the cross-entropy on ``(x, y)``
    (lower is better); without, minus the mean max-probability on ``x`` (the model is confident only when it works).

    Args:
        candidates: The neurons to choose from (``None``: all of the layer's).
        max_candidates: Refuse a larger search.

    Returns:
        One dict per candidate, best first: ``neurons``, ``values`` (the constants), ``score``.

    Raises:
        UnsupportedConfig: More than ``max_candidates`` candidates, or ``k`` out of range.

    Example:
        >>> best = brute_force(locked, "features.0", 1, stats[0], x_small, y_small)[0]
    """
    mod = _locked_module(model, layer)
    n = mod.weight.shape[0]
    pool = list(range(n)) if candidates is None else sorted(int(c) for c in candidates)
    if not 1 <= k <= len(pool):
        raise UnsupportedConfig(f"brute force: k={k} neurons out of a pool of {len(pool)}; use 1 <= k <= pool size")
    grid = list(itertools.product(sigmas, scales, itertools.product((-1.0, 1.0), repeat=k)))
    total = math.comb(len(pool), k) * len(grid)
    if total > max_candidates:
        raise UnsupportedConfig(f"brute force over {total:,} candidates exceeds max_candidates={max_candidates:,}; "
                                "pick a smaller layer or restrict the candidate neurons")
    mean, std = np.asarray(stats.mean, dtype=np.float64), np.asarray(stats.std, dtype=np.float64)
    # The derivation floors a neuron's spread at a tenth of the layer's median (public), so the grid does too.
    std = np.maximum(std, 0.1 * float(np.median(std)) or 1e-3)
    out, done = [], 0
    was = model.training
    model.eval()
    try:
        for neurons in itertools.combinations(pool, k):
            for m, s, signs in grid:
                vals = [s * (mean[c] + sg * m * std[c]) for c, sg in zip(neurons, signs)]
                with torch.no_grad(), constants(model, {layer: (neurons, torch.tensor(vals, dtype=torch.float32))}):
                    logits = model(x)
                if y is not None:
                    score = float(nn.functional.cross_entropy(logits, y))
                else:
                    score = -float(logits.softmax(1).max(1).values.mean())
                out.append({"neurons": tuple(neurons), "values": tuple(float(v) for v in vals), "score": score})
                done += 1
                if progress is not None and done % 100 == 0:
                    progress("brute force", done, total)
    finally:
        model.train(was)
    out.sort(key=lambda r: r["score"])
    return out


def neuron_scores(model: nn.Module, public_stats, x: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """Per-neuron scores an attacker can compute from the locked model and the public statistics.

    Returns ``{score name: {layer: scores}}`` for the :data:`SCORES`: the public importance (the derivation's
    prior), the norm of each neuron's incoming weights, the mean absolute gradient of the logits' squared norm with
    respect to the neuron's natural activation (a generic stand-in for the next layer's input-weight norm), the
    natural activation's standard deviation, and its drift from the public statistics (mean shift in public
    standard deviations; log-ratio of importances).
    """
    from chiplock.neuronlock import rank_neurons

    layers = [s.layer for s in public_stats]
    nat = {s.layer: s for s in rank_neurons(model, x, layers)}
    pub = {s.layer: s for s in public_stats}
    mods = _modules(model)
    grads: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _i, out):
            out.retain_grad()
            saved[name] = out
        return hook

    handles = [mods[name].register_forward_hook(keep(name)) for name in layers]
    was = model.training
    model.eval()
    try:
        logits = model(x)
        (logits.pow(2).sum() / 2).backward()
        for name in layers:
            g = saved[name].grad.abs()
            grads[name] = (g.mean(dim=(0, 2, 3)) if g.dim() == 4 else g.reshape(-1, g.shape[-1]).mean(0)).numpy()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was)
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in SCORES}
    for name in layers:
        w = mods[name].weight.detach()
        p, q = pub[name], nat[name]
        pm, ps, pi = (np.asarray(v, dtype=np.float64) for v in (p.mean, p.std, p.importance))
        qm, qs, qi = (np.asarray(v, dtype=np.float64) for v in (q.mean, q.std, q.importance))
        out["public importance"][name] = pi
        out["incoming weight norm"][name] = w.reshape(w.shape[0], -1).norm(dim=1).double().numpy()
        out["downstream gradient"][name] = grads[name].astype(np.float64)
        out["natural std"][name] = qs
        out["mean drift"][name] = np.abs(qm - pm) / (ps + 1e-8)
        out["importance drift"][name] = np.abs(np.log((qi + 1e-8) / (pi + 1e-8)))
    return out


def precision_at_k(scores: Mapping[str, np.ndarray], truth: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """How well per-layer ``scores`` pick out the ``truth`` neurons.

    Returns ``precision`` (hits among each layer's top-k, k = its true count, summed over layers, in whichever
    direction, high or low, hits more: an attacker can try both), ``direction``, ``chance`` (k / n pooled) and
    ``auc`` (true against other neurons of the same layer, pairs pooled over layers, ``max(AUC, 1 - AUC)``).
    """
    hits = {"high": 0, "low": 0}
    total, neurons, wins, pairs = 0, 0, 0.0, 0
    for layer, true in truth.items():
        s = np.asarray(scores[layer], dtype=np.float64)
        k, t = len(true), set(int(c) for c in true)
        order = np.argsort(-s, kind="stable")
        hits["high"] += len(t & set(order[:k].tolist()))
        hits["low"] += len(t & set(order[::-1][:k].tolist()))
        total, neurons = total + k, neurons + len(s)
        # Mann-Whitney within the layer (scores of different layers are not comparable), pooled over layers.
        pos = s[sorted(t)]
        neg = np.delete(s, sorted(t))
        wins += float((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
        pairs += pos.size * neg.size
    direction = max(hits, key=hits.get)
    a = wins / pairs if pairs else 0.5
    return {"precision": hits[direction] / max(total, 1), "direction": direction, "chance": total / max(neurons, 1),
            "auc": max(a, 1 - a), "k": total, "n": neurons}


def detection_stats(model: nn.Module, password, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image max-probability and entropy of ``model``'s outputs with ``password`` applied (``None``: natural)."""
    from chiplock.neuronlock import apply_password

    if password is None:
        logits = _logits(model, x)
    else:
        with apply_password(model, password):
            logits = _logits(model, x)
    p = logits.double().softmax(1)
    return {"max-prob": p.max(1).values.numpy(), "entropy": -(p * p.clamp_min(1e-30).log()).sum(1).numpy()}


def _fresh(arch: str, data, width: int, seed: int) -> nn.Module:
    from chiplock.softlock.model_io import build_architecture

    torch.manual_seed(seed)
    return build_architecture(arch, num_classes=data.num_classes, image_size=data.image_size, width=width)


def _lock(arch: str, data, params: dict[str, Any], layers: Sequence[str] | None, label: str) -> dict[str, Any]:
    """Train the defender's model, derive its password from a test key and lock-train it."""
    from chiplock.neuronlock import PasswordSpec, derive_password, rank_neurons
    from chiplock.neuronlock.train import NeuronLockConfig, lock_train
    from chiplock_demo.training import train_classifier

    seed = params["seed"]
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    t0 = time.perf_counter()
    model = _fresh(arch, data, params["width"], seed)
    train_classifier(model, x, y, epochs=params["pretrain_epochs"], seed=seed)
    original = _acc(model, xt, yt)
    stats = rank_neurons(model, x[:params["calib_images"]], layers)
    spec = PasswordSpec(gamma=params["gamma"])
    password = derive_password(_key(label, seed), stats, spec)
    cfg = NeuronLockConfig(spec=spec, epochs=_per_arch(params["lock_epochs"], arch, int),
                           lr=_per_arch(params["lock_lr"], arch),
                           unauth_weight=params["lock_unauth_weight"], mode=params["lock_mode"], seed=seed)
    lock_train(model, x, y, password, cfg)  # Leaves the model in eval mode.
    return {"model": model, "stats": stats, "spec": spec, "password": password, "original": original,
            "authorized": _acc(model, xt, yt, password), "natural": _acc(model, xt, yt),
            "seconds": time.perf_counter() - t0}


def _per_arch(value: Any, arch: str, kind: type = float) -> Any:
    """A setting given once (a number) or per architecture (``{"resnet18": 1e-3, "default": 3e-3}``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UnsupportedConfig(f"setting {value!r} for {arch}: give a number or a JSON object such as "
                                    '{"resnet18": 1e-3, "default": 3e-3}') from None
    if isinstance(value, dict):
        if arch not in value and "default" not in value:
            raise UnsupportedConfig(f"per-architecture setting {value!r} has no entry for {arch!r} or 'default'")
        value = value.get(arch, value.get("default"))
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            or (kind is int and value != int(value))):
        what = "a positive whole number, e.g. 3" if kind is int else "a positive number, e.g. 1e-3"
        raise UnsupportedConfig(f"setting {value!r} for {arch}: use {what}")
    return kind(value)


def _attacker_set(data, fraction: float, minimum: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(data.y_train)
    m = min(n, max(int(round(fraction * n)), minimum))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[:m]
    return data.x_train[idx], data.y_train[idx]


def _attack_arch(arch: str, data, params: dict[str, Any], tick) -> dict[str, Any]:
    from chiplock.neuronlock import derive_password
    from chiplock_demo.training import train_classifier

    seed = params["seed"]
    xt, yt = data.x_test, data.y_test
    if params["test_images"]:
        xt, yt = xt[:params["test_images"]], yt[:params["test_images"]]
    lk = _lock(arch, data, params, None, arch)
    model, pw, stats = lk["model"], lk["password"], lk["stats"]
    res: dict[str, Any] = {k: lk[k] for k in ("original", "authorized", "natural", "seconds")}
    res["password_layers"] = [{"layer": lp.layer, "k": len(lp.neurons), "n": int(_locked_module(model, lp.layer)
                                                                                  .weight.shape[0])}
                              for lp in pw.layers]
    res["search_bits"] = sum(math.log2(math.comb(r["n"], r["k"])) for r in res["password_layers"])
    tick()

    # Wrong passwords (random keys) and their detectability from unlabelled outputs.
    wrong = [derive_password(_key(f"{arch} wrong {i}", seed), stats, lk["spec"]) for i in range(params["wrong_keys"])]
    res["wrong_acc"] = [_acc(model, xt, yt, w) for w in wrong]
    b, nb = params["det_batch"], params["det_batches"]
    pool = data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed + 3))]
    right = detection_stats(model, pw, pool[:b * nb])
    wrongs = [detection_stats(model, w, pool[(i % nb) * b:(i % nb + 1) * b]) for i, w in enumerate(wrong)]
    nat = detection_stats(model, None, pool[:b * nb])
    from chiplock.attacks.auc import auc

    det = {}
    for stat in ("max-prob", "entropy"):
        pos = [float(right[stat][i * b:(i + 1) * b].mean()) for i in range(nb)]
        neg = [float(w[stat].mean()) for w in wrongs]
        every = np.concatenate([w[stat] for w in wrongs])
        det[stat] = {"batch_auc": auc(pos, neg), "image_auc": auc(right[stat], every),
                     "right_mean": float(np.mean(right[stat])), "wrong_mean": float(np.mean(every)),
                     "natural_mean": float(np.mean(nat[stat]))}
    res["detect"] = det
    tick()

    # Fine-tuning without the password vs training from scratch on the same data.
    ft = []
    for frac in params["ft_fractions"]:
        xs, ys = _attacker_set(data, frac, 1, seed + int(frac * 1e4))
        bs = min(64, max(8, len(ys) // 4))
        tuned = copy.deepcopy(model)
        train_classifier(tuned, xs, ys, epochs=params["ft_epochs"], lr=params["ft_lr"], batch_size=bs, seed=seed)
        scratch = _fresh(arch, data, params["width"], seed + 1)
        train_classifier(scratch, xs, ys, epochs=params["ft_epochs"], lr=params["ft_lr"], batch_size=bs, seed=seed)
        ft.append({"fraction": frac, "images": len(ys), "fine_tuned": _acc(tuned, xt, yt),
                   "fine_tuned_with_password": _acc(tuned, xt, yt, pw), "scratch": _acc(scratch, xt, yt)})
        tick()
    res["fine_tune"] = ft

    # Global magnitude pruning.
    res["prune"] = []
    for r in params["prune_ratios"]:
        pruned = prune_global(model, float(r))
        res["prune"].append({"ratio": float(r), "authorized": _acc(pruned, xt, yt, pw),
                             "natural": _acc(pruned, xt, yt)})
    tick()

    # Folding: neurons and values known (exact), random neurons with the true values, neurons only (fit on 1 %).
    xa, ya = _attacker_set(data, params["attacker_fraction"], params["attacker_min"], seed)
    folded = fold_password(model, pw)
    folded_logits = _logits(folded, xt)
    res["fold_known"] = float((folded_logits.argmax(1) == yt).float().mean())
    res["fold_max_logit_diff"] = float((folded_logits - _with(model, pw, xt)).abs().max())
    rng = np.random.default_rng(seed)
    decoy = _random_neurons(model, pw, rng)
    res["fold_random"] = _acc(fold_password(model, decoy), xt, yt)
    pub = {s.layer: s for s in stats}

    def fit(neurons_of) -> Any:
        # The attacker fits the constants of the given neurons, starting from their public mean and std.
        return fit_constants(model, {lp.layer: lp.neurons for lp in neurons_of.layers}, xa, ya,
                             init={lp.layer: ([pub[lp.layer].mean[c] for c in lp.neurons],
                                              [pub[lp.layer].std[c] for c in lp.neurons]) for lp in neurons_of.layers},
                             steps=params["fit_steps"], restarts=params["fit_restarts"], seed=seed)

    res["fit_known_neurons"] = _acc(model, xt, yt, fit(pw))
    res["fit_random_neurons"] = _acc(model, xt, yt, fit(decoy))
    res["attacker_images"] = len(ya)
    tick()

    # Finding the authorization neurons.
    truth = {lp.layer: lp.neurons for lp in pw.layers}
    scores = neuron_scores(model, stats, data.x_train[:params["calib_images"]])
    res["find"] = {name: precision_at_k(s, truth) for name, s in scores.items()}
    tick()
    return res


def _with(model: nn.Module, password, x: torch.Tensor) -> torch.Tensor:
    from chiplock.neuronlock import apply_password

    with apply_password(model, password):
        return _logits(model, x)


def _random_neurons(model: nn.Module, password, rng: np.random.Generator):
    """The password with each layer's neurons swapped for as many others (none of the true ones where possible)."""
    from chiplock.neuronlock import LayerPassword, Password

    layers = []
    for lp in password.layers:
        n = int(_locked_module(model, lp.layer).weight.shape[0])
        others = [c for c in range(n) if c not in set(lp.neurons)]
        if len(others) < len(lp.neurons):
            others = list(range(n))
        pick = rng.choice(others, size=len(lp.neurons), replace=False)
        layers.append(LayerPassword(layer=lp.layer, neurons=tuple(int(c) for c in pick), values=lp.values,
                                    scale=lp.scale))
    return Password(layers=tuple(layers))


def _brute(data, params: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
    seed = params["seed"]
    layer = params["bf_layer"]
    lk = _lock(params["bf_arch"], data, params, [layer], f"brute {layer}")
    model, pw, stats = lk["model"], lk["password"], lk["stats"]
    lp = next(p for p in pw.layers if p.layer == layer)
    n = int(_locked_module(model, layer).weight.shape[0])
    if n > 16:
        raise UnsupportedConfig(f"brute force: layer {layer!r} has {n} neurons; pick one with at most 16")
    xa, ya = _attacker_set(data, params["attacker_fraction"], params["attacker_min"], seed)
    xu = data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed + 5))]
    xu = xu[:params["bf_unlabelled"]]
    xt, yt = data.x_test, data.y_test
    t0 = time.perf_counter()
    kw = dict(sigmas=params["bf_sigmas"], scales=params["bf_scales"], max_candidates=params["bf_max_candidates"])
    labelled = brute_force(model, layer, len(lp.neurons), stats[0], xa, ya, progress=progress, **kw)
    unlabelled = brute_force(model, layer, len(lp.neurons), stats[0], xu, None, **kw)
    secs = time.perf_counter() - t0
    true = tuple(sorted(lp.neurons))
    out = {"arch": params["bf_arch"], "layer": layer, "n": n, "k": len(lp.neurons), "candidates": len(labelled),
           "original": lk["original"], "authorized": lk["authorized"], "natural": lk["natural"], "seconds": secs,
           "attacker_images": len(ya)}
    for tag, ranked in (("labelled", labelled), ("unlabelled", unlabelled)):
        best = ranked[0]
        from chiplock.neuronlock import LayerPassword, Password

        guess = Password(layers=(LayerPassword(layer=layer, neurons=best["neurons"], values=best["values"],
                                               scale=1.0),))
        rank_true = next(i for i, r in enumerate(ranked) if tuple(sorted(r["neurons"])) == true)
        out[tag] = {"best_neurons": list(best["neurons"]), "best_acc": _acc(model, xt, yt, guess),
                    "true_neurons_found": tuple(sorted(best["neurons"])) == true, "rank_of_true_set": rank_true}
    out["true_neurons"] = list(true)
    return out


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides) -> AttackResult:
    """Every attack on neuron-locked models (see the module docstring).

    Args:
        preset: ``"smoke"`` (8x8 digits, SmallCNN width 8, seconds) or ``"paper"`` (MNIST-5000, SmallCNN and
            ResNet-18 width 16, a few minutes on one core).
        progress: ``progress(stage, done, total)``.
        **overrides: Any preset key: ``data``, ``archs``, ``width``, ``pretrain_epochs``, ``lock_epochs`` and
            ``lock_lr`` (each a number or ``{arch: value, "default": value}``), ``lock_mode`` (``mixed`` or
            ``alternate``),
            ``lock_unauth_weight``, ``gamma``, ``seed``, ``test_images``, ``calib_images``, ``ft_fractions``,
            ``ft_epochs``, ``ft_lr``, ``prune_ratios``, ``bf_arch``, ``bf_layer`` (the small layer the brute-force
            model is locked on), ``bf_sigmas``, ``bf_scales``, ``bf_max_candidates``, ``bf_unlabelled``,
            ``attacker_fraction`` (labelled data for fitting and scoring), ``attacker_min``,
            ``fit_steps``, ``fit_restarts``, ``wrong_keys``, ``det_batch``, ``det_batches``.

    Returns:
        An :class:`AttackResult` named ``neuronlock``.

    Raises:
        UnsupportedConfig: Unknown preset, setting, data set, architecture or layer; a brute force too large.

    Example:
        >>> run(preset="smoke").tables[0].rows
    """
    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    if any(not 0 < f <= 1 for f in params["ft_fractions"]) or not 0 < params["attacker_fraction"] <= 1:
        raise UnsupportedConfig("neuronlock attack: data fractions must be in (0, 1], e.g. ft_fractions=[0.01, 0.1]")
    if params["wrong_keys"] < 2 or params["det_batches"] < 2 or params["det_batch"] < 1:
        raise UnsupportedConfig("neuronlock attack: use wrong_keys >= 2, det_batches >= 2 and det_batch >= 1")
    from chiplock.softlock.pipeline import load_dataset

    data = load_dataset(params["data"])
    steps = 5 + len(params["ft_fractions"])
    total, done = steps * len(params["archs"]) + 1, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("neuronlock", done, total)

    archs = {arch: _attack_arch(arch, data, params, tick) for arch in params["archs"]}
    brute = _brute(data, params, None)
    tick()
    result = AttackResult(name="neuronlock", title="Attacks on neuron authorization locks (EdgePro)",
                          tables=_tables(archs, brute, params, data.num_classes),
                          data={"archs": archs, "brute_force": brute, "chance": 1 / data.num_classes},
                          notes=_notes(archs, brute, params, data.num_classes), params=params, plot=_plot)
    result.seconds = time.perf_counter() - t0
    return result


def _tables(archs: dict[str, Any], brute: dict[str, Any], params: dict[str, Any], classes: int) -> list[Table]:
    chance = 1 / classes
    rows = []
    for arch, r in archs.items():
        a = r["authorized"]
        rows.append(["lock", f"{arch}: authorized vs original {r['original']:.3f}", a, r["natural"],
                     "auth ≥ original − 0.01; natural ≤ chance + 0.05",
                     "met" if a >= r["original"] - 0.01 and r["natural"] <= chance + 0.05 else "missed"])
        rows.append(["wrong password", f"{arch}: {len(r['wrong_acc'])} random keys (max)", a, max(r["wrong_acc"]),
                     "≤ chance + 0.05", f"mean {np.mean(r['wrong_acc']):.3f}"])
        for f in r["fine_tune"]:
            rows.append(["fine-tune", f"{arch}: {f['fraction']:.0%} data ({f['images']} images), "
                         f"{params['ft_epochs']} epochs", a, f["fine_tuned"], f"≤ scratch {f['scratch']:.3f}",
                         f"Δ vs scratch {f['fine_tuned'] - f['scratch']:+.3f}"])
        for p in r["prune"]:
            rows.append(["prune", f"{arch}: global magnitude {p['ratio']:.0%}", p["authorized"], p["natural"],
                         "natural ≤ chance + 0.05", "authorized after pruning in the authorized column"])
        rows.append(["fold (neurons + values known)", f"{arch}: into the bias, no hooks", a, r["fold_known"],
                     "= authorized (a leaked password is a key)", f"max |Δlogit| {r['fold_max_logit_diff']:.1e}"])
        rows.append(["fold (random neurons)", f"{arch}: true values on other neurons", a, r["fold_random"],
                     "≤ chance + 0.05", ""])
        rows.append(["fit constants (neurons known)", f"{arch}: {r['attacker_images']} labelled images", a,
                     r["fit_known_neurons"], "≈ authorized if the neurons are the secret",
                     f"random neurons fitted the same: {r['fit_random_neurons']:.3f}"])
        best = max(r["find"].items(), key=lambda kv: kv[1]["precision"])
        rows.append(["find neurons", f"{arch}: best of {len(r['find'])} scores ({best[0]})", a, best[1]["precision"],
                     f"precision@k ≈ chance {best[1]['chance']:.3f}", f"AUC {best[1]['auc']:.3f}, "
                     f"{best[1]['direction']} scores"])
        d = r["detect"]["max-prob"]
        rows.append(["detect wrong password", f"{arch}: mean max-prob of {params['det_batch']} unlabelled images",
                     a, d["batch_auc"], "AUC 0.5 = undetectable", f"per image AUC {d['image_auc']:.3f}"])
    b = brute
    for tag in ("labelled", "unlabelled"):
        how = f"CE on {b['attacker_images']} labelled" if tag == "labelled" else "confidence on unlabelled"
        rows.append(["brute force", f"{b['arch']} {b['layer']}: C({b['n']},{b['k']}) × grid = {b['candidates']:,}, "
                     f"{how}", b["authorized"], b[tag]["best_acc"], "≪ authorized if the search fails",
                     f"true set found: {'yes' if b[tag]['true_neurons_found'] else 'no'} (rank "
                     f"{b[tag]['rank_of_true_set']})"])
    main = Table("Attacks on neuron-locked models", ["attack", "setting", "authorized acc",
                                                       "natural/recovered acc", "target/expectation", "note"], rows,
                 caption=f"Test accuracy on {params['data']} (chance {chance:.2f}). Authorized acc: the locked "
                         "model with the right password (for pruning: after pruning). Natural/recovered: what the "
                         "attacker gets without the password (find neurons: precision@k; detect: AUC).")
    find_rows = [[arch, name, v["precision"], v["chance"], v["auc"], v["direction"], v["k"], v["n"]]
                 for arch, r in archs.items() for name, v in r["find"].items()]
    find = Table("Finding the authorization neurons", ["model", "score", "precision@k", "chance", "AUC",
                                                        "direction", "k", "neurons"], find_rows,
                 caption="Per locked layer, the top-k neurons by the score (k = the password's count there), pooled "
                         "over layers; direction: high or low scores, whichever hits more (an upper bound).")
    space = Table("Password search space (neuron choices only)",
                  ["model", "locked layers", "authorization neurons", "log2 neuron choices"],
                  [[arch, len(r["password_layers"]), sum(p["k"] for p in r["password_layers"]), r["search_bits"]]
                   for arch, r in archs.items()])
    return [main, find, space]


def _notes(archs: dict[str, Any], brute: dict[str, Any], params: dict[str, Any], classes: int) -> list[str]:
    chance = 1 / classes
    notes = [f"Models: {', '.join(archs)} width {params['width']} on {params['data']}, pretrained "
             f"{params['pretrain_epochs']} epochs, lock-trained ({params['lock_mode']}, epochs "
             f"{params['lock_epochs']}, lr {params['lock_lr']}), gamma {params['gamma']}; the attacker's "
             f"labelled set is {params['attacker_fraction']:.0%} of the training split (at least "
             f"{params['attacker_min']} images)."]
    for arch, r in archs.items():
        ft = r["fine_tune"]
        beat = [f for f in ft if f["fine_tuned"] > f["scratch"] + 0.05]
        notes.append(f"{arch}: fine-tuning without the password "
                     + ("beats training from scratch by more than 0.05 at "
                        + ", ".join(f"{f['fraction']:.0%} ({f['fine_tuned']:.3f} vs {f['scratch']:.3f})" for f in beat)
                        + ": the locked weights still carry the features, so the lock does not protect the model "
                          "against an attacker with that much labelled data" if beat else
                        "does not beat training from scratch by more than 0.05 at any fraction") + ".")
        notes.append(f"{arch}: the password is a fixed set of constants, so whoever learns it once folds it into the "
                     f"weights (recovered {r['fold_known']:.3f} vs authorized {r['authorized']:.3f}) and it protects "
                     "nothing after that: binding it to the hardware key matters only while it stays inside the "
                     "device. Knowing only the neurons, fitting the constants on "
                     f"{r['attacker_images']} labelled images gives {r['fit_known_neurons']:.3f}"
                     + (" — the neurons alone are (nearly) the whole secret" if r["fit_known_neurons"]
                        >= r["authorized"] - 0.05 else "") + f"; with random neurons {r['fit_random_neurons']:.3f}.")
        d = r["detect"]["max-prob"]
        notes.append(f"{arch}: right vs wrong password from the mean max-probability of {params['det_batch']} "
                     f"unlabelled images: AUC {d['batch_auc']:.3f} (right {d['right_mean']:.3f}, wrong "
                     f"{d['wrong_mean']:.3f}); a locked model is an oracle that tells a guesser when the password "
                     "is right, so the password's strength is its search space, not its silence.")
        if max(r["wrong_acc"]) > chance + 0.05 or r["natural"] > chance + 0.05:
            notes.append(f"{arch}: unauthorized accuracy above chance + 0.05 (natural {r['natural']:.3f}, wrong "
                         f"passwords up to {max(r['wrong_acc']):.3f}): the lock training did not push every "
                         "unauthorized configuration to chance.")
    b = brute
    notes.append(f"Brute force on {b['arch']} locked only at {b['layer']} ({b['n']} neurons, k = {b['k']}): "
                 f"{b['candidates']:,} candidates in {b['seconds']:.0f} s (two scorings); the labelled scoring "
                 f"{'found' if b['labelled']['true_neurons_found'] else 'missed'} the true neurons (test accuracy "
                 f"{b['labelled']['best_acc']:.3f} vs authorized {b['authorized']:.3f}). The full passwords above "
                 "lock every layer; their neuron choices alone span the log2 sizes in the last table, beyond "
                 "brute force; whether the layers can be searched one at a time (a partial password giving "
                 "partial recovery) is not measured here.")
    return notes


def _plot(result: AttackResult, path: Path) -> None:
    archs = result.data["archs"]
    fig, axes = new_figure(3, width=4.2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for (arch, r), c in zip(archs.items(), colors):
        fr = [f["fraction"] for f in r["fine_tune"]]
        axes[0].plot(fr, [f["fine_tuned"] for f in r["fine_tune"]], "o-", color=c, label=f"{arch} fine-tuned")
        axes[0].plot(fr, [f["scratch"] for f in r["fine_tune"]], "s--", color=c, label=f"{arch} scratch")
        pr = [p["ratio"] for p in r["prune"]]
        axes[1].plot(pr, [p["authorized"] for p in r["prune"]], "o-", color=c, label=f"{arch} authorized")
        axes[1].plot(pr, [p["natural"] for p in r["prune"]], "x--", color=c, label=f"{arch} natural")
    for ax in axes[:2]:
        ax.axhline(result.data.get("chance", 0.1), color="gray", ls=":", lw=1, label="chance")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fraction of training data (no password)")
    axes[0].set_title("fine-tuning vs scratch", fontsize=9)
    axes[1].set_xlabel("global magnitude pruning ratio")
    axes[1].set_title("pruning", fontsize=9)
    names = list(SCORES)
    width = 0.8 / max(len(archs), 1)
    for i, ((arch, r), c) in enumerate(zip(archs.items(), colors)):
        axes[2].bar(np.arange(len(names)) + i * width, [r["find"][n]["precision"] for n in names], width, color=c,
                    label=arch)
        axes[2].axhline(r["find"][names[0]]["chance"], color=c, ls=":", lw=1)
    axes[2].set_xticks(np.arange(len(names)) + width * (len(archs) - 1) / 2)
    axes[2].set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    axes[2].set_ylim(0, 1.02)
    axes[2].set_ylabel("precision@k (dotted: chance)")
    axes[2].set_title("finding the authorization neurons", fontsize=9)
    axes[2].legend(fontsize=6)
    save_figure(fig, path)


__all__ = ["PRESETS", "SCORES", "brute_force", "constants", "detection_stats", "fit_constants", "fold_password",
           "neuron_scores", "precision_at_k", "prune_global", "run"]
