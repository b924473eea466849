"""Reconstruction attacks on a split model (chiplock/split/reconstruct.py): the attacker holds what the selection
says and nothing more, shards copied at one rotation epoch compose while shards from different epochs do not, a
stitching layer can express the mismatch, and the smoke preset fills every table."""

from __future__ import annotations

import pytest
import torch

from chiplock.attacks.result import AttackResult
from chiplock.errors import UnsupportedConfig
from chiplock.split import reconstruct as R
from chiplock.split.boundary import crossing
from chiplock.split.units import ArchSpec, build_units, make_layout

SMALL = ArchSpec("resnet18", width=4, image_size=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _victim(spec=SMALL, seed=0):
    """A freshly built chain with non-trivial batch-norm statistics and affine parameters (as after training),
    in eval mode."""
    torch.manual_seed(seed)
    units, streams = build_units(spec)
    with torch.no_grad():
        for name, t in units.state_dict().items():
            if name.endswith(("running_var", "bn1.weight", "bn2.weight", "1.weight")):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                t.normal_()
    return units.eval(), streams


@pytest.mark.parametrize("how", R.STRATEGIES)
def test_selection_covers_the_asked_fraction_within_one_layer(how):
    units, _ = build_units(ArchSpec("resnet18", width=16), device="meta")
    groups = R.layer_groups(units)
    sizes = [g.size for g in groups]
    assert sum(sizes) == sum(p.numel() for p in units.parameters())
    grain = max(sizes) / sum(sizes) / 2
    for p in (0.1, 0.25, 0.5, 0.75, 0.9):
        for seed in range(3 if how == "random" else 1):
            chosen = R.select_layers(groups, p, how, seed=seed)
            got = sum(sizes[i] for i in chosen) / sum(sizes)
            assert abs(got - p) <= grain + 1e-9, f"{how} p={p}: holds {got:.3f}"
            assert chosen == sorted(set(chosen)) and 0 < len(chosen) < len(groups)
            if how != "random":
                assert chosen == list(range(chosen[0], chosen[-1] + 1)), f"{how} must be a contiguous block"
            if how == "input":
                assert chosen[0] == 0
            if how == "output":
                assert chosen[-1] == len(groups) - 1
    # Random draws differ by seed; positions are not the same blocks.
    assert R.select_layers(groups, 0.5, "input") != R.select_layers(groups, 0.5, "output")
    with pytest.raises(UnsupportedConfig, match="in \\(0, 1\\)"):
        R.select_layers(groups, 1.0, how)
    with pytest.raises(UnsupportedConfig, match="how="):
        R.select_layers(groups, 0.5, "largest")


def test_held_parameters_are_exactly_the_victims_and_missing_ones_are_not():
    victim, _ = _victim()
    plain = {k: v.clone() for k, v in victim.state_dict().items()}
    torch.manual_seed(1)
    fresh, _ = build_units(SMALL)
    groups = R.layer_groups(victim)
    chosen = R.select_layers(groups, 0.5, "random", seed=2)
    held = [t for i in chosen for t in groups[i].tensors]
    model = R.assemble(fresh, {k: plain[k] for k in held})
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k in held:
            assert torch.equal(v, plain[k]), f"held tensor {k} is not the victim's"
        else:
            assert not torch.equal(v, plain[k]), f"missing tensor {k} equals the victim's"
    # Every parameter is either held or missing, and neither the victim nor the fresh model was changed.
    assert set(held) <= set(plain)
    assert all(torch.equal(v, plain[k]) for k, v in victim.state_dict().items())
    assert not any(torch.equal(fresh.state_dict()[k], plain[k]) for k in held if k.endswith("weight"))
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), victim(x), atol=1e-3)
    with pytest.raises(UnsupportedConfig, match="no tensor"):
        R.assemble(fresh, {"nope.weight": torch.zeros(1)})


def _mismatch_weight(a, b) -> torch.Tensor:
    """The matrix of the channel map ``a⁻¹ then b`` (what a reader at epoch b needs from a writer at epoch a)."""
    m = a.inverse().then(b)
    w = torch.zeros(m.width, m.width)
    w[torch.arange(m.width), m.perm] = m.scale.float()
    return w


