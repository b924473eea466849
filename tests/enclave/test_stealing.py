"""The stealing harness: ShadowNet filter matching on synthetic disguises, and the TEESlice protocol end to end."""

from __future__ import annotations

import math

import pytest
import torch

from chiplock.enclave.stealing import (
    match_filters,
    match_scores,
    true_sources,
    undisguise,
)


def _disguise(w: torch.Tensor, *, fake_ratio: float = 0.25, seed: int = 0):
    """ShadowNet's disguise as the design describes it: outputs scaled (log-uniform [0.5, 2]) and shuffled, plus
    ceil(fake_ratio * C) fake filters of the real filters' scale. Returns the disguised weight and, per position,
    the real row it came from (-1 for a fake) and its scale."""
    g = torch.Generator().manual_seed(seed)
    c = w.shape[0]
    f = math.ceil(fake_ratio * c)
    scale = torch.exp(torch.empty(c).uniform_(math.log(0.5), math.log(2.0), generator=g))
    fakes = torch.randn((f, *w.shape[1:]), generator=g) * w.std()
    rows = torch.cat([w * scale.reshape(-1, *([1] * (w.dim() - 1))), fakes])
    order = torch.randperm(c + f, generator=g)
    origin = torch.cat([torch.arange(c), torch.full((f,), -1)])[order]
    return rows[order], origin, scale


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (64, 128)])
def test_filter_matching_recovers_a_known_permutation(shape):
    g = torch.Generator().manual_seed(1)
    public = torch.randn(shape, generator=g)
    # The victim was fine-tuned from the public model: its filters drifted by 30 % of their scale.
    victim = public + 0.3 * torch.randn(shape, generator=g)
    disguised, origin, _ = _disguise(victim, seed=2)
    m = match_filters(disguised, public)
    truth = true_sources(disguised, victim)
    # The scorer's ground truth agrees with the disguise's own record.
    expected = torch.tensor([int((origin == i).nonzero()) for i in range(shape[0])])
    assert torch.equal(truth, expected)
    s = match_scores(m, truth)
    assert s["recovered"] == 1.0
    assert s["fake_recall"] == 1.0 and s["fake_precision"] == 1.0
    assert torch.equal(m.fake, origin < 0)
    # Positive scales come back to within the drift, and undisguising gives the victim's filters in order.
    w = undisguise(disguised, m)
    assert w.shape == victim.shape
    cos = torch.nn.functional.cosine_similarity(w.reshape(shape[0], -1), victim.reshape(shape[0], -1))
    assert cos.min() > 0.999
    ratio = w.reshape(shape[0], -1).norm(dim=1) / victim.reshape(shape[0], -1).norm(dim=1)
    assert (ratio - 1).abs().max() < 0.15


def test_filter_matching_is_at_chance_against_fakes_only():
    # A disguise with no real filter in it: whatever the matching does, it cannot beat chance.
    g = torch.Generator().manual_seed(3)
    shape = (32, 16, 3, 3)
    public = torch.randn(shape, generator=g)
    victim = public + 0.3 * torch.randn(shape, generator=g)
    _, origin, _ = _disguise(victim, seed=4)
    fakes = torch.randn((len(origin), *shape[1:]), generator=g) * victim.std()
    m = match_filters(fakes, public)
    # Score against the secret permutation the defender drew (the rows the real filters would have occupied).
    truth = torch.tensor([int((origin == i).nonzero()) for i in range(shape[0])])
    s = match_scores(m, truth)
    assert s["recovered"] <= 4 * s["chance"] + 0.1
    assert m.similarity.mean() < 0.5  # nothing matches: the attacker can tell the disguise was not broken
    assert true_sources(fakes, victim).eq(-1).all()


def test_filter_matching_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least as many rows"):
        match_filters(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="trailing shape"):
        match_filters(torch.randn(6, 3), torch.randn(5, 4))


# ---------------------------------------------------------------------------------------------------------------
# On the real partition (chiplock.enclave.partition) and the real harness.

