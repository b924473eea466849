"""The retraining attack's mechanics on a tiny ResNet (digits 8x8): subsets, baseline, fields, determinism."""

import math

import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.softlock import retrain as retrain_mod
from chiplock.softlock.apply import _SoftLayer
from chiplock.softlock.retrain import RetrainResult, retrain_attack, stratified_subset
from chiplock_demo.data import load_digits8
from chiplock_demo.models import resnet18
from chiplock_demo.training import train_classifier


@pytest.fixture(scope="module")
def data():
    return load_digits8(seed=0)


@pytest.fixture(scope="module")
def locked(data):
    # A briefly trained tiny model stands in for a locked one: the mechanics do not depend on the lock.
    torch.manual_seed(0)
    model = resnet18(10, 1, 4)
    return train_classifier(model, data.x_train, data.y_train, epochs=1, seed=0)


def _run(locked, data, **kw):
    kw.setdefault("fractions", (0.05, 0.2))
    kw.setdefault("epochs", 1)
    return retrain_attack(locked, "int8", data.x_train, data.y_train, data.x_test[:200], data.y_test[:200], **kw)


def test_stratified_subset_is_per_class_nested_and_deterministic(data):
    y = data.y_train
    small, large = stratified_subset(y, 0.1, seed=3), stratified_subset(y, 0.5, seed=3)
    assert torch.equal(small, stratified_subset(y, 0.1, seed=3))
    assert not torch.equal(small, stratified_subset(y, 0.1, seed=4))
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((y[small] == c).sum()) == max(1, round(0.1 * n_c))
        assert int((y[large] == c).sum()) == max(1, round(0.5 * n_c))
    assert set(small.tolist()) <= set(large.tolist())
    assert torch.equal(stratified_subset(y, 1.0), torch.arange(len(y)))
    # A fraction too small for some classes still keeps one sample of each.
    assert sorted(y[stratified_subset(y, 1e-6)].tolist()) == list(range(10))


def test_result_fields_and_fractions_respected(data, locked):
    before = {k: v.clone() for k, v in locked.state_dict().items()}
    res = _run(locked, data, authorized="fp32")
    assert isinstance(res, RetrainResult)
    assert (res.target, res.config, res.authorized, res.pre_steps) == ("int8", "int8", "fp32", ())
    assert [r.fraction for r in res.rows] == [0.05, 0.2]
    for r in res.rows:
        assert r.samples == len(stratified_subset(data.y_train, r.fraction, seed=0))
        assert r.steps == r.epochs * math.ceil(r.samples / 64)
        for acc in (r.unauthorized_accuracy, r.authorized_accuracy, r.scratch_accuracy):
            assert 0.0 <= acc <= 1.0
        assert r.retrain_seconds > 0 and r.scratch_seconds > 0
    assert res.rows[0].samples < res.rows[1].samples
    d = res.to_dict()
    assert set(d["rows"][0]) >= {"fraction", "samples", "steps", "unauthorized_accuracy", "authorized_accuracy",
                                 "scratch_accuracy", "retrain_seconds", "scratch_seconds",
                                 "recovered_less_than_scratch"}
    assert d["settings"]["epochs"] == 1 and d["settings"]["batch_size"] == 64
    # The locked model itself is never modified (each fraction starts from a copy).
    assert all(torch.equal(before[k], v) for k, v in locked.state_dict().items())
    assert not any(isinstance(m, _SoftLayer) for m in locked.modules())


