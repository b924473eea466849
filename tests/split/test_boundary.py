"""Boundary maps folded into the layers next to each stage boundary (chiplock/split/boundary.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from chiplock.errors import UnsupportedConfig
from chiplock.split.boundary import BoundaryMap, crossing, fold, random_boundary, unfold
from chiplock.split.units import ArchSpec, build_units, make_layout, split_units

ARCHS = [ArchSpec("mlp", width=16, image_size=8), ArchSpec("resnet18", width=8, image_size=8)]


def _model(arch, seed=0):
    torch.manual_seed(seed)
    units, streams = build_units(arch)
    # Non-trivial batch-norm statistics and affine parameters, so eval mode checks them too.
    with torch.no_grad():
        for name, t in units.state_dict().items():
            if name.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                t.normal_()
    return units, streams


def _maps(streams, seed=1, scale_range=(0.5, 2.0)):
    return {s.name: random_boundary(s.width, rng=seed + i, scale_range=scale_range) for i, s in enumerate(streams)}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_folding_keeps_the_function_and_changes_every_touched_tensor(arch, mode):
    units, streams = _model(arch)
    getattr(units, mode)()
    plain = copy.deepcopy(units)
    x = torch.randn(6, 1, 8, 8)
    maps = _maps(streams)
    fold(units, maps, streams)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    after = {k: v.clone() for k, v in units.state_dict().items()}
    torch.testing.assert_close(units(x), plain(x), rtol=1e-4, atol=1e-5)
    touched = {e.name for s in streams for e in s.entries}
    for name in touched:
        assert not torch.equal(before[name], after[name]), name
    for name in set(before) - touched:
        assert torch.equal(before[name], after[name]), name


def test_a_wrong_map_breaks_the_function():
    """The check above can fail: folding a map into the writers but another into the readers changes outputs."""
    units, streams = _model(ARCHS[0])
    units.eval()
    x = torch.randn(6, 1, 8, 8)
    y = units(x)
    stages = split_units(units, make_layout(ARCHS[0], 2))
    fold(stages[0], _maps(streams, seed=1), streams)
    fold(stages[1], _maps(streams, seed=2), streams)
    assert not torch.allclose(units(x), y, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_each_stage_folds_alone_and_the_chain_still_matches(arch):
    units, streams = _model(arch)
    units.eval()
    x = torch.randn(4, 1, 8, 8)
    y = units(x)
    maps = _maps(streams)
    for stage in split_units(units, make_layout(arch, 3)):
        fold(stage, maps, streams)
    torch.testing.assert_close(units(x), y, rtol=1e-4, atol=1e-5)
    unfold(units, maps, streams)
    torch.testing.assert_close(units(x), y, rtol=1e-4, atol=1e-5)


def test_fold_of_a_state_dict_returns_a_new_one_and_unfold_inverts_it():
    units, streams = _model(ARCHS[1])
    state = {k: v.clone() for k, v in units.state_dict().items()}
    maps = _maps(streams)
    folded = fold(state, maps, streams)
    assert all(torch.equal(state[k], v) for k, v in units.state_dict().items())
    back = unfold(folded, maps, streams)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=1e-6, atol=1e-6)


def test_map_algebra():
    a, b = random_boundary(7, rng=1), random_boundary(7, rng=2)
    x = torch.randn(7, dtype=torch.float64)

    def apply(m, v):
        return m.scale * v[m.perm]

    torch.testing.assert_close(apply(a.then(b), x), apply(b, apply(a, x)))
    torch.testing.assert_close(apply(a.inverse(), apply(a, x)), x)
    assert torch.equal(random_boundary(7, rng=3).perm, random_boundary(7, rng=3).perm)
    assert not torch.equal(random_boundary(64).perm, random_boundary(64).perm)


def _train(units, streams, *, rotate, state_mode, steps=12, seed=0):
    """SGD with momentum; optionally rotate pure-permutation maps every 3 steps; return the plain weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(units.parameters(), lr=0.05, momentum=0.9)
    maps = {s.name: BoundaryMap.identity(s.width) for s in streams}
    for step in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(units(x), y).backward()
        opt.step()
        if rotate and step % 3 == 2:
            new = _maps(streams, seed=step, scale_range=(1.0, 1.0))
            delta = {s: maps[s].inverse().then(new[s]) for s in maps}
            fold(units, delta, streams, optimizer=opt if state_mode == "transform" else None)
            maps = new
    unfold(units, maps, streams)
    return units.state_dict()


def test_rotation_moves_the_optimizer_state_with_the_weights():
    """With permutations, training with rotations is plain training, exactly; only if the momentum moves too."""
    arch = ARCHS[0]
    ref = _train(_model(arch)[0], _model(arch)[1], rotate=False, state_mode="transform")
    units, streams = _model(arch)
    got = _train(units, streams, rotate=True, state_mode="transform")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    units, streams = _model(arch)
    stale = _train(units, streams, rotate=True, state_mode="stale")
    assert max(float((stale[k] - ref[k]).abs().max()) for k in ref) > 1e-3


def test_unknown_optimizer_state_is_refused():
    units, streams = _model(ARCHS[0])
    opt = torch.optim.Adagrad(units.parameters())
    F.cross_entropy(units(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()
    with pytest.raises(UnsupportedConfig, match="reset the optimiser"):
        fold(units, _maps(streams), streams, optimizer=opt)


def test_bad_arguments():
    units, streams = _model(ARCHS[0])
    with pytest.raises(UnsupportedConfig, match="width"):
        fold(units, {streams[0].name: random_boundary(3)}, streams)
    with pytest.raises(UnsupportedConfig, match="no stream"):
        fold(units, {"nope": random_boundary(3)}, streams)
    with pytest.raises(ValueError, match="scale_range"):
        random_boundary(4, scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="permutation"):
        BoundaryMap(torch.tensor([0, 0]), torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="fold"):
        fold([object()], {}, streams)


def test_crossing_lists_the_streams_between_stages():
    arch = ArchSpec("resnet18", width=4)
    layout = make_layout(arch, 4)
    _, streams = build_units(arch, device="meta")
    stage_of = {e.name: layout.stage_of(e.name) for s in streams for e in s.entries}
    shared = crossing(streams, stage_of)
    assert shared and all(len(r) > 1 and list(r) == sorted(r) for r in shared.values())
    assert crossing(streams, {n: 0 for n in stage_of}) == {}
