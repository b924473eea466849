"""The noise attack on a soft lock (Clifford et al., SaTML 2025, Figure 5).

The attacker adds Gaussian noise ``N(0, (s * std(W))**2)`` to every parameter tensor ``W`` of a soft-locked model
(conv and linear weights, biases, BatchNorm affine parameters; BatchNorm running statistics are buffers and stay
untouched), hoping to knock the weights off the carefully tuned point that fails in the unauthorized
configuration while staying close enough to the original to keep working. For each pair of
:mod:`chiplock.attacks.softmodels` and each relative scale ``s`` (several noise seeds), the authorized and the
unauthorized accuracy are measured; for a float format the unauthorized configuration is also run as it is
deployed in practice (per-channel amax scaling, ``e4m3fn@channel``). The headline is the best unauthorized accuracy
any ``s`` and seed reached, against the locked model's authorized accuracy. The paper calls noise "partially
effective depending on hyperparameters"; this attack states what it measures.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chiplock.attacks.result import (
    AttackResult,
    Progress,
    Table,
    new_figure,
    resolve,
    save_figure,
)
from chiplock.errors import UnsupportedConfig

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"pairs": ["fp32->e4m3fn", "dense->2:4"], "data": "digits8", "width": 8, "pretrain_epochs": 3,
              "lock_epochs": 2, "cache": None, "seed": 0, "scales": [0.0, 0.05, 0.2, 1.0], "seeds": 2,
              "references": ["std"], "deployed": True, "test_images": None, "mechanisms": ["auto"]},
    "paper": {"pairs": ["fp32->e4m3fn", "dense->2:4"], "data": "mnist5000", "width": 16, "pretrain_epochs": 8,
              "lock_epochs": 3, "cache": None, "seed": 0,
              "scales": [0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 1.0], "seeds": 2,
              "references": ["std", "mad"], "deployed": True, "test_images": 400, "mechanisms": ["auto", "none"]},
}

PAPER_CLAIM = "partially effective, depending on hyperparameters"


REFERENCES = ("std", "mad")


def tensor_scale(p: torch.Tensor, reference: str = "std") -> torch.Tensor:
    """The scale noise is relative to: ``std`` (the paper's: the tensor's population standard deviation) or
    ``mad`` (1.4826 x the median absolute deviation, which a few huge weights such as decoys do not inflate;
    the standard deviation where the MAD is zero)."""
    x = p.detach().float().reshape(-1)
    sd = x.std(correction=0)
    if reference == "std":
        return sd
    if reference != "mad":
        raise UnsupportedConfig(f"noise reference {reference!r}: use {' or '.join(REFERENCES)}")
    mad = 1.4826 * (x - x.median()).abs().median()
    return mad if mad > 0 else sd


def add_noise(model: nn.Module, scale: float, *, seed: int = 0, reference: str = "std") -> nn.Module:
    """A copy of ``model`` with ``N(0, (scale * sd(p))**2)`` added to every floating-point parameter ``p``.

    ``sd(p)`` is :func:`tensor_scale` (each tensor's own standard deviation by default); single-element tensors
    and buffers (BatchNorm running statistics) are left as they are. ``model`` is not changed.

    Raises:
        UnsupportedConfig: A negative or non-finite ``scale``, or an unknown ``reference``.

    Example:
        >>> noisy = add_noise(locked, 0.05, seed=1)
    """
    if not scale >= 0 or scale == float("inf"):
        raise UnsupportedConfig(f"noise scale {scale}: use a finite relative scale >= 0, e.g. 0.05")
    if reference not in REFERENCES:
        raise UnsupportedConfig(f"noise reference {reference!r}: use {' or '.join(REFERENCES)}")
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if not p.is_floating_point() or p.numel() < 2:
                continue
            sd = tensor_scale(p, reference)
            p.add_((torch.randn(p.shape, generator=gen) * (scale * sd)).to(p.dtype))
    return out


def _deployed_config(unauthorized: str) -> str | None:
    """The float format's standard deployment (per-channel amax scaling), or ``None`` for other families."""
    from chiplock.softlock import parse_config
    from chiplock.softlock.minifloat import MiniFloat

    return f"{unauthorized}@channel" if isinstance(parse_config(unauthorized), MiniFloat) else None


def _sweep(model: nn.Module, data, info: dict[str, Any], params: dict[str, Any], tick) -> list[dict[str, Any]]:
    from chiplock.softlock.train import evaluate_configs

    a, u = info["authorized"], info["unauthorized"]
    dep = _deployed_config(u) if params["deployed"] else None
    configs = [a, u] + ([dep] if dep else [])
    n = params["test_images"] or len(data.y_test)
    x, y = data.x_test[:n], data.y_test[:n]
    rows = []
    for ref in params["references"]:
        for s in params["scales"]:
            # Zero noise is the same model whatever the seed or reference: measured once.
            if s == 0 and ref != params["references"][0]:
                continue
            for k in range(1 if s == 0 else params["seeds"]):
                noisy = add_noise(model, float(s), seed=params["seed"] * 1000 + k, reference=ref)
                acc = evaluate_configs(noisy, x, y, configs)
                rows.append({"reference": ref, "scale": float(s), "seed": k, "authorized": acc[a],
                             "unauthorized": acc[u], "deployed": acc[dep] if dep else None})
                tick()
    return rows


def _stats(vals: list[float]) -> tuple[float, float, float]:
    return statistics.fmean(vals), statistics.pstdev(vals), max(vals)


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides) -> AttackResult:
    """The noise sweep on each soft-locked pair.

    Args:
        preset: ``"smoke"`` (8x8 digits, width 8, seconds) or ``"paper"`` (MNIST-5000, width 16).
        progress: ``progress(stage, done, total)``.
        **overrides: Any preset key: ``pairs``, ``data``, ``width``, ``pretrain_epochs``, ``lock_epochs``,
            ``cache`` (folder for the models, shared with ``retrain``), ``seed``, ``scales`` (relative noise
            scales ``s``), ``seeds`` (noise draws per nonzero ``s``), ``references`` (``std``: the paper's noise
            relative to each tensor's standard deviation; ``mad``: relative to its median absolute deviation),
            ``deployed`` (also run a float format with per-channel amax scaling), ``test_images`` (the sweep's
            accuracies on the first this many test images; ``None``: all), ``mechanisms`` (lock mechanisms to
            attack, ``SoftLockConfig.levers``: ``auto`` is the project's default, decoys; ``none`` the paper's
            plain lock loss, labelled ``pair [none]``).

    Returns:
        An :class:`AttackResult` named ``noise``.

    Raises:
        UnsupportedConfig: Unknown preset, setting, pair, data set, mechanism or reference; a negative scale or
            ``seeds`` below 1.

    Example:
        >>> run(preset="smoke").tables[0].rows
    """
    from chiplock.attacks.softmodels import locked_model

    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    if params["seeds"] < 1 or not params["scales"] or any(not float(s) >= 0 for s in params["scales"]):
        raise UnsupportedConfig("noise: give seeds >= 1 and relative scales >= 0, e.g. scales=[0, 0.05, 0.2]")
    if params["test_images"] is not None and params["test_images"] < 1:
        raise UnsupportedConfig("noise: test_images must be >= 1 (or None for the whole test split)")
    if not params["references"] or any(r not in REFERENCES for r in params["references"]):
        raise UnsupportedConfig(f"noise: references must be a non-empty list of {', '.join(REFERENCES)}")
    cache = Path(params["cache"]) if params["cache"] else None
    nonzero = sum(1 for s in params["scales"] if s > 0)
    per_pair = (len(params["scales"]) > nonzero) + nonzero * params["seeds"] * len(params["references"])
    total, done = per_pair * len(params["pairs"]) * len(params["mechanisms"]), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("noise", done, total)

    results: dict[str, Any] = {}
    for pair in params["pairs"]:
        for mech in params["mechanisms"]:
            model, data, info = locked_model(pair, data=params["data"], width=params["width"],
                                             pretrain_epochs=params["pretrain_epochs"],
                                             lock_epochs=params["lock_epochs"], cache=cache, seed=params["seed"],
                                             mechanism=mech)
            t = time.perf_counter()
            rows = _sweep(model, data, info, params, tick)
            label = pair if mech == "auto" else f"{pair} [{mech}]"
            results[label] = {"model": info, "rows": rows, "sweep_seconds": time.perf_counter() - t}
    result = AttackResult(name="noise", title="Noise attack on soft locks (Figure 5)", tables=_tables(results),
                          data={"pairs": results}, notes=_notes(results, params), params=params, plot=_plot)
    result.seconds = time.perf_counter() - t0
    return result


