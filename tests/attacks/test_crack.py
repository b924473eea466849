"""The crack attack: each transform's best check finds the device's key in a 6-bit space, through a real locked
file and its real licence; a check that cannot tell keys apart does not (so these tests can fail)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from chiplock.attacks import crack, structure
from chiplock.errors import UnsupportedConfig


@pytest.fixture
def locked(tmp_path, trained_weights, fast_kdf):
    """``locked(transform, bits)`` -> (Target, Victim): the trained weights locked for a synthetic device whose
    material is known to the attacker except its last ``bits`` bits."""

    def make(transform: str, bits: int = 6, weights=None):
        victim = crack.Victim.draw(bits, np.random.default_rng(bits))
        path = tmp_path / f"{transform}.chiplock"
        crack.lock_for(victim, weights or trained_weights, path, transform, fast_kdf)
        return crack.Target(path), victim

    return make


def test_victim_hides_exactly_the_low_bits():
    v = crack.Victim.draw(6, np.random.default_rng(0))
    assert int.from_bytes(v.known, "big") % 64 == 0
    assert v.profile().enrollments[0].material == v.material(v.secret)
    assert {int.from_bytes(v.material(g), "big") >> 6 for g in range(64)} == {int.from_bytes(v.known, "big") >> 6}
    assert len({v.material(g) for g in range(64)}) == 64
    assert v.profile().entropy_bits() == 6.0


@pytest.mark.parametrize("transform", ["aes", "shuffle", "pre-aes"])
def test_best_check_finds_the_key_in_6_bits(locked, transform):
    target, victim = locked(transform)
    r = crack.search(target, victim, crack.BEST[transform], stat=crack.statistic("row_norm_cv"))
    assert r["found"] and r["rank"] == 1
    if crack.BEST[transform] == "tag":
        assert r["accepted"] == 1, "the AES-GCM licence wrap let a wrong device key through"
    else:
        assert r["margin"] > 5, f"the right key barely stands out ({r['margin']:.2f} robust sd)"


def test_constant_statistic_cannot_rank_the_key(locked, monkeypatch):
    """The distinguisher's success comes from the statistic: a constant one ties every guess."""
    target, victim = locked("pre-aes")
    monkeypatch.setitem(structure.PANEL, "row_norm_cv", (lambda w: 0.5, lambda w: True))
    r = crack.search(target, victim, "distinguisher", stat=crack.statistic("row_norm_cv"))
    assert not r["found"] and r["rank"] == 64


def test_tag_that_accepts_every_key_cannot_find_it(locked, monkeypatch):
    """The tag strategy's success comes from the licence's authenticated wrap: without it every guess passes."""
    import chiplock.license

    target, victim = locked("aes")
    monkeypatch.setattr(chiplock.license, "open_license", lambda lic, **kw: {target.label: os.urandom(32)})
    r = crack.search(target, victim, "tag")
    assert r["accepted"] == 64 and not r["found"]


def test_pre_aes_licence_opens_for_every_guess_and_only_the_right_key_decodes(locked, trained_weights):
    target, victim = locked("pre-aes", bits=2)
    keys = [target.open(victim.material(g), target.device_key(victim.material(g))) for g in range(4)]
    right = target.decode_one(keys[victim.secret])
    assert right.equal(trained_weights[target.tensor])
    assert not any(target.decode_one(k).equal(right) for i, k in enumerate(keys) if i != victim.secret)


def test_evaluate_finds_the_pre_aes_key(locked, trained_model, digits):
    model = copy.deepcopy(trained_model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target, victim = locked("pre-aes", bits=3, weights=weights)
    r = crack.search(target, victim, "evaluate", evaluate=crack.Evaluator(model, digits.x_test, digits.y_test))
    assert r["found"] and r["right_score"] > 0.85


def test_time_check_prices_evaluate_even_behind_a_tag(locked, trained_model, digits):
    model = copy.deepcopy(trained_model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target, victim = locked("aes", bits=4, weights=weights)
    ev = crack.Evaluator(model, digits.x_test[:64], digits.y_test[:64])
    tag = crack.time_check(target, victim, "tag", repeats=5)
    full = crack.time_check(target, victim, "evaluate", repeats=2, evaluate=ev)
    assert 0 < tag < full


@pytest.mark.parametrize("overrides, message", [
    ({"bits": [30]}, "bits must be 1..24"),
    ({"transforms": ["rot13"]}, "unknown transform"),
    ({"statistic": "nope"}, "unknown statistic"),
    ({"trials": 0}, "trials must be at least 1"),
    ({"colour": 1}, "unknown setting"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(UnsupportedConfig, match=message):
        crack.run(preset="smoke", **overrides)


@pytest.mark.slow
def test_smoke_preset_fills_the_tables(tmp_path):
    r = crack.run(preset="smoke")
    head = r.tables[0]
    rows = {(row[0], row[1]): row for row in head.rows}
    assert set(rows) == {("aes", "tag"), ("aes", "evaluate"), ("shuffle", "tag"), ("shuffle", "evaluate"),
                         ("pre-aes", "distinguisher"), ("pre-aes", "evaluate")}
    kdf = head.columns.index("KDF s")
    for t, s in [("aes", "tag"), ("shuffle", "tag"), ("pre-aes", "distinguisher")]:
        row = rows[(t, s)]
        assert row[head.columns.index("success")] == "1/1" and row[head.columns.index("right-key rank")] == 1
        assert row[head.columns.index("paper c")] == crack.PAPER_C[t]
        assert row[head.columns.index("c s/guess")] >= row[kdf] > 0.05
        # The cheap check is cheaper than evaluating the model.
        assert row[head.columns.index("check s")] < rows[(t, "evaluate")][head.columns.index("check s")]
    assert any("INSECURE_FAST" in n for n in r.notes) and any("Weaker than the paper" in n for n in r.notes)
    paths = r.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and "| aes | tag |" in paths["md"].read_text()
