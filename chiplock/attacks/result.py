"""What every attack of the harness returns (``chiplock attack ...``, ``make paper``): tables, raw data, a plot.

An attack module (:mod:`chiplock.attacks.crack`, ``noise``, ...) exposes ``run(*, preset="paper", progress=None,
**overrides) -> AttackResult`` and ``PRESETS`` (``"smoke"``: seconds, for the test suite; ``"paper"``: the
settings behind docs/results.md). :meth:`AttackResult.save` writes ``<name>.json``, ``<name>.md`` and, when the
attack draws one, ``<name>.png``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: ``progress(stage, done, total)``, as elsewhere in chiplock.
Progress = Callable[[str, int, int], None]


def machine() -> dict[str, Any]:
    """Public facts about the machine a number was measured on (CPU model, cores, library versions, GPU)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        load = [round(x, 1) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_avg": load,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def describe_machine(m: dict[str, Any]) -> str:
    """One line: ``AMD EPYC ..., 2 cores, no GPU, torch 2.13.0 (1 thread), load 2.1``."""
    gpu = m.get("gpu") or "no GPU"
    load = f", load {m['load_avg'][0]}" if m.get("load_avg") else ""
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {gpu}, torch {m.get('torch')} "
            f"({m.get('torch_threads')} thread{'s' if m.get('torch_threads') != 1 else ''}){load}")


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures (scientific when tiny or huge), None as '—'."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.{max(digits - 1, 0)}e}"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v).replace("|", "\\|")


@dataclass
class Table:
    """One Markdown table: a title, column names and rows of cells (numbers are formatted by :func:`fmt`)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        for r in self.rows:
            if len(r) != len(self.columns):
                raise ValueError(f"table {self.title!r}: a row has {len(r)} cells for {len(self.columns)} columns")

    def to_markdown(self, level: int = 3) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "caption": self.caption}


@dataclass
class AttackResult:
    """The outcome of one attack run.

    Attributes:
        name: The attack (``crack``, ``enumerate``, ...): the file stem of what :meth:`save` writes.
        title: A heading for the report.
        tables: The results, as tables (the first is the headline).
        data: Raw measurements (JSON-serialisable) for anyone who wants more than the tables.
        notes: Sentences stating what the numbers mean, including where a lock is weak.
        params: The settings the attack ran with (the preset plus overrides).
        seconds: Wall time of the run.
        machine: :func:`machine` at the end of the run.
        plot: Draws the figure: ``plot(result, path)``; ``None`` when the attack has none.
    """

    name: str
    title: str
    tables: list[Table]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=machine)
    plot: Callable[[AttackResult, Path], None] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "tables": [t.to_json() for t in self.tables],
                "data": self.data, "notes": self.notes, "params": self.params, "seconds": self.seconds,
                "machine": self.machine}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AttackResult:
        """The result :meth:`to_json` wrote (without its plot function: the PNG, if any, is already on disk)."""
        return cls(name=d["name"], title=d["title"], tables=[Table(**t) for t in d["tables"]], data=d["data"],
                   notes=d["notes"], params=d["params"], seconds=d["seconds"], machine=d["machine"])

    def to_markdown(self, level: int = 2, figure: str | None = None) -> str:
        """The report section: heading, machine and run time, tables, figure (when ``figure`` names it), notes."""
        out = [f"{'#' * level} {self.title}", "",
               f"Measured on {describe_machine(self.machine)}, {self.machine.get('date')}; "
               f"run time {self.seconds:.0f} s.", ""]
        out += [t.to_markdown(level + 1) for t in self.tables]
        if figure:
            out += [f"![{self.title}]({figure})", ""]
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``<name>.json``, ``<name>.md`` and (with a plot) ``<name>.png`` into the folder ``out``."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / f"{self.name}.json", "md": folder / f"{self.name}.md"}
        png = None
        if self.plot is not None:
            png = folder / f"{self.name}.png"
            self.plot(self, png)
            paths["png"] = png
        paths["json"].write_text(json.dumps(self.to_json(), indent=1, default=_jsonable) + "\n")
        paths["md"].write_text(self.to_markdown(figure=png.name if png else None))
        return paths


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def resolve(presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's settings with ``overrides`` applied (``None`` values ignored).

    Raises:
        UnsupportedConfig: Unknown preset or an override the preset does not have.
    """
    from chiplock.errors import UnsupportedConfig

    if preset not in presets:
        raise UnsupportedConfig(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    params = dict(presets[preset])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise UnsupportedConfig(f"unknown setting(s) {', '.join(unknown)}; this attack takes {', '.join(params)}")
    params.update({k: _coerce(k, params[k], v) for k, v in overrides.items() if v is not None})
    return params


def _coerce(key: str, default: Any, value: Any) -> Any:
    """``value`` in the type of the preset's ``default``: a scalar or a comma-separated string becomes a list where
    the preset has a list (``--set bits=8`` or ``bits=6,8``); a value of another kind is refused."""
    from chiplock.errors import UnsupportedConfig

    def bad(kind: str) -> UnsupportedConfig:
        return UnsupportedConfig(f"setting {key} takes {kind} (the preset has {default!r}), got {value!r}; "
                                 f"e.g. --set '{key}={json.dumps(default)}'")

    if default is None:
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
            value = [_json_or_text(v) for v in items]
        elif not isinstance(value, list):
            value = [value]
        kinds = {type(d) for d in default}
        if len(kinds) == 1 and kinds <= {int, float, str}:
            # Each item in the type of the preset's items (``bits=6,abc`` is refused here, not deep in the run).
            try:
                return [str(v) if kinds == {str} and isinstance(v, (int, float)) and not isinstance(v, bool)
                        else _coerce(key, default[0], v) for v in value]
            except UnsupportedConfig:
                kind = {int: "whole numbers", float: "numbers", str: "strings"}[kinds.pop()]
                raise UnsupportedConfig(f"setting {key} takes a list of {kind} (the preset has {default!r}), got "
                                        f"{value!r}; e.g. --set '{key}={json.dumps(default)}'") from None
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad("a whole number")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")
    return value


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def new_figure(ncols: int = 1, *, width: float = 5.0, height: float = 3.6):
    """A matplotlib figure on the Agg backend (no display needed): ``fig, axes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
