"""Stages as locked parts that a rank's licence alone opens (chiplock/split/shards.py)."""

from __future__ import annotations

import pytest
import torch

import chiplock
from chiplock.errors import ContainerError, ProfileError
from chiplock.license import ContentKeys
from chiplock.split.shards import MODEL_FILE, issue_stage_license, load_stage, lock_split, save_stage
from chiplock.split.units import ArchSpec, Layout, build_stage, build_units, make_layout

from .conftest import make_device

ARCH = ArchSpec("resnet18", width=4, image_size=8)


@pytest.fixture(scope="module")
def locked(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("split")
    layout = make_layout(ARCH, 3)
    torch.manual_seed(0)
    units, _ = build_units(ARCH)
    (out / "m").mkdir()
    lics = lock_split(units, layout, out / "m", keys_path=out / "m.keys", profiles=[device])
    return out, layout, units.state_dict(), lics


def test_one_group_per_stage(locked):
    out, layout, _, _ = locked
    meta = chiplock.inspect(out / "m" / MODEL_FILE)
    assert sorted(meta["groups"]) == list(layout.labels)
    assert Layout.from_json((out / "m" / "split.json").read_text()) == layout


def test_each_licence_opens_its_stage_only(locked, device):
    out, layout, state, lics = locked
    for i in range(3):
        stage, _ = build_stage(layout, i)
        load_stage(stage, out / "m" / MODEL_FILE, i, license=lics[i], profile=device)
        for name, t in stage.state_dict().items():
            assert torch.equal(t, state[name]), name
        other = (i + 1) % 3
        with pytest.raises(ProfileError, match=f"does not hold group 'stage{other}'"):
            load_stage(build_stage(layout, other)[0], out / "m" / MODEL_FILE, other, license=lics[i],
                       profile=device)


def test_another_device_gets_wrong_weights_silently(locked):
    """pre-aes: the licence of another device unwraps a random key, so the stage decodes to other weights."""
    out, layout, state, lics = locked
    stage, _ = build_stage(layout, 1)
    load_stage(stage, out / "m" / MODEL_FILE, 1, license=lics[1], profile=make_device())
    floats = [n for n, t in stage.state_dict().items() if t.is_floating_point() and t.numel() > 16]
    assert floats and all(not torch.equal(stage.state_dict()[n], state[n]) for n in floats)


def test_stage_of_another_layout_is_refused(locked, device):
    out, layout, _, lics = locked
    wider = make_layout(ArchSpec("resnet18", width=8, image_size=8), 3)
    with pytest.raises(ContainerError, match="does not fit"):
        load_stage(build_stage(wider, 0)[0], out / "m" / MODEL_FILE, 0, license=lics[0], profile=device)


def test_save_stage_round_trip(tmp_path, locked, device):
    out, layout, state, _ = locked
    stage, _ = build_stage(layout, 2)
    stage.load_state_dict({n: state[n] for n in stage.state_dict()})
    save_stage(stage, tmp_path / "s2.chiplock", 2, content_keys_path=tmp_path / "s2.keys")
    lic = issue_stage_license(ContentKeys.load(tmp_path / "s2.keys"), device, 2)
    again, _ = build_stage(layout, 2)
    load_stage(again, tmp_path / "s2.chiplock", 2, license=lic, profile=device)
    assert all(torch.equal(t, state[n]) for n, t in again.state_dict().items())


def test_lock_split_profile_count(tmp_path):
    layout = make_layout(ArchSpec("mlp", width=8, image_size=8), 3)
    units, _ = build_units(layout.arch)
    with pytest.raises(ValueError, match="one profile"):
        lock_split(units, layout, tmp_path, keys_path=tmp_path / "k", profiles=[make_device(), make_device()])
