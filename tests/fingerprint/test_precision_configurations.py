"""Enumerating the precision fingerprint's configuration space: the composition against a brute-force count on
a synthetic machine, and a small real enumeration in fresh processes."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import platform

import pytest

from chiplock.fingerprint import configurations as cfg


def _space() -> cfg.Space:
    def var(name: str, *labels: str) -> dict[str, dict[str, str]]:
        return {cfg.UNSET: {}, **{label: {name: label} for label in labels}}

    return {"A": var("A", "a1", "a2"), "B": var("B", "b1"), "C": var("C", "c1", "c2", "c3"), "D": var("D", "d1"),
            "E": var("E", "boom")}


def _fake(setting: dict[str, str], hidden: bool = False) -> dict[str, str] | None:
    """A machine where p1 depends on A; p2 on A and B together (a1 acts like the default there); p3 on C (c3 ==
    the default); D changes nothing; E=boom kills the process. ``hidden``: b1 matters only together with a2."""
    if setting.get("E") == "boom":
        return None
    a, b, c = setting.get("A", "-"), setting.get("B", "-"), setting.get("C", "-")

    def h(*parts: str) -> str:
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    b_seen = b if (a == "a2" or not hidden) else "-"
    return {"p1": h("p1", a), "p2": h("p2", a if a != "a1" else "-", b_seen),
            "p3": h("p3", "-" if c == "c3" else c), "p4": h("p4")}


def _brute_force(space: cfg.Space, hidden: bool = False) -> int:
    seen = set()
    for combo in itertools.product(*(list(s) for s in space.values())):
        setting: dict[str, str] = {}
        for var, label in zip(space, combo):
            setting.update(space[var][label])
        r = _fake(setting, hidden)
        if r is not None:
            seen.add(json.dumps(r, sort_keys=True))
    return len(seen)


@pytest.fixture
def fake_machine(monkeypatch):
    calls: list[dict[str, str]] = []
    state = {"hidden": False}

    def one(self, setting):
        calls.append(dict(setting))
        return _fake(setting, state["hidden"])

    monkeypatch.setattr(cfg._Runner, "_one", one)
    return calls, state


def test_composition_matches_a_brute_force_count(fake_machine):
    space = _space()
    r = cfg.enumerate_configurations(space, checks=4, seed=1)
    truth = _brute_force(space)
    assert r.composed == truth == 3 * 2 * 3  # A x B measured jointly (6 fingerprints on p1, p2) x C (3)
    assert r.bits == round(math.log2(truth), 2)
    assert r.stable and r.failed == 1 and not r.lower_bound
    assert r.variables["A"] == {"settings": 3, "classes": 3, "probes_moved": 2, "failed": 0}
    assert r.variables["D"]["classes"] == 1 and r.variables["E"]["failed"] == 1
    assert r.classes["C"] == [[cfg.UNSET, "c3"], ["c1"], ["c2"]]
    assert [c.variables for c in r.clusters] == [["A", "B"], ["C"]]
    assert r.checks == 4 and r.checks_matched == 4
    assert r.upper_bound == 3 * 2 * 3 * 1 * 1
    # The baseline twice, 8 single settings, the 2 joint runs of A x B not already run one at a time, 4 checks.
    assert len(fake_machine[0]) == r.configurations == 2 + 8 + 2 + 4
    assert len({frozenset(c.items()) for c in fake_machine[0]}) < r.configurations  # checks re-measure


def test_composition_counts_interactions_that_one_at_a_time_cannot_see(fake_machine):
    # B alone changes nothing (b1 only matters together with a2), so one-at-a-time runs put it in one class and
    # the product under-counts; the brute force shows the real figure. The report must not claim more than
    # the measurement supports, and here it claims less (a lower figure is the safe side for a security claim).
    fake_machine[1]["hidden"] = True
    space = _space()
    r = cfg.enumerate_configurations(space, checks=0)
    assert r.variables["B"]["classes"] == 1
    assert r.composed == 3 * 3 < _brute_force(space, hidden=True) == 4 * 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        cfg.enumerate_configurations({"A": {cfg.UNSET: {}}}, workers=0)
    with pytest.raises(ValueError, match="variable 'A' has no settings"):
        cfg.enumerate_configurations({"A": {}})


def test_default_space_follows_the_cpu_flags():
    bare = cfg.default_space(flags={"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma"}, cpus=2)
    assert list(bare["ATEN_CPU_CAPABILITY"]) == [cfg.UNSET, "default", "avx2"]
    assert "SkylakeX" not in bare["OPENBLAS_CORETYPE"] and "Haswell" in bare["OPENBLAS_CORETYPE"]
    assert list(bare[cfg.TORCH_THREADS]) == [cfg.UNSET, "1", "2", "3", "4"]
    wide = cfg.default_space(flags={"avx2", "avx512bw", "avx512f"}, cpus=8)
    assert "avx512" in wide["ATEN_CPU_CAPABILITY"] and "16" in wide["OPENBLAS_NUM_THREADS"]
    assert all(next(iter(v)) == cfg.UNSET and v[cfg.UNSET] == {} for v in wide.values())


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the settings tried are x86 ones")
def test_small_real_enumeration_finds_distinct_fingerprints():
    # Four fresh processes: the baseline twice, ATen forced to its baseline ISA, OpenBLAS forced to a 2004 core.
    space = {"ATEN_CPU_CAPABILITY": {cfg.UNSET: {}, "default": {"ATEN_CPU_CAPABILITY": "default"}},
             "OPENBLAS_CORETYPE": {cfg.UNSET: {}, "Prescott": {"OPENBLAS_CORETYPE": "Prescott"}}}
    r = cfg.enumerate_configurations(space, checks=0)
    assert r.configurations == 4 and r.failed == 0 and r.stable
    assert r.distinct_observed >= 2
    assert r.composed == 4 and r.bits == 2.0
    assert json.dumps(r.to_json())  # public counts only
