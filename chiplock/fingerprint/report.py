"""Fingerprint report: entropy, bit-error rate, reproduction rate and time per source, as Markdown + PNG.

For each source the report enrolls once, then measures ``trials`` more times on this device:

* **reproduction rate**: how many single measurements give back exactly the enrolled material (for noisy
  sources a single decode, without the clock source's retry, so the figure is conservative);
* **bit-error rate**: for sources with raw bits (clock, sram), each trial's bits against the per-bit majority of
  all trials; for precision, the share of probes whose digest differs from the first trial's;
* **entropy**: the source's own claim (after helper leakage) and the SP 800-90B estimates it rests on;
* **time** per measurement (median and maximum).

The per-bit reliability map (PNG) shows each bit's flip rate. For precision the report also states what its
entropy rests on: the configurations software can reach on this kind of machine, either the documented
measurement behind :data:`~chiplock.fingerprint.precision.PRECISION_ENTROPY_BITS` or, when asked
(``--enumerate``), a fresh enumeration here (:mod:`chiplock.fingerprint.configurations`, a few minutes). Nothing
here writes key material, raw bits, probe digests or configuration facts.
"""

from __future__ import annotations

import hmac
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from chiplock.errors import FingerprintError
from chiplock.fingerprint.base import get_source
from chiplock.fingerprint.entropy import bit_error_rates


@dataclass
class SourceReport:
    """Measured facts about one source (all public)."""

    source: str
    trials: int
    reproduced: int
    entropy_bits: float | None
    bits: int
    ber: float
    seconds_median: float
    seconds_max: float
    enroll_seconds: float
    leakage_bits: int | None = None
    min_entropy_per_bit: float | None = None
    notes: list[str] = field(default_factory=list)
    flip_rates: list[float] = field(default_factory=list, repr=False)
    labels: list[str] = field(default_factory=list, repr=False)


def _trials(trials: int, tick: Callable[[], None], measure: Callable[[], Any], material: Callable[[Any], bytes],
            expected: bytes) -> tuple[int, list[float], list[Any]]:
    """Time ``measure()`` ``trials`` times; count the readings whose ``material(reading)`` is ``expected``.

    A :class:`FingerprintError` from ``material`` counts as a failed reproduction. Returns (reproduced, seconds
    per measurement, readings).
    """
    ok, secs, readings = 0, [], []
    for _ in range(trials):
        start = time.perf_counter()
        reading = measure()
        secs.append(time.perf_counter() - start)
        readings.append(reading)
        try:
            ok += hmac.compare_digest(material(reading), expected)
        except FingerprintError:
            pass
        tick()
    return ok, secs, readings


def _precision_trials(src: Any, enrollment: Any, trials: int, tick: Callable[[], None]) -> tuple:
    from chiplock.fingerprint.precision import _combine, probe_digests

    device = enrollment.helper.get("device", "cpu")
    ok, secs, rows = _trials(trials, tick, lambda: probe_digests(device), _combine, enrollment.material)
    names = sorted(rows[0])
    flips = [float(np.mean([r[n] != rows[0][n] for r in rows])) for n in names]
    return ok, secs, np.asarray(flips), names


def _reproduce_trials(src: Any, enrollment: Any, trials: int, tick: Callable[[], None]) -> tuple:
    """Sources without raw bits or probes (``tpm``): reproduce through the public helper, as unlock does."""
    def reproduce() -> bytes:  # Timed as a whole: for these sources reproduce is the measurement.
        try:
            return src.reproduce(enrollment.helper)
        except FingerprintError:
            return b""  # Never the enrolled material: counts as a failed reproduction.

    ok, secs, _ = _trials(trials, tick, reproduce, lambda material: material, enrollment.material)
    return ok, secs, np.asarray([1.0 - ok / trials]), ["material"]


def _bit_trials(src: Any, enrollment: Any, trials: int, tick: Callable[[], None]) -> tuple:
    from chiplock.keys.fuzzy import FuzzyExtractor

    fuzzy = enrollment.helper["fuzzy"]
    fe = FuzzyExtractor.from_helper(fuzzy)
    ok, secs, readings = _trials(trials, tick, lambda: src.raw_bits(enrollment.helper),
                                 lambda bits: fe.reproduce(bits, fuzzy), enrollment.material)
    r = np.vstack(readings)
    majority = (r.mean(axis=0) >= 0.5).astype(np.uint8)
    return ok, secs, bit_error_rates(majority, r), []