def test_scratch_baseline_gets_the_same_data_config_and_budget(data, locked, monkeypatch):
    calls = []
    real_fit = retrain_mod._fit

    def spy(model, cfg, x, y, **kw):
        handlers = []
        hook = model.register_forward_pre_hook(
            lambda m, a: handlers.extend(type(s._softlock_handler).__name__ for s in m.modules()
                                         if isinstance(s, _SoftLayer)))
        calls.append({"model": model, "cfg": cfg.name, "x": x.clone(), "y": y.clone(), "kw": kw,
                      "handlers": handlers, "before": [p.detach().clone() for p in model.parameters()]})
        try:
            return real_fit(model, cfg, x, y, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(retrain_mod, "_fit", spy)
    _run(locked, data, fractions=(0.1,), lr=1e-3, scratch_lr=2e-3)
    assert len(calls) == 2
    retrain, scratch = calls
    assert torch.equal(retrain["x"], scratch["x"]) and torch.equal(retrain["y"], scratch["y"])
    assert retrain["cfg"] == scratch["cfg"] == "int8"
    assert {k: v for k, v in retrain["kw"].items() if k != "lr"} == \
        {k: v for k, v in scratch["kw"].items() if k != "lr"}
    assert (retrain["kw"]["lr"], scratch["kw"]["lr"]) == (1e-3, 2e-3)
    # Every training forward runs on the unauthorized configuration (straight-through, as lock training does).
    for call in calls:
        assert call["handlers"] and set(call["handlers"]) == {"Int8Handler"}
    # The retraining starts from the locked weights, the baseline from a fresh initialisation.
    locked_params = list(locked.parameters())
    assert all(torch.equal(a, b) for a, b in zip(retrain["before"], locked_params))
    assert not torch.equal(scratch["before"][0], locked_params[0])


def test_deterministic(data, locked):
    def strip(d):
        for r in d["rows"]:
            r.pop("retrain_seconds"), r.pop("scratch_seconds")
        d.pop("pre_seconds")
        return d

    a = strip(_run(locked, data, fractions=(0.1,), seed=1).to_dict())
    b = strip(_run(locked, data, fractions=(0.1,), seed=1).to_dict())
    assert a == b


def test_pre_steps_change_the_retraining_config(data, locked, monkeypatch):
    deploy = pytest.importorskip("chiplock.softlock.deploy", reason="the deployment library does not import")
    from chiplock.softlock.registry import parse_config

    name = "test-retrain-per-tensor"
    if name not in deploy.STEPS:
        deploy.register_step(name, lambda m, cfg, calib: (m, parse_config("int8-per_tensor")),
                             lambda cfg: False, standard=False, doc="test only: switch to per-tensor int8")
    seen = []
    real_fit = retrain_mod._fit
    monkeypatch.setattr(retrain_mod, "_fit", lambda m, cfg, *a, **kw: seen.append(cfg.name) or real_fit(m, cfg, *a,
                                                                                                        **kw))
    res = _run(locked, data, fractions=(0.05,), pre_steps=(name,))
    assert (res.target, res.config, res.pre_steps) == ("int8", "int8-per_tensor", (name,))
    assert seen == ["int8-per_tensor", "int8-per_tensor"]


@pytest.mark.parametrize("kw", [{"fractions": (0.0,)}, {"fractions": (1.5,)}, {"fractions": ()}, {"epochs": 0},
                                {"lr": 0.0}, {"batch_size": 0}])
def test_bad_arguments_raise(data, locked, kw):
    with pytest.raises(UnsupportedConfig):
        _run(locked, data, **kw)


def test_bad_config_and_lengths_raise(data, locked):
    with pytest.raises(UnsupportedConfig):
        retrain_attack(locked, "int99x", data.x_train, data.y_train, data.x_test, data.y_test)
    with pytest.raises(UnsupportedConfig, match="matching lengths"):
        retrain_attack(locked, "int8", data.x_train, data.y_train[:-1], data.x_test, data.y_test)


def test_model_without_reset_parameters_needs_build(data):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
            self.gain = torch.nn.Parameter(torch.ones(10))

        def forward(self, x):
            return self.fc(x.flatten(1)) * self.gain

    model = Scaled()
    with pytest.raises(UnsupportedConfig, match="build="):
        _run(model, data, fractions=(0.05,))
    res = _run(model, data, fractions=(0.05,), build=Scaled)
    assert len(res.rows) == 1
