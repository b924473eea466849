"""The retraining attack (Figures 3-4): one row per data fraction, compute proportional to the data, both
trainings priced, and the report complete."""

from __future__ import annotations

import math

import pytest

from chiplock.attacks import retraining
from chiplock.errors import UnsupportedConfig


def test_bad_settings_raise():
    with pytest.raises(UnsupportedConfig, match="start"):
        retraining.run(preset="smoke", start="gptq")
    with pytest.raises(UnsupportedConfig, match="fractions"):
        retraining.run(preset="smoke", fractions=[0.0, 1.0])
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        retraining.run(preset="smoke", steps=10)


@pytest.mark.slow
def test_rows_per_fraction_with_steps_proportional_to_the_data(tmp_path):
    res = retraining.run(preset="smoke", pairs=["dense->2:4"], fractions=[0.1, 0.5], epochs=2)
    pair = res.data["pairs"]["dense->2:4"]
    info, rr = pair["model"], pair["retrain"]
    assert rr["config"] == "2:4" and rr["pre_steps"] == ["sparsegpt", "bn-reestimate"]
    rows = {r["fraction"]: r for r in rr["rows"]}
    assert sorted(rows) == [0.1, 0.5]
    n = 1438  # digits8 training split
    for f, r in rows.items():
        assert abs(r["samples"] - f * n) <= 10  # stratified: rounded per class
        assert r["steps"] == 2 * math.ceil(r["samples"] / 64)
        assert r["retrain_seconds"] > 0 and r["scratch_seconds"] > 0
        assert 0 <= r["unauthorized_accuracy"] <= 1 and 0 <= r["scratch_accuracy"] <= 1
    assert 4 <= rows[0.5]["steps"] / rows[0.1]["steps"] <= 6
    assert rr["locked_authorized_accuracy"] == info["locked_authorized"]
    assert len(res.tables[1].rows) == 2 and res.tables[0].rows[0][0] == "dense->2:4"
    paths = res.save(tmp_path)
    assert paths["png"].stat().st_size > 1000 and "from scratch" in paths["md"].read_text()