def _pair(seed: int = 0, drift: float = 0.2):
    """A public model and a victim "fine-tuned" from it (every weight moved by ``drift`` of its scale)."""
    from chiplock.enclave.models import NetSpec, build

    spec = NetSpec(image=8, widths=(8, 16), fc=32)
    public = build(spec, seed=seed).eval()
    victim = build(spec, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in victim.parameters():
            p.add_(drift * p.std() * torch.randn(p.shape, generator=g))
    return spec, public, victim


def test_shadownet_disguise_of_the_real_partition_is_undone():
    from chiplock.enclave.partition import split
    from chiplock.enclave.stealing import shadownet_undisguise

    spec, public, victim = _pair()
    p = split(victim, "shadownet", seed=7)
    weights, layers = shadownet_undisguise(p, public, victim)
    assert set(layers) == {f"units.{i}.lin.weight" for i in range(spec.units)}
    for name, s in layers.items():
        assert s["recovered"] == 1.0 and s["fake_recall"] == 1.0, (name, s)
        w, v = weights[name].flatten(1), victim.state_dict()[name].flatten(1)
        assert torch.nn.functional.cosine_similarity(w, v).min() > 0.999
    # Against an unrelated reference (no public model the victim came from) the matching is at chance.
    from chiplock.enclave.models import build

    _, layers = shadownet_undisguise(p, build(spec, seed=99), victim)
    rates = [s["recovered"] for s in layers.values()]
    chance = sum(s["chance"] for s in layers.values()) / len(layers)
    assert sum(rates) / len(rates) < 4 * chance + 0.1, rates


@pytest.fixture(scope="module")
def digits():
    """The smoke preset's public model and victim on 8x8 digits (memoised: the smoke run below reuses them)."""
    from chiplock.enclave.stealing import PRESETS, victims

    return dict(victims(dict(PRESETS["smoke"]), 0), ratio=0.25)


@pytest.mark.slow
def test_stolen_accuracy_of_all_out_is_the_victims(digits):
    from chiplock.enclave.partition import split
    from chiplock.enclave.stealing import PRESETS, steal
    from chiplock_demo.training import accuracy

    victim, splits = digits["victim"], digits["splits"]
    acc = accuracy(victim, splits.test_x, splits.test_y)
    assert acc > 0.7
    params = dict(PRESETS["smoke"], attack_epochs=2)
    full = steal("all-out", split(victim, "all-out"), digits, fill="random", queries=20, seed=0, params=params)
    assert full["stolen"] == pytest.approx(acc, abs=1e-9)
    # A black box with a random fill and 20 queries is far from it: the comparison above can fail.
    black = steal("all-in", split(victim, "all-in"), digits, fill="random", queries=20, seed=0, params=params)
    assert black["stolen"] < acc - 0.2


@pytest.fixture(scope="module")
def smoke():
    from chiplock.enclave import stealing

    return stealing.run(preset="smoke")


@pytest.mark.slow
def test_smoke_preset_fills_every_table(smoke, tmp_path):
    from chiplock.enclave.stealing import FILLS, STRATEGIES

    head, shadow, layers = smoke.tables
    cells = {(r[0], r[2], r[3]) for r in head.rows}
    assert cells == {(s, f, 50) for s in STRATEGIES for f in FILLS}
    for r in head.rows:
        assert 0 <= r[5] <= 1 and r[8] > 0, r
        if r[0] == "all-in":
            assert r[8] == pytest.approx(1.0)
    assert len(shadow.rows) == len(FILLS) and layers.rows
    assert all(r[2] > 4 * r[3] for r in shadow.rows)  # permutation recovered far above chance
    assert any("teeslice" in n and "Holds" in n for n in smoke.notes)
    paths = smoke.save(tmp_path)
    assert paths["png"].stat().st_size > 0
    assert "TEESlice artifact" in paths["md"].read_text()


def test_bad_settings_are_refused():
    from chiplock.enclave import stealing
    from chiplock.errors import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match="strategies"):
        stealing.run(preset="smoke", strategies=["middle-k"])
    with pytest.raises(UnsupportedConfig, match="fills"):
        stealing.run(preset="smoke", fills=["zeros"])
    with pytest.raises(UnsupportedConfig, match="queries"):
        stealing.run(preset="smoke", queries=[0])
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        stealing.run(preset="smoke", epochs=3)


@pytest.mark.slow
def test_results_of_different_seeds_combine(smoke):
    import copy

    from chiplock.enclave.stealing import combine
    from chiplock.errors import UnsupportedConfig

    other = copy.deepcopy(smoke)
    other.params = dict(other.params, seed=1)
    for r in other.data["runs"]:
        r["seed"] = 1
        r["stolen"] = r["stolen"] / 2  # a worse seed: the mean must move
    other.data["models"] = {1: other.data["models"][0]}
    both = combine([smoke, other])
    assert both.params["seeds"] == 2 and len(both.data["runs"]) == 2 * len(smoke.data["runs"])
    one = {(s["strategy"], s["fill"]): s for s in smoke.data["summary"]}
    for s in both.data["summary"]:
        assert s["stolen"] == pytest.approx(0.75 * one[s["strategy"], s["fill"]]["stolen"])
        assert len(s["relative_per_seed"]) == 2
    with pytest.raises(UnsupportedConfig, match="share a seed"):
        combine([smoke, smoke])
    other.params["k"] = 3
    with pytest.raises(UnsupportedConfig, match="differ"):
        combine([smoke, other])