def _unauth(r: dict[str, Any]) -> float:
    """The attacker's unauthorized accuracy: the naive configuration or its deployment, whichever is higher."""
    return max(r["unauthorized"], r["deployed"] or 0.0)


def _tables(results: dict[str, Any]) -> list[Table]:
    head, sweep = [], []
    for pair, res in results.items():
        info, rows = res["model"], res["rows"]
        refs = list(dict.fromkeys(r["reference"] for r in rows))
        for ref in refs:
            at_ref = [r for r in rows if r["reference"] == ref or r["scale"] == 0]
            b = max(at_ref, key=_unauth)
            zero = next((r for r in rows if r["scale"] == 0), None)
            la, lu = (zero["authorized"], _unauth(zero)) if zero else (info["locked_authorized"], None)
            head.append([pair, ", ".join(info["mechanism"]), ref, la, lu, _unauth(b), b["scale"], b["authorized"],
                         la - _unauth(b), PAPER_CLAIM])
            for s in dict.fromkeys(r["scale"] for r in at_ref):
                at = [r for r in at_ref if r["scale"] == s]
                am, asd, _ = _stats([r["authorized"] for r in at])
                um, _, umax = _stats([r["unauthorized"] for r in at])
                dep = [r["deployed"] for r in at if r["deployed"] is not None]
                dm, dmax = (_stats(dep)[0], max(dep)) if dep else (None, None)
                sweep.append([pair, ref, s, len(at), am, asd, um, umax, dm, dmax])
    return [Table("Noise attack: the best unauthorized accuracy any noise level reached",
                  ["pair", "mechanism", "noise sd ∝", "locked auth", "locked unauth", "best unauth under noise",
                   "at s", "auth at that s", "Δlock left", "paper"], head,
                  caption="Accuracies on the sweep's test images (locked = s = 0). Unauthorized = the naive "
                          "configuration or, for a float format, its per-channel amax deployment, whichever is "
                          "higher. Δlock left = locked authorized accuracy minus the best "
                          "unauthorized accuracy under noise. Noise sd ∝ std: the paper's noise (s × the tensor's "
                          "standard deviation); mad: s × 1.4826 × its median absolute deviation."),
            Table("Noise sweep: accuracy vs relative noise scale s",
                  ["pair", "noise sd ∝", "s", "draws", "auth mean", "auth sd", "unauth mean", "unauth max",
                   "deployed mean", "deployed max"], sweep)]


