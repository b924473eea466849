"""The scale attack: lock/unlock times grow linearly with the parameter count, the fit says so, and every
transform has its rows."""

from __future__ import annotations

import numpy as np
import pytest

from chiplock.attacks import scale
from chiplock.errors import UnsupportedConfig


def test_linear_fit_recovers_a_line_and_scores_noise():
    n = [1e4, 1e5, 1e6, 1e7]
    f = scale.linear_fit(n, [0.2 + 3e-7 * x for x in n])
    assert f["slope"] == pytest.approx(3e-7) and f["intercept"] == pytest.approx(0.2) and f["r2"] == pytest.approx(1)
    noisy = scale.linear_fit(n, [1.0, 0.1, 2.0, 0.5])
    assert noisy["r2"] < 0.5
    with pytest.raises(UnsupportedConfig, match="two different sizes"):
        scale.linear_fit([1e5, 1e5], [1.0, 2.0])


def test_synthetic_weights_have_the_asked_size():
    w = scale.synthetic_weights(1_000_000, 8)
    total = sum(t.numel() for t in w.values())
    assert len(w) == 8 and 0.97e6 <= total <= 1e6
    # Rows of different scale, like trained layers (not one i.i.d. draw).
    norms = w["layer0.weight"].norm(dim=1)
    assert float(norms.std() / norms.mean()) > 0.1
    with pytest.raises(UnsupportedConfig, match="parameters"):
        scale.synthetic_weights(100, 8)


@pytest.mark.parametrize("overrides, message", [
    ({"transforms": ["rot13"]}, "unknown transform"),
    ({"sizes": [100]}, "parameters"),
    ({"sizes": [100_000]}, "at least two"),
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"statistic": "nope"}, "unknown statistic"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(UnsupportedConfig, match=message):
        scale.run(preset="smoke", **overrides)


@pytest.fixture(scope="module")
def tiny():
    return scale.run(preset="smoke", sizes=[20_000, 80_000, 320_000], repeats=2)


@pytest.mark.slow
def test_rows_for_every_transform_and_size(tiny):
    rows = tiny.data["rows"]
    sizes = sorted({r["params"] for r in rows})
    assert len(sizes) == 3
    assert {(r["transform"], r["params"]) for r in rows} == {(t, n) for t in ("aes", "shuffle", "pre-aes")
                                                             for n in sizes}
    fits = {(f["transform"], f["op"]): f for f in tiny.data["fits"]}
    assert set(fits) == {(t, op) for t in ("aes", "shuffle", "pre-aes") for op in ("lock", "unlock")}
    assert len(tiny.tables[0].rows) == 9 and len(tiny.tables[1].rows) == 6 and len(tiny.tables[2].rows) == 6


@pytest.mark.slow
def test_fit_is_sane_on_tiny_sizes(tiny):
    # Mechanics only: timings on a shared 2-core machine are not asserted here (the benchmark reports them).
    for f in tiny.data["fits"]:
        assert np.isfinite([f["slope"], f["intercept"]]).all() and f["r2"] <= 1.0
    rows = {(r["transform"], r["params"]): r for r in tiny.data["rows"]}
    top = max(r["params"] for r in tiny.data["rows"])
    # The licence tag answers without touching the weights (microseconds against a whole-model decode).
    for t in ("aes", "shuffle"):
        c = rows[(t, top)]["checks"]
        assert c["tag"] < c["decode all"]


def test_smoke_preset_saves(tmp_path):
    r = scale.run(preset="smoke")
    paths = r.save(tmp_path)
    assert paths["png"].stat().st_size > 0
    text = paths["md"].read_text()
    assert "Linear fit" in text and "| pre-aes | lock |" in text
    assert np.isfinite([f["slope"] for f in r.data["fits"]]).all()
