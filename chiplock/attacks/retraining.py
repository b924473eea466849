"""The retraining attack on a soft lock, priced in compute (Clifford et al., SaTML 2025, Figures 3-4).

An attacker with the locked file and some labelled data fine-tunes the locked model in the unauthorized
configuration (:func:`chiplock.softlock.retrain.retrain_attack`, straight-through through the format) with 1 %,
10 % and 100 % of the training data, starting from the format's standard deployment (per-channel amax scaling for
FP8, SparseGPT for 2:4, then BatchNorm re-estimation). The alternative that needs no locked file at all is to train
the same architecture from scratch with the same data, epochs and batch size; both are measured, with their
compute (optimizer steps, seconds), beside the compute that trained the original. The paper: retraining costs
about as much as training, and may not recover the accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
              "lock_epochs": 2, "cache": None, "seed": 0, "fractions": [0.1, 0.5], "epochs": 1, "lr": 1e-3,
              "start": "standard"},
    "paper": {"pairs": ["fp32->e4m3fn", "dense->2:4"], "data": "mnist5000", "width": 16, "pretrain_epochs": 8,
              "lock_epochs": 3, "cache": None, "seed": 0, "fractions": [0.01, 0.1, 1.0], "epochs": 5, "lr": 1e-3,
              "start": "standard"},
}

#: ``start="standard"``: the deployment chain each family's retraining starts from (``"naive"``: none).
STANDARD_START: dict[str, tuple[str, ...]] = {"quantisation": ("amax-channel", "bn-reestimate"),
                                              "sparsity": ("sparsegpt", "bn-reestimate")}
STARTS = ("standard", "naive")
PAPER_CLAIM = "costs about as much as training; may not recover"


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides) -> AttackResult:
    """Retrain each soft-locked pair with each data fraction, against training from scratch.

    Args:
        preset: ``"smoke"`` (8x8 digits, width 8, two fractions, one epoch) or ``"paper"`` (MNIST-5000, width 16,
            1/10/100 %, five epochs).
        progress: ``progress(stage, done, total)``, once per (pair, fraction).
        **overrides: Any preset key: ``pairs``, ``data``, ``width``, ``pretrain_epochs``, ``lock_epochs``,
            ``cache`` (folder for the models, shared with ``noise``), ``seed``, ``fractions`` (of the labelled
            training data), ``epochs`` (of both retraining and the from-scratch baseline), ``lr`` (fine-tuning
            learning rate; from scratch uses 2e-3), ``start`` (``standard``: retrain from the family's standard
            deployment, :data:`STANDARD_START`; ``naive``: from the plain cast).

    Returns:
        An :class:`AttackResult` named ``retrain``.

    Raises:
        UnsupportedConfig: Unknown preset, setting, pair, data set or start; fractions outside (0, 1]; epochs
            below 1.

    Example:
        >>> [r[:4] for r in run(preset="smoke").tables[1].rows]
    """
    from chiplock.attacks.softmodels import locked_model
    from chiplock.softlock.retrain import retrain_attack

    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    if params["start"] not in STARTS:
        raise UnsupportedConfig(f"retrain: start={params['start']!r}; use {' or '.join(STARTS)}")
    if not params["fractions"] or any(not 0 < float(f) <= 1 for f in params["fractions"]) or params["epochs"] < 1:
        raise UnsupportedConfig("retrain: give data fractions in (0, 1] (e.g. [0.01, 0.1, 1.0]) and epochs >= 1")
    cache = Path(params["cache"]) if params["cache"] else None
    total, done = len(params["pairs"]) * len(params["fractions"]), 0
    results: dict[str, Any] = {}
    for pair in params["pairs"]:
        model, data, info = locked_model(pair, data=params["data"], width=params["width"],
                                         pretrain_epochs=params["pretrain_epochs"],
                                         lock_epochs=params["lock_epochs"], cache=cache, seed=params["seed"])
        chain = STANDARD_START[info["family"]] if params["start"] == "standard" else ()

        def on_row(row, pair=pair) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"retrain {pair}", done, total)

        t = time.perf_counter()
        rr = retrain_attack(model, info["unauthorized"], data.x_train, data.y_train, data.x_test, data.y_test,
                            fractions=[float(f) for f in params["fractions"]], epochs=params["epochs"],
                            lr=params["lr"], seed=params["seed"], pre_steps=chain, authorized=info["authorized"],
                            calib_x=data.x_train[:256], on_row=on_row)
        results[pair] = {"model": info, "retrain": rr.to_dict(), "seconds": time.perf_counter() - t}
    result = AttackResult(name="retrain", title="Retraining attack on soft locks (Figures 3-4)",
                          tables=_tables(results), data={"pairs": results}, notes=_notes(results, params),
                          params=params, plot=_plot)
    result.seconds = time.perf_counter() - t0
    return result


def _tables(results: dict[str, Any]) -> list[Table]:
    head, rows = [], []
    for pair, res in results.items():
        info, rr = res["model"], res["retrain"]
        best = max(rr["rows"], key=lambda r: r["unauthorized_accuracy"])
        full = max(rr["rows"], key=lambda r: r["fraction"])
        head.append([pair, ", ".join(info["mechanism"]), " + ".join(rr["pre_steps"]) or "naive cast",
                     rr["config"], info["locked_authorized"], rr["locked_unauthorized_accuracy"],
                     best["unauthorized_accuracy"], f"{best['fraction']:.0%}", best["scratch_accuracy"],
                     full["steps"] / max(info.get("pretrain_steps") or 1, 1), PAPER_CLAIM])
        for r in rr["rows"]:
            rows.append([pair, f"{r['fraction']:.0%}", r["samples"], r["steps"], r["unauthorized_accuracy"],
                         r["authorized_accuracy"], r["scratch_accuracy"], r["retrain_seconds"],
                         r["scratch_seconds"], r["unauthorized_accuracy"] < r["scratch_accuracy"]])
    return [Table("Retraining attack: the best the attacker recovered, and at what compute",
                  ["pair", "mechanism", "retrained from", "runs on", "locked auth", "unauth before retraining",
                   "best retrained unauth", "with data", "scratch (same data)", "full-data steps / original's",
                   "paper"], head,
                  caption="full-data steps / original's: optimizer steps of the 100 % retraining divided by the "
                          "steps that pre-trained the original (same batch size)."),
            Table("Retraining vs training from scratch, per data fraction",
                  ["pair", "data", "samples", "steps (each)", "retrained unauth", "retrained auth", "scratch",
                   "retrain s", "scratch s", "retrain below scratch"], rows,
                  caption="Both trainings run the same optimizer steps (same data, epochs, batch size 64) in the "
                          "unauthorized configuration; the scratch baseline needs no locked file.")]


def _notes(results: dict[str, Any], params: dict[str, Any]) -> list[str]:
    notes = [(f"ResNet-18 width {params['width']} on {params['data']}, {params['epochs']} epochs of Adam (lr "
             f"{params['lr']} fine-tuning, 2e-3 from scratch), batch 64; retraining starts from "
             f"{'the standard deployment' if params['start'] == 'standard' else 'the naive cast'}.")]
    for pair, res in results.items():
        info, rr = res["model"], res["retrain"]
        for r in rr["rows"]:
            gap = r["unauthorized_accuracy"] - r["scratch_accuracy"]
            notes.append(f"{pair}, {r['fraction']:.0%} of the data ({r['samples']} images, {r['steps']} steps, "
                         f"{r['retrain_seconds']:.0f} s): retraining reaches {r['unauthorized_accuracy']:.3f} "
                         f"unauthorized vs {r['scratch_accuracy']:.3f} from scratch "
                         f"({'worse' if gap < 0 else 'better'} by {abs(gap):.3f}); the locked model's authorized "
                         f"accuracy is {info['locked_authorized']:.3f}.")
        gain = max(r["unauthorized_accuracy"] - r["scratch_accuracy"] for r in rr["rows"])
        full = max(rr["rows"], key=lambda r: r["fraction"])
        cost = (f"; the full-data retraining took {full['steps']} steps, "
                f"{full['steps'] / info['pretrain_steps']:.2f}x the {info['pretrain_steps']} that trained the "
                "original" if info.get("pretrain_steps") else "")
        notes.append(f"{pair}: the locked file is worth at most {gain:+.3f} accuracy over training from scratch "
                     f"with the same data and compute ({'a head start' if gain > 0.05 else 'no real head start'})"
                     f"{cost}. Paper: {PAPER_CLAIM}.")
    return notes


def _plot(result: AttackResult, path: Path) -> None:
    pairs = result.data["pairs"]
    fig, axes = new_figure(len(pairs))
    for ax, (pair, res) in zip(axes, pairs.items()):
        rows = sorted(res["retrain"]["rows"], key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        ax.plot(steps, [r["unauthorized_accuracy"] for r in rows], "o-", color="tab:red",
                label="retrained locked model (unauthorized)")
        ax.plot(steps, [r["scratch_accuracy"] for r in rows], "s--", color="tab:blue", label="from scratch")
        for r in rows:
            ax.annotate(f"{r['fraction']:.0%}", (r["steps"], r["unauthorized_accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        info = res["model"]
        ax.axhline(info["locked_authorized"], color="tab:green", ls=":", label="locked, authorized")
        if info.get("pretrain_steps"):
            ax.axvline(info["pretrain_steps"], color="gray", ls="-.", lw=1, label="original's training steps")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps (batch 64)")
        ax.set_ylabel("test accuracy, unauthorized configuration")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{pair} (retrained on {res['retrain']['config']})", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


__all__ = ["PRESETS", "STANDARD_START", "run"]
