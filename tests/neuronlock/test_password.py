"""Neuron ranking, password derivation (HKDF-seeded), specs and the password's JSON form."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from chiplock.errors import ChiplockError, ContainerError, UnsupportedConfig
from chiplock.neuronlock import (
    KEY_BYTES,
    LayerPassword,
    NeuronStats,
    Password,
    PasswordSpec,
    default_layers,
    derive_password,
    rank_neurons,
)
from chiplock.softlock.model_io import build_architecture

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_architecture(arch, image_size=8, width=8)


def _stats(layer: str, importance, mean=None, std=None) -> NeuronStats:
    n = len(importance)
    return NeuronStats(layer, importance, [0.0] * n if mean is None else mean, [1.0] * n if std is None else std)


# --- default_layers -------------------------------------------------------------------------------------------------

def test_default_layers_smallcnn_skips_the_classifier():
    assert default_layers(_model("smallcnn")) == ["features.0", "features.3", "head.1"]


def test_default_layers_resnet18_every_conv_but_not_fc():
    model = _model("resnet18")
    layers = default_layers(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert layers == convs and "fc" not in layers and "conv1" in layers


@pytest.fixture(scope="module")
def gpt_model() -> nn.Module:
    """Built once: the first build imports transformers (seconds), which is not what the tests measure."""
    return _model("gpt").eval()


def test_default_layers_gpt_includes_mlp_and_attention_not_head(gpt_model):
    model = gpt_model
    layers = default_layers(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert layers == linears[:-1] and linears[-1] == "head"
    assert "body.layers.0.mlp.gate_proj" in layers and "embed" in layers


# --- rank_neurons ---------------------------------------------------------------------------------------------------

def _reference(act: torch.Tensor, conv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = act.detach().double()
    a = a.permute(0, 2, 3, 1) if conv else a
    a = a.reshape(-1, a.shape[-1]).numpy()
    return np.abs(a).mean(0), a.mean(0), a.std(0)


def test_rank_conv_stats_over_batch_and_all_positions():
    model = _model("smallcnn").eval()
    x = torch.rand(40, 1, 8, 8)
    stats = rank_neurons(model, x, ["features.0"], batch_size=7)
    imp, mean, std = _reference(model.features[0](x), conv=True)
    (st,) = stats
    assert st.layer == "features.0" and len(st) == model.features[0].out_channels
    np.testing.assert_allclose(st.importance, imp, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.mean, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.std, std, rtol=1e-5, atol=1e-7)


def test_rank_linear_stats_over_tokens(gpt_model):
    model = gpt_model
    x = torch.rand(16, 1, 8, 8)
    (st,) = rank_neurons(model, x, ["embed"])
    imp, mean, std = _reference(model.embed(x.reshape(16, 8, 8)), conv=False)
    assert len(st) == model.embed.out_features
    np.testing.assert_allclose(st.importance, imp, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.mean, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.std, std, rtol=1e-5, atol=1e-7)


def test_rank_default_layers_all_archs_and_restores_train_mode():
    for arch in ("smallcnn", "resnet18", "gpt"):
        model = _model(arch).train()
        stats = rank_neurons(model, torch.rand(8, 1, 8, 8))
        assert [s.layer for s in stats] == default_layers(model)
        assert model.training
        assert all(not any(m._forward_hooks) for m in model.modules())


def test_rank_accepts_batches_of_pairs():
    model = _model("smallcnn")
    x = torch.rand(20, 1, 8, 8)
    a = rank_neurons(model, x)
    b = rank_neurons(model, [(x[:13], torch.zeros(13)), (x[13:], torch.zeros(7))])
    for sa, sb in zip(a, b):
        np.testing.assert_allclose(sa.importance, sb.importance, rtol=1e-9)


def test_rank_rejects_missing_and_wrong_layers():
    model = _model("smallcnn")
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(UnsupportedConfig, match="no layer 'nope'.*default_layers"):
        rank_neurons(model, x, ["nope"])
    with pytest.raises(UnsupportedConfig, match="only Conv2d and Linear"):
        rank_neurons(model, x, ["features.1"])
    with pytest.raises(UnsupportedConfig, match="listed twice"):
        rank_neurons(model, x, ["features.0", "features.0"])
    with pytest.raises(UnsupportedConfig, match="list of module names"):
        rank_neurons(model, x, "features.0")
    with pytest.raises(UnsupportedConfig, match="empty"):
        rank_neurons(model, x[:0])
    assert all(not any(m._forward_hooks) for m in model.modules())


# --- derive_password ------------------------------------------------------------------------------------------------

KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def _wide_stats() -> list[NeuronStats]:
    rng = np.random.default_rng(0)
    return [_stats(f"l{i}", rng.uniform(0.1, 2.0, 64), rng.normal(0, 1, 64), rng.uniform(0.5, 1.5, 64))
            for i in range(3)]


def test_derive_is_deterministic_and_key_dependent():
    stats = _wide_stats()
    a1, a2, b = derive_password(KEY_A, stats), derive_password(KEY_A, stats), derive_password(KEY_B, stats)
    assert a1 == a2
    assert all(la.neurons != lb.neurons for la, lb in zip(a1.layers, b.layers))
    assert a1 != b


def test_many_keys_give_many_neuron_sets():
    stats = _wide_stats()[:1]
    sets = {derive_password(os.urandom(32), stats).layers[0].neurons for _ in range(60)}
    # C(32, 7) candidate sets: a collision among 60 draws is very unlikely; a key-independent draw gives 1 set.
    assert len(sets) >= 58


def test_count_pool_and_distinct():
    spec = PasswordSpec(gamma=0.1, pool=0.5)
    imp = np.linspace(2.0, 0.01, 64)  # neuron i ranks i-th, so the pool is neurons 0..31
    for key in (os.urandom(32) for _ in range(20)):
        (lp,) = derive_password(key, [_stats("l", imp)], spec).layers
        assert len(lp.neurons) == math.ceil(0.1 * 64) == 7
        assert len(set(lp.neurons)) == 7 and list(lp.neurons) == sorted(lp.neurons)
        assert max(lp.neurons) < 32


def test_count_at_least_one_and_exact_ceil():
    spec = PasswordSpec(gamma=0.1, pool=0.5)
    assert [spec.count(n) for n in (1, 3, 10, 11, 30, 64)] == [1, 1, 1, 2, 3, 7]
    (lp,) = derive_password(KEY_A, [_stats("tiny", [1.0, 2.0, 3.0])], spec).layers
    assert len(lp.neurons) == 1


def test_channel_zero_is_eligible():
    # Neuron 0 is the only candidate: EdgePro's code could never choose it.
    stats = [_stats("l", [9.0] + [1.0] * 9)]
    assert derive_password(KEY_A, stats, PasswordSpec(gamma=0.1, pool=0.1)).layers[0].neurons == (0,)
    uniform = [_stats("l", [1.0] * 8)]
    picks = [derive_password(os.urandom(32), uniform, PasswordSpec(gamma=0.125, pool=1.0)).layers[0].neurons[0]
             for _ in range(200)]
    assert picks.count(0) >= 8  # expected 25 of 200


def test_choice_is_weighted_by_importance():
    stats = [_stats("l", [9.0, 1.0, 0.0, 0.0])]
    spec = PasswordSpec(gamma=0.25, pool=0.5)  # one neuron from the top two, weights 9:1
    picks = [derive_password(os.urandom(32), stats, spec).layers[0].neurons[0] for _ in range(300)]
    assert set(picks) <= {0, 1}
    assert 0.8 <= picks.count(0) / 300 <= 0.97  # expected 0.9


def test_dead_neurons_can_still_be_drawn():
    (lp,) = derive_password(KEY_A, [_stats("l", [0.0] * 10, std=[0.0] * 10)], PasswordSpec(gamma=0.3, pool=0.5)).layers
    assert len(lp.neurons) == 3
    assert all(v != 0.0 for v in lp.values)  # the std floor moves a constant neuron off its natural value


def test_values_and_scale_in_range():
    stats = _wide_stats()
    spec = PasswordSpec()
    signs = set()
    for key in (os.urandom(32) for _ in range(10)):
        for lp, st in zip(derive_password(key, stats, spec).layers, stats):
            assert 1.5 <= lp.scale <= 3.0
            for i, v in zip(lp.neurons, lp.values):
                k = (v - st.mean[i]) / st.std[i]
                assert 2.0 - 1e-9 <= abs(k) <= 4.0 + 1e-9
                signs.add(k > 0)
    assert signs == {True, False}


def test_derivation_follows_the_documented_hkdf_recipe():
    st = _wide_stats()[0]
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"chiplock neuronlock v1\0" + st.layer.encode()).derive(KEY_A)
    rng = np.random.default_rng(int.from_bytes(raw, "little"))
    imp = np.asarray(st.importance)
    pool = np.argsort(-imp, kind="stable")[:32]
    expected = sorted(rng.choice(pool, size=7, replace=False, p=imp[pool] / imp[pool].sum()).tolist())
    assert list(derive_password(KEY_A, [st]).layers[0].neurons) == expected


def test_layers_draw_independently():
    # The same stats under two layer names must not give the same neurons (the layer name is in the HKDF info).
    rng = np.random.default_rng(1)
    imp = rng.uniform(0.5, 1.0, 64)
    pw = derive_password(KEY_A, [_stats("a", imp), _stats("b", imp)])
    assert pw.layers[0].neurons != pw.layers[1].neurons


@pytest.mark.parametrize("key", [bytes(31), bytes(33), b"", "k" * 32, 12345])
def test_derive_rejects_bad_keys(key):
    with pytest.raises(UnsupportedConfig, match=f"key must be {KEY_BYTES} bytes"):
        derive_password(key, _wide_stats())


def test_derive_rejects_bad_stats_and_spec():
    with pytest.raises(UnsupportedConfig, match="rank_neurons"):
        derive_password(KEY_A, [])
    with pytest.raises(UnsupportedConfig, match="twice"):
        derive_password(KEY_A, [_stats("l", [1.0]), _stats("l", [1.0])])
    with pytest.raises(UnsupportedConfig, match="PasswordSpec"):
        derive_password(KEY_A, _wide_stats(), {"gamma": 0.1})


def test_errors_are_chiplock_errors():
    assert issubclass(UnsupportedConfig, ChiplockError) and issubclass(ContainerError, ChiplockError)


# --- PasswordSpec and NeuronStats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"pool": 0.0}, "pool"),
    ({"gamma": 0.6, "pool": 0.5}, "pool"),
    ({"value_sigmas": (4.0, 2.0)}, "value_sigmas"), ({"value_sigmas": (-1.0, 2.0)}, "value_sigmas"),
    ({"scale_range": (0.0, 1.0)}, "scale_range"), ({"scale_range": (1.0,)}, "scale_range"),
    ({"scale_range": (1.0, float("inf"))}, "scale_range"), ({"version": 2}, "version"), ({"gamma": True}, "gamma"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PasswordSpec(**kwargs)


def test_spec_and_stats_json_round_trip():
    spec = PasswordSpec(gamma=0.05, pool=0.25, value_sigmas=[1.0, 3.0])
    assert spec.value_sigmas == (1.0, 3.0)
    assert PasswordSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ContainerError, match="gamma"):
        PasswordSpec.from_json({**spec.to_json(), "gamma": 7})
    st = _wide_stats()[0]
    assert NeuronStats.from_json(json.loads(json.dumps(st.to_json()))) == st
    with pytest.raises(ContainerError, match="unknown keys"):
        NeuronStats.from_json({**st.to_json(), "x": 1})


def test_stats_validation():
    with pytest.raises(ValueError, match="same non-zero length"):
        NeuronStats("l", (1.0, 2.0), (0.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        NeuronStats("l", (float("nan"),), (0.0,), (1.0,))
    with pytest.raises(ValueError, match=">= 0"):
        NeuronStats("l", (-1.0,), (0.0,), (1.0,))


# --- Password JSON --------------------------------------------------------------------------------------------------

def test_password_json_round_trip_exact():
    pw = derive_password(KEY_A, _wide_stats())
    text = json.dumps(pw.to_json())
    assert Password.from_json(json.loads(text)) == pw
    assert Password.from_json(text) == pw
    assert Password.from_json(text.encode()) == pw


def test_password_repr_hides_the_secret():
    pw = derive_password(KEY_A, _wide_stats())
    text = repr(pw) + repr(pw.layers[0])
    assert "<secret>" in text and str(pw.layers[0].neurons[0]) + "," not in text
    assert repr(pw.layers[0].values[0]) not in text


def _good() -> dict:
    return {"version": 1, "layers": [{"layer": "a", "neurons": [0, 3], "values": [0.5, -1.0], "scale": 2.0}]}


def _with(**layer) -> dict:
    d = _good()
    d["layers"][0].update(layer)
    return d


@pytest.mark.parametrize("bad,match", [
    ([], "JSON object"),
    ({"layers": []}, "missing keys"),
    ({**_good(), "key": "x"}, "unknown keys"),
    ({**_good(), "version": 2}, "version"),
    ({**_good(), "layers": {}}, "must be a list"),
    ({"version": 1, "layers": []}, "at least one layer"),
    ({"version": 1, "layers": _good()["layers"] * 2}, "twice"),
    (_with(neurons=[0, 0]), "distinct"),
    (_with(neurons=[-1, 2]), "non-negative"),
    (_with(neurons=[0, True]), "integers"),
    (_with(neurons=[0, 1.5]), "integers"),
    (_with(values=[0.5]), "same non-zero length"),
    (_with(values=["0.5", 1.0]), "numbers"),
    (_with(scale=0.0), "scale"),
    (_with(scale="2"), "scale"),
    (_with(layer=""), "layer"),
    (_with(neurons="01"), "lists"),
    ("{not json", "not valid JSON"),
    ('{"version": 1, "layers": [{"layer": "a", "neurons": [0], "values": [NaN], "scale": 1}]}', "NaN"),
])
def test_password_from_json_rejects_malformed(bad, match):
    with pytest.raises(ContainerError, match=match) as info:
        Password.from_json(bad)
    assert "derive_password" in str(info.value) or "to_json" in str(info.value) or "Password" in str(info.value)


def test_layer_password_coerces_numpy():
    lp = LayerPassword("a", np.array([3, 1]), np.array([0.5, 2.0], dtype=np.float32), np.float64(2.0))
    assert lp.neurons == (3, 1) and type(lp.neurons[0]) is int and type(lp.values[0]) is float
    lt = LayerPassword("a", torch.tensor([3, 1]), torch.tensor([0.5, 2.0]), torch.tensor(2.0))
    assert lt == lp
    assert Password((lp,)).layer("a") is lp
    with pytest.raises(UnsupportedConfig, match="does not lock layer 'b'"):
        Password((lp,)).layer("b")