def measure_source(name: str, *, trials: int = 100, options: Mapping[str, Any] | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> SourceReport:
    """Enroll source ``name`` and measure it ``trials`` more times (see the module docstring).

    Raises:
        FingerprintError: The source cannot measure this device.
        ValueError: ``trials`` < 2.
    """
    if trials < 2:
        raise ValueError(f"trials must be >= 2 to measure a rate, got {trials}")
    src = get_source(name, **dict(options or {}))
    start = time.perf_counter()
    enrollment = src.enroll()
    enroll_seconds = time.perf_counter() - start
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(name, done[0], trials)

    if hasattr(src, "raw_bits") and "fuzzy" in enrollment.helper:
        ok, secs, flips, labels = _bit_trials(src, enrollment, trials, tick)
        notes = ["reproduction = one measurement decoded once (no retry); BER against the per-bit majority"]
    elif name == "precision":
        ok, secs, flips, labels = _precision_trials(src, enrollment, trials, tick)
        notes = ["bits = probes; BER = share of probe digests that differ from the first trial's"]
    else:
        ok, secs, flips, labels = _reproduce_trials(src, enrollment, trials, tick)
        notes = ["reproduction = the source's own reproduce(helper); BER = share of trials whose material differs"]
    info = enrollment.info
    assessment = info.get("assessment") or {}
    if info.get("entropy_note"):
        notes.append(info["entropy_note"])
    secs_sorted = sorted(secs)
    return SourceReport(
        source=name, trials=trials, reproduced=int(ok), entropy_bits=enrollment.entropy_bits, bits=int(flips.size),
        ber=float(flips.mean()), seconds_median=secs_sorted[len(secs) // 2], seconds_max=secs_sorted[-1],
        enroll_seconds=enroll_seconds, leakage_bits=info.get("leakage_bits"),
        min_entropy_per_bit=assessment.get("min_entropy"), notes=notes,
        flip_rates=[round(float(f), 6) for f in flips], labels=labels)


def _plot(report: SourceReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flips = np.asarray(report.flip_rates)
    fig, ax = plt.subplots(figsize=(8, 3.2 if report.labels else 4.0))
    if report.labels:
        ax.bar(range(flips.size), 1.0 - flips, color=["tab:green" if f == 0 else "tab:red" for f in flips])
        ax.set_xticks(range(flips.size), report.labels, rotation=90, fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of trials equal")
    else:
        width = 64 if flips.size >= 256 else 16
        rows = -(-flips.size // width)
        grid = np.full(rows * width, np.nan)
        grid[: flips.size] = flips
        im = ax.imshow(grid.reshape(rows, width), cmap="viridis_r", vmin=0.0, vmax=max(0.5, float(flips.max())),
                       aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="flip rate")
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("row")
        ax.set_xlabel(f"bit (row-major, {width} per row)")
    ax.set_title(f"{report.source}: per-bit reliability over {report.trials} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ".1f", none: str = "unknown") -> str:
    return none if x is None else format(x, spec)


def precision_entropy_section(enumeration: Any | None = None) -> list[str]:
    """Markdown lines on what the precision source's entropy rests on: a fresh enumeration, or the constant."""
    from chiplock.fingerprint.precision import PRECISION_ENTROPY_BITS

    lines = ["## Precision: configurations software can reach", ""]
    if enumeration is None:
        return lines + [
            f"Credited {PRECISION_ENTROPY_BITS:.1f} bits: log2 of the distinct fingerprints that environment "
            "variables and thread counts reach on one machine, as measured for docs/fingerprints.md. Run "
            "`chiplock fingerprint report --source precision --enumerate` to measure this machine (a few minutes).", ""]
    e = enumeration
    bound = " (lower bound: a cluster was sampled)" if e.lower_bound else ""
    lines += [
        f"Measured here: **{e.configurations} configurations** run in fresh processes ({e.failed} failed), "
        f"**{e.distinct_observed} distinct** fingerprints among them; composed over the whole product of settings: "
        f"**{e.composed} distinct = {e.bits:.1f} bits**{bound}; upper bound (every variable's classes multiplied) "
        f"{e.upper_bound} = {e.upper_bits:.1f} bits. Composition checked on {e.checks} random full configurations: "
        f"{e.checks_matched} predicted exactly. Baseline stable: {'yes' if e.stable else 'NO'}. "
        f"{e.seconds:.0f} s with {e.workers} processes at once. Credited by the source: "
        f"{PRECISION_ENTROPY_BITS:.1f} bits.", "",
        "| variable | settings tried | classes | probes moved |", "|---|---|---|---|"]
    lines += [f"| {v} | {st['settings']} | {st['classes']} | {st['probes_moved']} |" for v, st in e.variables.items()]
    lines += ["", "| measured jointly | probes | combinations | run | distinct |", "|---|---|---|---|---|"]
    lines += [f"| {' x '.join(c.variables)} | {c.probes} | {c.combinations} | {c.measured} | {c.distinct} |"
              for c in e.clusters]
    return lines + [""]


def write_report(reports: list[SourceReport], out_dir: str | os.PathLike, *, skipped: Mapping[str, str] = {},
                 enumeration: Any | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and one ``reliability_<source>.png`` per source; return the .md path.

    ``enumeration`` (an :class:`~chiplock.fingerprint.configurations.Enumeration`) adds the measured precision
    configuration space; without it a report with a precision source states the documented figure.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Fingerprint report", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}).", "",
        "| source | entropy (bits, after helper) | 800-90B min-entropy / bit | bits | helper leakage | BER | "
        "reproduced | time / measurement (median, max) | enroll |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(f"| {r.source} | {_fmt(r.entropy_bits)} | {_fmt(r.min_entropy_per_bit, '.3f', '-')} | {r.bits} | "
                     f"{'-' if r.leakage_bits is None else r.leakage_bits} | {r.ber:.4f} | {r.reproduced}/{r.trials} | "
                     f"{r.seconds_median:.3f} s, {r.seconds_max:.3f} s | {r.enroll_seconds:.2f} s |")
        _plot(r, out / f"reliability_{r.source}.png")
    lines.append("")
    for r in reports:
        lines.append(f"![{r.source} reliability](reliability_{r.source}.png)")
        lines.extend(f"- {r.source}: {n}" for n in r.notes)
        lines.append("")
    for name, why in skipped.items():
        lines.append(f"- {name}: skipped ({why})")
    if enumeration is not None or any(r.source == "precision" for r in reports):
        lines += ["", *precision_entropy_section(enumeration)]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    data: dict[str, Any] = {"sources": [asdict(r) for r in reports], "skipped": dict(skipped)}
    if enumeration is not None:
        data["precision_enumeration"] = public_enumeration(enumeration)
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return md


def public_enumeration(enumeration: Any) -> dict[str, Any]:
    """An enumeration's counts for reports; the per-setting classes (which name this CPU's ISA) are left out."""
    return {k: v for k, v in enumeration.to_json().items() if k != "classes"}