def _notes(results: dict[str, Any], params: dict[str, Any]) -> list[str]:
    notes = [(f"Noise N(0, (s·sd(W))²) on every parameter tensor W (BatchNorm running statistics untouched), s in "
             f"{params['scales']}, {params['seeds']} draws per s > 0, sd = "
             f"{' and '.join(params['references'])}; ResNet-18 width {params['width']} on {params['data']}, "
             f"accuracy on {'the first ' + str(params['test_images']) if params['test_images'] else 'all'} "
             "images of the held-out test split.")]
    for pair, res in results.items():
        info, rows = res["model"], res["rows"]
        b = max(rows, key=_unauth)
        recovered = _unauth(b) / max(info["original_authorized"], 1e-9)
        verdict = ("the lock holds against noise" if recovered < 0.5 else
                   "noise partially recovers the unauthorized configuration" if recovered < 0.9 else
                   "noise breaks the lock")
        if info["locked_authorized"] < info["original_authorized"] - 0.1:
            verdict += (f" (but lock training itself failed: authorized {info['locked_authorized']:.3f} vs "
                        f"{info['original_authorized']:.3f} before locking)")
        notes.append(f"{pair}: best unauthorized accuracy under any noise {_unauth(b):.3f} (s = {b['scale']}, "
                     f"sd ∝ {b['reference']}, authorized there {b['authorized']:.3f}) vs locked authorized "
                     f"{info['locked_authorized']:.3f} and original {info['original_authorized']:.3f} "
                     f"({recovered:.0%} of the original): {verdict}. Paper: {PAPER_CLAIM}.")
        fragile = False
        for ref in dict.fromkeys(r["reference"] for r in rows):
            # The largest s that keeps the authorized configuration within 5 points of the locked model.
            ok = [s for s in params["scales"] if s > 0 and statistics.fmean(
                r["authorized"] for r in rows if r["reference"] == ref and r["scale"] == s)
                >= info["locked_authorized"] - 0.05]
            nonzero = sorted(s for s in params["scales"] if s > 0)
            if not nonzero:
                continue

            def auth_at(s: float, ref: str = ref, rows: list = rows) -> float:
                return statistics.fmean(r["authorized"] for r in rows if r["reference"] == ref and r["scale"] == s)

            kept = (f"stays within 0.05 of the locked model up to s = {max(ok)}" if ok else
                    f"is {auth_at(nonzero[0]):.3f} already at the smallest s = {nonzero[0]}")
            notes.append(f"{pair}, sd ∝ {ref}: the authorized accuracy {kept}, and {auth_at(nonzero[-1]):.3f} at "
                         f"s = {nonzero[-1]}.")
            fragile = fragile or ("decoys" in info["mechanism"] and not ok)
        if fragile:
            notes.append(f"{pair}: decoy cancellation needs its copied channels bit-identical and its large "
                         "cancelling weights exact; noise on either breaks the cancellation in fp32 too, so any "
                         "noise that could move the unauthorized configuration destroys the authorized one first.")
    return notes


