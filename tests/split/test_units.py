"""Units, streams and stage layouts (chiplock/split/units.py)."""

from __future__ import annotations

import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.split.units import ArchSpec, Layout, build_stage, build_units, make_layout, partition, unit_sizes

ARCHS = [ArchSpec("mlp", width=16, image_size=8), ArchSpec("resnet18", width=4, image_size=8)]


@pytest.mark.parametrize("sizes,stages,want", [
    ([1, 1, 1, 9], 2, [[0, 1, 2], [3]]),
    ([5, 5, 5, 5], 2, [[0, 1], [2, 3]]),
    ([5, 5, 5, 5], 4, [[0], [1], [2], [3]]),
    ([3], 1, [[0]]),
])
def test_partition_minimises_the_largest_stage(sizes, stages, want):
    assert partition(sizes, stages) == want


@pytest.mark.parametrize("stages", [0, 5, 2.0])
def test_partition_refuses_impossible_counts(stages):
    with pytest.raises(ValueError, match="stages="):
        partition([1, 2, 3, 4], stages)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_streams_name_real_tensors_with_the_stream_width(arch):
    units, streams = build_units(arch)
    state = units.state_dict()
    for s in streams:
        for e in s.entries:
            assert state[e.name].shape[e.dim] == s.width, e
    # Every boundary between two units lies in exactly one stream.
    n = len(list(units.children()))
    assert sorted(k for s in streams for k in s.after) == list(range(n - 1))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_stages_are_disjoint_and_cover_the_model(arch):
    layout = make_layout(arch, 3)
    whole = build_units(arch, device="meta")[0].state_dict()
    names = [set(build_stage(layout, i, device="meta")[0].state_dict()) for i in range(3)]
    assert all(not (a & b) for i, a in enumerate(names) for b in names[i + 1:])
    assert set().union(*names) == set(whole)
    assert all(layout.stage_of(n) == i for i, ns in enumerate(names) for n in ns)


def test_build_stage_allocates_only_its_own_units():
    layout = make_layout(ArchSpec("resnet18", width=8), 4)
    stage, _ = build_stage(layout, 3)
    whole = sum(unit_sizes(build_units(layout.arch, device="meta")[0]))
    held = [p for p in stage.parameters()]
    assert all(p.device.type == "cpu" for p in held)
    assert 0 < sum(p.numel() for p in held) < whole / 2
    assert [n for n, _ in stage.named_children()] == list(layout.stages[3])


def test_layout_json_round_trip_and_refusals():
    layout = make_layout(ArchSpec("mlp", width=16), 2)
    assert Layout.from_json(layout.to_json()) == layout
    with pytest.raises(UnsupportedConfig, match="malformed"):
        Layout.from_json('{"chiplock_split": 2}')
    bad = layout.to_json().replace('"head"', '"tail"')
    with pytest.raises(UnsupportedConfig, match="cover the units"):
        Layout.from_json(bad)


def test_arch_spec_checks_its_fields():
    with pytest.raises(ValueError, match="unknown"):
        ArchSpec("vgg")
    with pytest.raises(ValueError, match="positive"):
        ArchSpec("mlp", width=0)


def test_units_run_like_the_original_resnet():
    from chiplock.softlock.model_io import build_architecture

    torch.manual_seed(0)
    units, _ = build_units(ArchSpec("resnet18", width=4, image_size=8))
    torch.manual_seed(0)
    ref = build_architecture("resnet18", width=4, image_size=8)
    units.eval(), ref.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(units(x), ref(x))
