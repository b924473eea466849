"""NetSpec, SeqNet and TeeSliceNet: shapes, validation, determinism, the frozen backbone."""

from __future__ import annotations

import json

import pytest
import torch

from chiplock.enclave.models import NetSpec, SeqNet, TeeSliceNet, build, slice_widths
from chiplock.errors import EnclaveError

SMALL = NetSpec(image=8, widths=(4, 8, 8), fc=16)


@pytest.mark.parametrize("spec", [NetSpec(), SMALL, NetSpec(in_channels=3, image=9, widths=(5,), fc=7, classes=3)])
def test_shapes_match_forward(spec):
    net = build(spec).eval()
    assert len(net.units) == spec.units == len(spec.widths) + 2
    x = torch.rand(2, *spec.shapes()[0])
    for i in range(spec.units):
        x = net.forward_units(x, i, i + 1)
        assert tuple(x.shape[1:]) == spec.shapes()[i + 1], i
    assert x.shape == (2, spec.classes)


def test_num_params_counts_the_real_module():
    net = build(SMALL)
    real = sum(t.numel() for name, t in net.state_dict().items() if not name.endswith("num_batches_tracked"))
    assert SMALL.num_params == real


def test_state_dict_names_are_plain():
    names = set(build(SMALL).state_dict())
    assert {"units.0.lin.weight", "units.0.post.0.running_mean", "units.4.lin.bias"} <= names


@pytest.mark.parametrize("kwargs, match", [
    ({"in_channels": 0}, "in_channels"), ({"image": 3}, "image"), ({"image": 1000}, "image"),
    ({"widths": ()}, "widths"), ({"widths": (4,) * 9}, "widths"), ({"widths": (0, 4)}, "widths"),
    ({"widths": (True,)}, "widths"), ({"fc": 0}, "fc"), ({"classes": 1}, "classes"), ({"version": 2}, "version"),
    ({"image": 4, "widths": (4, 4, 4, 4, 4, 4)}, "too small"),
    ({"image": 256, "widths": (1024, 1024), "fc": 4096}, "cap"),
])
def test_netspec_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetSpec(**kwargs)


def test_json_round_trip():
    d = json.loads(json.dumps(SMALL.to_json()))
    assert NetSpec.from_json(d) == SMALL


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "JSON object"), ({"image": 8, "depth": 3}, "unknown fields"), ({"widths": "abc"}, "widths"),
    ({"widths": list(range(1, 20))}, "widths"), ({"image": "8"}, "image"), ({"fc": 1.5}, "fc"),
    ({"classes": True}, "classes"),
])
def test_from_json_raises_enclave_error(bad, match):
    with pytest.raises(EnclaveError, match=match):
        NetSpec.from_json(bad)


def test_build_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build(SMALL, seed=1), build(SMALL, seed=1), build(SMALL, seed=2)
    assert torch.equal(torch.rand(1), before)  # build() did not consume the caller's random stream
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name])
    assert not torch.equal(a.units[0].lin.weight, c.units[0].lin.weight)


def test_teeslice_backbone_is_frozen_copy():
    public = build(SMALL, seed=0)
    ts = TeeSliceNet(public, ratio=0.25, seed=0)
    assert ts.backbone.units[0].lin.weight.data_ptr() != public.units[0].lin.weight.data_ptr()
    assert all(not p.requires_grad for p in ts.backbone.parameters())
    ts.train()
    assert ts.training and not ts.backbone.training
    stats = ts.backbone.units[0].post[0].running_mean.clone()
    ts(torch.rand(8, 1, 8, 8)).sum().backward()
    assert torch.equal(stats, ts.backbone.units[0].post[0].running_mean)
    assert all(p.grad is not None for p in ts.slices.parameters())
    assert ts.head.weight.grad is not None


def test_teeslice_slice_widths_and_features():
    assert slice_widths(SMALL, 0.25) == [1, 2, 2, 4]
    assert slice_widths(SMALL, 1.0) == [4, 8, 8, 16]
    with pytest.raises(ValueError, match="ratio"):
        slice_widths(SMALL, 0.0)
    ts = TeeSliceNet(build(SMALL), ratio=0.5).eval()
    feats = ts.features(torch.rand(3, 1, 8, 8))
    assert [tuple(f.shape[1:]) for f in feats] == SMALL.shapes()[:SMALL.units]
    assert ts(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_teeslice_start(start):
    ts = TeeSliceNet(build(SMALL), ratio=0.25, start=start).eval()
    assert len(ts.slices) == len(SMALL.widths) - start + 1
    assert ts(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("start", [-1, 4, 1.0, None])
def test_teeslice_bad_start(start):
    if start is None:
        assert TeeSliceNet(build(SMALL)).start == 2  # the default skips the full-resolution block
        return
    with pytest.raises(ValueError, match="start"):
        TeeSliceNet(build(SMALL), start=start)


def test_teeslice_output_depends_on_slices():
    ts = TeeSliceNet(build(SMALL), ratio=0.25).eval()
    x = torch.rand(4, 1, 8, 8)
    before = ts(x)
    with torch.no_grad():
        ts.slices[0].lin.weight.add_(1.0)
    assert not torch.allclose(before, ts(x))
    assert isinstance(ts.backbone, SeqNet)