def _plot(result: AttackResult, path: Path) -> None:
    pairs = result.data["pairs"]
    fig, axes = new_figure(len(pairs), width=4.2)
    scales = [s for s in result.params["scales"] if s > 0]
    floor = min(scales) / 2 if scales else 1e-3
    styles = {"std": "-", "mad": "--"}
    for ax, (pair, res) in zip(axes, pairs.items()):
        rows = res["rows"]
        for ref in dict.fromkeys(r["reference"] for r in rows):
            at_ref = [r for r in rows if r["reference"] == ref or r["scale"] == 0]
            xs = sorted(dict.fromkeys(r["scale"] for r in at_ref))
            px = [x if x > 0 else floor for x in xs]
            for key, label, color in (("authorized", "authorized", "tab:green"),
                                      ("unauthorized", "unauthorized (naive)", "tab:red"),
                                      ("deployed", "unauthorized (amax per channel)", "tab:orange")):
                vals = [[r[key] for r in at_ref if r["scale"] == x and r[key] is not None] for x in xs]
                if not all(vals):
                    continue
                ax.plot(px, [statistics.fmean(v) for v in vals], "o" + styles.get(ref, "-"), color=color, ms=3,
                        label=f"{label}, sd ∝ {ref}")
                ax.fill_between(px, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.12)
        ax.axhline(1 / 10, color="gray", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel(f"relative noise scale s (s = 0 drawn at {floor:g})")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(pair if "[" in pair else f"{pair} [{', '.join(res['model']['mechanism'])}]", fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


__all__ = ["PRESETS", "REFERENCES", "add_noise", "run", "tensor_scale"]
