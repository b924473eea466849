"""``chiplock attack enumerate``: the configurations software reaches here, and a precision-locked file opened by
walking them (fresh processes; the file's AES-GCM licence rejects every wrong configuration)."""

from __future__ import annotations

import json
import platform

import pytest

from chiplock.attacks import enumeration
from chiplock.errors import UnsupportedConfig
from chiplock.fingerprint.configurations import UNSET

X86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="the smoke space sets x86 options (ATEN_CPU_CAPABILITY, OPENBLAS_CORETYPE)")


def _space():
    def var(name, *labels):
        return {UNSET: {}, **{label: {name: label} for label in labels}}

    return {"A": var("A", "a1", "a2", "a3"), "B": var("B", "b1"), "C": var("C", "c1", "c2")}


def test_walk_tries_defaults_first_class_representatives_next_then_everything_once():
    space = _space()
    # What the enumeration would tell the attacker: a2 and a3 give the default's fingerprint, c1 == c2.
    classes = {"A": [[UNSET, "a2", "a3"], ["a1"]], "B": [[UNSET], ["b1"]], "C": [[UNSET], ["c1", "c2"]]}
    order = enumeration.walk_order(space, classes)
    assert order[0] == {"A": UNSET, "B": UNSET, "C": UNSET}
    reps = [tuple(o.values()) for o in order[:8]]
    assert set(reps) == {(a, b, c) for a in (UNSET, "a1") for b in (UNSET, "b1") for c in (UNSET, "c1")}
    assert [sum(x != UNSET for x in r) for r in reps] == sorted(sum(x != UNSET for x in r) for r in reps)
    # Every combination of settings exactly once, so a victim anywhere in the space is found.
    assert len(order) == 4 * 2 * 3 and len({tuple(o.values()) for o in order}) == len(order)
    # A victim drawn uniformly: each setting opens where its class representative does (by hand: 93 / 24).
    assert enumeration.mean_guesses(space, classes) == pytest.approx(93 / 24)
    # Without classes each setting is its own class: the walk is the whole space, defaults first.
    plain = enumeration.walk_order(space)
    assert plain[0] == order[0] and len(plain) == len(order)


def test_bad_settings_raise_before_any_process_runs():
    with pytest.raises(UnsupportedConfig, match="unknown space"):
        enumeration.run(preset="smoke", space="everything")
    with pytest.raises(UnsupportedConfig, match="not in the default space"):
        enumeration.run(preset="paper", attack_variables=["NOT_A_VARIABLE"])
    with pytest.raises(UnsupportedConfig, match="victim must give one setting of each"):
        enumeration.run(preset="paper", victim={"ATEN_CPU_CAPABILITY": "avx9000"})


@pytest.mark.slow
@X86
def test_smoke_finds_configurations_and_opens_the_file_after_walking_to_the_victim(tmp_path):
    victim = {"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": "Prescott"}  # the walk's last configuration
    r = enumeration.run(preset="smoke", victim=victim)
    e, a = r.data["enumeration"], r.data["attack"]
    assert e["failed"] == 0 and e["stable"] and e["distinct_observed"] >= 2 and e["composed"] == 4
    assert a["victim"] == victim and a["settings"] == 4 and a["walk"] == 4
    # Every other configuration was rejected by the licence's AES-GCM; the victim's own opened the file.
    assert a["opened"] and a["guesses"] == 4 <= a["settings"], a["tries"]
    assert [t["opened"] for t in a["tries"]] == [False, False, False, True]
    assert a["cpu_s"] > 0 and a["argon2_default_s"] > 0
    # Counts, labels and timings only: nothing that could hold key material.
    assert set().union(*(t for t in a["tries"])) <= {"configuration", "opened", "wall_s", "error"}
    assert json.dumps(r.to_json())
    assert r.save(tmp_path)["png"].stat().st_size > 0
