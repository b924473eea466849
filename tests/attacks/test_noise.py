"""The noise attack (Figure 5): the noise is what it says, zero noise changes nothing, large noise breaks the
authorized configuration, and the report is complete."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chiplock.attacks import noise
from chiplock.errors import UnsupportedConfig


def _toy() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.BatchNorm1d(300), nn.Linear(300, 10))
    with torch.no_grad():  # as after training: a constant tensor has sd 0 and gets no noise
        model[1].weight.uniform_(0.5, 1.5)
    return model


def test_noise_has_the_asked_scale_and_leaves_buffers_and_the_model_alone():
    model = _toy()
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = noise.add_noise(model, 0.1, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"add_noise changed the input model's {k}"
    w, nw = model[0].weight.detach(), noisy[0].weight.detach()
    ratio = ((nw - w).std() / (0.1 * w.std(correction=0))).item()
    assert 0.95 < ratio < 1.05
    assert torch.equal(noisy[1].running_mean, model[1].running_mean)
    assert torch.equal(noisy[1].running_var, model[1].running_var)
    assert not torch.equal(noisy[1].weight, model[1].weight), "BatchNorm's affine parameters are parameters too"
    # Same seed, same noise; another seed, other noise.
    assert torch.equal(noise.add_noise(model, 0.1, seed=3)[0].weight, nw)
    assert not torch.equal(noise.add_noise(model, 0.1, seed=4)[0].weight, nw)


def test_mad_reference_ignores_a_few_huge_weights():
    model = _toy()
    with torch.no_grad():
        model[0].weight[0, :20] = 1000.0  # decoy-like outliers inflate the standard deviation
    w = model[0].weight.detach()
    robust = noise.tensor_scale(w, "mad")
    assert robust < w.std() / 10
    d = (noise.add_noise(model, 0.1, seed=0, reference="mad")[0].weight - w).std()
    assert 0.9 < (d / (0.1 * robust)).item() < 1.1
    d_std = (noise.add_noise(model, 0.1, seed=0, reference="std")[0].weight - w).std()
    assert d_std > 10 * d


@pytest.mark.parametrize("kwargs", [{"scale": -0.1}, {"scale": float("nan")}, {"scale": 0.1, "reference": "max"}])
def test_bad_noise_settings_raise(kwargs):
    with pytest.raises(UnsupportedConfig):
        noise.add_noise(_toy(), **kwargs)


def test_bad_run_settings_raise():
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        noise.run(preset="smoke", sigma=[0.1])
    with pytest.raises(UnsupportedConfig, match="references"):
        noise.run(preset="smoke", references=["max"])
    with pytest.raises(UnsupportedConfig, match="soft-lock pair"):
        noise.run(preset="smoke", pairs=["fp32->int3"])


@pytest.mark.slow
def test_zero_noise_reproduces_the_lock_and_large_noise_reaches_chance(tmp_path):
    res = noise.run(preset="smoke", pairs=["fp32->e4m3fn"], scales=[0.0, 3.0], seeds=2)
    pair = res.data["pairs"]["fp32->e4m3fn"]
    info, rows = pair["model"], pair["rows"]
    assert info["locked_authorized"] > 0.8 and info["locked_unauthorized"] < 0.3, "the smoke lock did not take"
    zero = [r for r in rows if r["scale"] == 0]
    assert len(zero) == 1
    assert zero[0]["authorized"] == info["locked_authorized"]
    assert zero[0]["unauthorized"] == info["locked_unauthorized"]
    assert zero[0]["deployed"] is not None  # e4m3fn is also run as deployed (per-channel amax)
    big = [r for r in rows if r["scale"] == 3.0]
    assert len(big) == 2
    assert all(r["authorized"] < 0.3 for r in big)  # 10 classes: chance is 0.1
    head = res.tables[0].rows[0]
    assert head[0] == "fp32->e4m3fn" and head[5] >= info["locked_unauthorized"]
    paths = res.save(tmp_path)
    assert paths["png"].stat().st_size > 1000 and "Noise attack" in paths["md"].read_text()
