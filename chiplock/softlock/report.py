"""The paper-style evaluation: ``Acc_authorized^locked (Δorig, Δlock)`` plus accuracy per configuration."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from chiplock._io import atomic_write_bytes
from chiplock.softlock.registry import parse_config
from chiplock.softlock.train import evaluate_configs


@dataclass(frozen=True)
class LockRow:
    """One ``authorized -> unauthorized`` row: Δorig = original − locked authorized accuracy, Δlock = locked
    authorized − locked unauthorized accuracy."""

    authorized: str
    unauthorized: str
    acc_authorized: float
    delta_orig: Optional[float]
    delta_lock: float

    def cell(self) -> str:
        d = "n/a" if self.delta_orig is None else f"{self.delta_orig:+.2f}"
        return f"{self.acc_authorized:.2f} ({d}, {self.delta_lock:.2f})"


@dataclass
class LockReport:
    """Accuracies of the locked (and optionally original) model on every configuration, and the lock rows."""

    configs: list[str]
    locked: dict[str, float]
    original: Optional[dict[str, float]]
    rows: list[LockRow] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        lines = ["| Authorized -> Unauthorized | Acc_authorized^locked (Δorig, Δlock) |", "|---|---|"]
        lines += [f"| {r.authorized} -> {r.unauthorized} | {r.cell()} |" for r in self.rows]
        lines += ["", "| Configuration | original | locked |", "|---|---|---|"]
        for c in self.configs:
            o = "" if self.original is None else f"{self.original[c]:.3f}"
            lines.append(f"| {c} | {o} | {self.locked[c]:.3f} |")
        return "\n".join(lines) + "\n"


def build_report(locked: nn.Module, x: torch.Tensor, y: torch.Tensor, *, authorized: Any, unauthorized,
                 configs=(), original: Optional[nn.Module] = None, info: Optional[dict] = None) -> LockReport:
    """Evaluate ``locked`` (and ``original``) on every configuration and compute the lock rows.

    Args:
        locked: The locked model.
        x, y: Held-out images and labels.
        authorized: The authorized configuration (or name).
        unauthorized: The unauthorized configurations (or names); one row each.
        configs: Extra configurations to report accuracy on.
        original: The model before locking, for Δorig (``None`` leaves Δorig empty).
        info: Free-form facts stored with the report.

    Returns:
        A :class:`LockReport`.

    Example:
        >>> build_report(locked, d.x_test, d.y_test, authorized="fp16", unauthorized=["int8"], original=orig)
    """
    a = parse_config(authorized).name
    us = [parse_config(u).name for u in unauthorized]
    names = list(dict.fromkeys([a, *us, *(parse_config(c).name for c in configs)]))
    acc_l = evaluate_configs(locked, x, y, names)
    acc_o = evaluate_configs(original, x, y, names) if original is not None else None
    rows = [LockRow(a, u, acc_l[a], None if acc_o is None else acc_o[a] - acc_l[a], acc_l[a] - acc_l[u])
            for u in us]
    return LockReport(names, acc_l, acc_o, rows, dict(info or {}))


def write_report(report: LockReport, out_dir: str | os.PathLike, *, stem: str = "softlock_eval") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (accuracy per configuration) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    atomic_write_bytes(paths[0], report.to_json().encode())
    atomic_write_bytes(paths[1], report.to_markdown().encode())
    atomic_write_bytes(paths[2], _plot(report))
    return paths


def _plot(report: LockReport) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.configs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * n + 1), 3.2), dpi=120)
    xs = range(n)
    w = 0.38
    if report.original is not None:
        ax.bar([i - w / 2 for i in xs], [report.original[c] for c in report.configs], w, label="original")
    ax.bar([i + (w / 2 if report.original is not None else 0) for i in xs],
           [report.locked[c] for c in report.configs], w, label="locked")
    ax.set_xticks(list(xs), report.configs, rotation=20)
    ax.set_ylim(0, 1)
    ax.axhline(0.1, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylabel("test accuracy")
    ax.set_title("Soft lock: accuracy per configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