def test_shards_from_one_epoch_compose_and_from_different_epochs_do_not():
    victim, streams = _victim()
    plain = {k: v.clone() for k, v in victim.state_dict().items()}
    layout = make_layout(SMALL, 4)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        want = victim(x)

    def forward(state, stitch_weights=None):
        torch.manual_seed(5)
        model = R.assemble(build_units(SMALL)[0], state).eval()
        if stitch_weights is not None:
            model = R.stitch(model, layout, x).eval()
            with torch.no_grad():
                for name, w in stitch_weights.items():
                    getattr(model, f"stitch_{name}").weight.copy_(w.view_as(getattr(model, f"stitch_{name}").weight))
        with torch.no_grad():
            return model(x)

    names = list(crossing(streams, {k: layout.stage_of(k) for k in plain}))
    assert len(names) >= 2
    same = R.capture(plain, layout, streams, [3, 3, 3, 3], seed=0)
    changed = {k for k in plain if not torch.equal(same[k], plain[k])}
    # The maps change every tensor of a stream crossing a stage boundary, and nothing else.
    assert changed == {e.name for st in streams if st.name in names for e in st.entries}
    assert torch.allclose(forward(same), want, atol=1e-4, rtol=1e-4)
    # Identity stitching layers change nothing.
    assert torch.allclose(forward(same, {}), want, atol=1e-4, rtol=1e-4)

    epochs = [0, 1, 2, 3]
    mixed = R.capture(plain, layout, streams, epochs, seed=0)
    got = forward(mixed)
    err = ((got - want).norm() / want.norm()).item()
    assert err > 0.2, f"shards from different epochs compose to the victim's function (relative error {err:.3g})"
    assert all(torch.equal(v, plain[k]) for k, v in R.capture(plain, layout, streams, None).items())

    # A stitching layer can express the mismatch exactly: set to the true map, the victim's function returns.
    maps = [R.epoch_maps(streams, names, e, seed=0) for e in epochs]
    unit_names = [n for n, _ in victim.named_children()]
    weights = {}
    for s in range(1, len(layout.stages)):
        first = layout.stages[s][0]
        before = unit_names.index(first) - 1
        stream = next(st for st in streams if before in st.after)
        weights[first] = _mismatch_weight(maps[s - 1][stream.name], maps[s][stream.name])
    assert torch.allclose(forward(mixed, weights), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(UnsupportedConfig, match="one rotation epoch per stage"):
        R.capture(plain, layout, streams, [0, 1])


def test_as_units_keeps_the_projects_resnet_function():
    from chiplock.softlock.model_io import build_architecture

    torch.manual_seed(0)
    model = build_architecture("resnet18", width=4, image_size=8).eval()
    units, _ = R.as_units(model, SMALL)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(units(x), model(x), atol=1e-5)
    with pytest.raises(UnsupportedConfig, match="not the ResNet-18"):
        R.as_units(build_architecture("resnet18", width=8, image_size=8), SMALL)


def test_bad_settings_are_refused_before_any_training():
    with pytest.raises(UnsupportedConfig, match="ps must be"):
        R.run(preset="smoke", ps=[1.5])
    with pytest.raises(UnsupportedConfig, match="unknown position"):
        R.run(preset="smoke", positions=["top"])
    with pytest.raises(UnsupportedConfig, match="unknown preset"):
        R.run(preset="huge")
    assert R.schedule(100, 3) == [0, 25, 50, 100]
    assert R.steps_to([[0, 0.1], [10, 0.5], [20, 0.9]], 0.5) == 10
    assert R.steps_to([[0, 0.1]], 0.5) is None


@pytest.mark.slow
def test_smoke_preset_fills_every_table(tmp_path):
    result = R.run(preset="smoke")
    assert [len(t.rows) > 0 for t in result.tables] == [True] * 4
    for t in result.tables:
        for row in t.rows:
            assert len(row) == len(t.columns)
    claims = result.data["claims"]
    assert claims and all(set(c) == {"claim", "measured"} and c["measured"] for c in claims)
    runs = result.data["runs"]
    orig = result.data["original_accuracy"]
    assert orig > 0.5, "the smoke victim must have learnt something for the comparisons to mean anything"
    whole = {r["variant"]: r for r in runs if r["table"] == "collude" and r["p_held"] == 1.0}
    # All ranks, plain weights: the victim itself; all ranks at different epochs: broken before fine-tuning.
    assert whole["none"]["final"] == orig
    assert whole["transforms"]["curve"][0][1] < orig - 0.2
    assert {r["variant"] for r in runs if r["table"] == "transforms"} == {"none", "transforms",
                                                                         "transforms + stitching"}
    paths = result.save(tmp_path)
    assert {p.name for p in paths.values()} == {"reconstruct.json", "reconstruct.md", "reconstruct.png"}
    back = AttackResult.from_json(__import__("json").loads(paths["json"].read_text()))
    assert [t.title for t in back.tables] == [t.title for t in result.tables]
