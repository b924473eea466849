"""The overhead harness: sane numbers and exact traffic counts (no timing thresholds: the machine is shared)."""

from __future__ import annotations

import math

import pytest

from chiplock.enclave import overhead
from chiplock.enclave.models import NetSpec
from chiplock.errors import UnsupportedConfig

FAST = {"latency_runs": 3, "throughput_runs": 2, "throughput_batch": 8, "warmup": 1}


def _expected_traffic(strategy: str, batch: int) -> tuple[int, int, int]:
    """(switches, bytes in, bytes out) per batch, from the shapes alone."""
    p = overhead.PRESETS["smoke"]
    spec = NetSpec(image=p["image"], widths=tuple(p["widths"]), fc=p["fc"])
    shapes, n, k = spec.shapes(), spec.units, p["k"]

    def nbytes(*ss):
        return sum(4 * batch * math.prod(s) for s in ss)

    if strategy == "all-out":
        return 0, 0, 0
    if strategy == "all-in":
        return 1, nbytes(shapes[0]), nbytes(shapes[n])
    if strategy == "last-k":
        return 1, nbytes(shapes[n - k]), nbytes(shapes[n])
    if strategy == "first-k":
        return 1, nbytes(shapes[0]), nbytes(shapes[k])
    if strategy == "teeslice":
        # The backbone's features from the first sliced unit's input on (the default layout).
        from chiplock.enclave.models import default_start

        return 1, nbytes(*shapes[default_start(spec):n]), nbytes(shapes[n])
    raise AssertionError(strategy)


def _check_rows(result, strategies):
    rows = {r["strategy"]: r for r in result.data["rows"]}
    assert list(rows) == strategies
    table = result.tables[0]
    assert [r[0] for r in table.rows] == strategies
    for s, r in rows.items():
        assert r["matches_plain"], s
        for key in ("latency_plain_ms", "latency_ms", "throughput_plain", "throughput", "latency_ratio",
                    "throughput_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (s, key, r[key])
        if s != "shadownet":
            assert (r["switches_per_batch"], r["bytes_in_per_batch"], r["bytes_out_per_batch"]) == \
                _expected_traffic(s, FAST["throughput_batch"]), s
        assert (r["secure_params"] == 0) == (s == "all-out")
    return rows


def test_overhead_smoke_local_fills_the_table(tmp_path):
    result = overhead.run(preset="smoke", executor="local", **FAST)
    rows = _check_rows(result, list(overhead.STRATEGIES))
    # ShadowNet crosses once per unit, each way carrying the disguised (real + fake) and the plain activation.
    assert rows["shadownet"]["switches_per_batch"] == NetSpec(image=8, widths=(8, 16), fc=32).units
    assert rows["shadownet"]["bytes_in_per_batch"] > rows["shadownet"]["bytes_out_per_batch"]
    assert any("teeslice" in n for n in result.notes)
    paths = result.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and "teeslice" in paths["md"].read_text()


@pytest.mark.slow
def test_overhead_through_the_real_executor():
    pytest.importorskip("chiplock.enclave.executor")
    strategies = ["all-out", "last-k", "teeslice"]
    result = overhead.run(preset="smoke", executor="enclave", strategies=strategies, **FAST)
    rows = _check_rows(result, strategies)
    assert result.data["executor"] == "enclave"
    status = rows["last-k"]["status"]
    assert status["hardened"] and status["ops"] == ["tail"]
    # The executor counts the same traffic the client does.
    assert rows["teeslice"]["status_after"]["switches"] >= 1


def test_overhead_rejects_bad_settings():
    with pytest.raises(UnsupportedConfig, match="strategies"):
        overhead.run(preset="smoke", strategies=["middle-k"])
    with pytest.raises(UnsupportedConfig, match="executor"):
        overhead.run(preset="smoke", executor="tee")
    with pytest.raises(UnsupportedConfig, match=">= 1"):
        overhead.run(preset="smoke", latency_runs=0)
