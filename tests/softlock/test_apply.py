"""apply_config: layer swap, composition, state_dict compatibility, straight-through gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chiplock.errors import UnsupportedConfig
from chiplock_demo.models import SmallCNN, resnet18
from chiplock.softlock import (E4M3, FP16, Compose, Int8, MagnitudePruning, NMSparsity, apply_config,
                               parse_config, set_config, strip_config, using_config)
from chiplock.softlock.registry import config_from_dict, config_to_dict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallCNN(image_size=8, width=4).eval()


X = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_fp32_is_identity_and_original_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = apply_config(model, "fp32")(X)
    assert torch.equal(out, model(X))
    q = apply_config(model, "e4m3fn")
    assert type(model.features[0]) is torch.nn.Conv2d  # deep copy; the original is not converted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(q.state_dict()) == list(before)


def test_layer_runs_on_the_format(model):
    q = apply_config(model, E4M3())
    conv = q.features[0]
    seen = {}
    conv.register_forward_hook(lambda m, i, o: seen.update(out=o))
    q(X * 37.3)
    assert torch.equal(E4M3().round(seen["out"]), seen["out"])  # outputs are stored in the format
    w = E4M3().round(conv.weight)
    manual = E4M3().round(F.conv2d(E4M3().round(X * 37.3), w, conv.bias, padding=1))
    assert torch.equal(manual, seen["out"])


def test_composition_prunes_then_rounds(model):
    cfg = parse_config("2:4+fp16")
    assert cfg == Compose((NMSparsity(2, 4), FP16())) and cfg.name == "2:4+fp16"
    q = apply_config(model, cfg)
    layer = next(m for m in set_config(q, cfg).modules() if getattr(m, "in_channels", 0) >= 4)
    w = layer.weight
    eff = layer._softlock_handler.weight(w)
    assert torch.equal(eff, FP16().round(w * (eff != 0)))
    # Groups of 4 input channels at each kernel position (the hardware's grouping) keep at most 2.
    g = eff.movedim(1, -1)
    g = g[..., :g.shape[-1] // 4 * 4].reshape(*g.shape[:-1], -1, 4)
    assert ((g != 0).sum(-1) <= 2).all() and (eff == 0).any()


def test_reapplying_replaces_and_strip_restores(model):
    q = apply_config(model, "int8")
    apply_config(q, "fp32", inplace=True)
    assert torch.equal(q(X), model(X))
    strip_config(q)
    assert type(q.features[0]) is torch.nn.Conv2d


def test_using_config_restores_previous(model):
    q = apply_config(model, "int8")
    ref = q(X)
    with using_config(q, "e4m3fn"):
        assert not torch.equal(q(X), ref)
    assert torch.equal(q(X), ref)


def test_straight_through_gradient(model):
    q = apply_config(model, "e4m3fn")
    x = (X * 3).requires_grad_()
    q(x).sum().backward()
    g_q = x.grad.clone()
    assert torch.isfinite(g_q).all() and g_q.abs().sum() > 0
    w = q.features[0].weight
    assert w.grad is not None and w.grad.abs().sum() > 0  # gradient reaches the fp32 master weights


def test_resnet_shapes_and_conversion():
    for side in (28, 8):
        m = resnet18(width=4).eval()
        out = apply_config(m, Compose((MagnitudePruning(0.5), Int8())))(torch.rand(2, 1, side, side))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_config_dict_round_trip_and_errors():
    for name in ("fp32", "fp16", "bf16", "e4m3fnb11", "e5m2-inf", "int8-per_tensor-asym", "2:4", "prune0.05",
                 "2:4+e4m3fn"):
        cfg = parse_config(name)
        assert config_from_dict(config_to_dict(cfg)) == cfg
        assert parse_config(cfg.name) == cfg
    with pytest.raises(UnsupportedConfig, match="unknown configuration 'fp12'"):
        parse_config("fp12")
    with pytest.raises(UnsupportedConfig, match="unknown soft-lock configuration type"):
        config_from_dict({"type": "os.system"})
    with pytest.raises(UnsupportedConfig, match="not a soft-lock configuration"):
        apply_config(SmallCNN(), 3.5)
