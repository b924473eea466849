"""Lock training, evaluation and latency measurement of neuron authorization locks (digits8, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.neuronlock import PasswordSpec, derive_password, rank_neurons
from chiplock.neuronlock.train import LockMode, NeuronLockConfig, evaluate, latency_overhead, lock_train
from chiplock.softlock.model_io import build_architecture

pytest.importorskip("sklearn")

KEY = bytes(range(32))
WRONG_KEYS = [bytes([i]) * 32 for i in range(1, 6)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def original(digits):
    from chiplock_demo.training import train_classifier

    torch.manual_seed(0)
    model = build_architecture("smallcnn", image_size=8, width=8)
    train_classifier(model, digits.x_train, digits.y_train, epochs=10, lr=2e-3)
    stats = rank_neurons(model, digits.x_train[:512])
    return model, stats, derive_password(KEY, stats)


@pytest.fixture(scope="module")
def locked(digits, original):
    model, stats, pw = original
    model = copy.deepcopy(model)
    cfg = NeuronLockConfig(epochs=10, lr=3e-3, wrong_fraction=0.0)
    return model, lock_train(model, digits.x_train, digits.y_train, pw, cfg, stats=stats)


def test_lock_train_moves_natural_to_chance_and_keeps_authorized(digits, original, locked):
    orig_model, _, pw = original
    model, res = locked
    orig = evaluate(orig_model, digits.x_test, digits.y_test)
    assert orig > 0.9
    # Before lock training the natural model is the original and the password breaks it.
    assert evaluate(orig_model, digits.x_test, digits.y_test, pw) < orig - 0.3
    auth = evaluate(model, digits.x_test, digits.y_test, pw)
    natural = evaluate(model, digits.x_test, digits.y_test)
    assert auth >= orig - 0.03
    assert natural <= 0.25
    assert res.steps == 10 * 23 and len(res.history) == 10
    assert res.history[-1]["train_acc_unauth"] < res.history[0]["train_acc_unauth"] - 0.3
    assert not model.training


def test_alternate_mode_locks_too(digits, original):
    model, pw = copy.deepcopy(original[0]), original[2]
    cfg = NeuronLockConfig(epochs=10, lr=3e-3, mode=LockMode.ALTERNATE, wrong_fraction=0.0)
    res = lock_train(model, digits.x_train, digits.y_train, pw, cfg)
    assert res.steps == 2 * 10 * 23
    assert cfg.mode == "alternate"
    assert evaluate(model, digits.x_test, digits.y_test, pw) >= 0.9
    assert evaluate(model, digits.x_test, digits.y_test) <= 0.4


@pytest.mark.slow
def test_wrong_passwords_are_near_chance_on_average(digits):
    from chiplock_demo.training import train_classifier

    torch.manual_seed(0)
    model = build_architecture("smallcnn", image_size=8, width=16)
    train_classifier(model, digits.x_train, digits.y_train, epochs=10, lr=2e-3)
    stats = rank_neurons(model, digits.x_train[:512])
    pw = derive_password(KEY, stats)
    cfg = NeuronLockConfig(epochs=10, lr=3e-3, wrong_fraction=0.5)
    lock_train(model, digits.x_train, digits.y_train, pw, cfg, stats=stats)
    wrong = [evaluate(model, digits.x_test, digits.y_test, derive_password(k, stats)) for k in WRONG_KEYS]
    assert evaluate(model, digits.x_test, digits.y_test, pw) >= 0.85
    assert sum(wrong) / len(wrong) <= 0.2 and max(wrong) <= 0.3, wrong


def test_lock_train_is_deterministic_and_reports_progress(digits, original):
    model, stats, pw = original
    x, y = digits.x_train[:256], digits.y_train[:256]
    cfg = NeuronLockConfig(epochs=1, batch_size=64)
    calls = []
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    lock_train(a, x, y, pw, cfg, stats=stats, progress=lambda s, t: calls.append((s, t)))
    lock_train(b, x, y, pw, cfg, stats=stats)
    assert calls == [(i, 4) for i in range(1, 5)]
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    c = copy.deepcopy(model)
    lock_train(c, x, y, pw, NeuronLockConfig(epochs=1, batch_size=64, seed=1), stats=stats)
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_batchnorm_statistics_stay_frozen(digits):
    torch.manual_seed(0)
    model = build_architecture("resnet18", image_size=8, width=4)
    stats = rank_neurons(model, digits.x_train[:128])
    pw = derive_password(KEY, stats)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("conv1.weight")}
    lock_train(model, digits.x_train[:128], digits.y_train[:128], pw, NeuronLockConfig(epochs=1, batch_size=64))
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(not torch.equal(v, after[k]) for k, v in weights.items())


def test_evaluate_restores_mode_and_leaves_no_hook(digits, locked):
    model, _ = locked
    pw = derive_password(KEY, rank_neurons(model, digits.x_train[:64]))
    model.train()
    try:
        evaluate(model, digits.x_test[:50], digits.y_test[:50], pw)
        assert model.training
        assert all(not m._forward_hooks for m in model.modules())
    finally:
        model.eval()


def test_latency_overhead_reports_medians(digits, locked, original):
    model, _ = locked
    r = latency_overhead(model, original[2], digits.x_test[:64], repeats=5, warmup=1)
    assert set(r) == {"plain_s", "locked_s", "overhead", "wall_plain_s", "wall_locked_s", "wall_overhead", "repeats",
                      "batch", "threads"}
    assert r["plain_s"] > 0 and r["locked_s"] > 0 and r["repeats"] == 5 and r["batch"] == 64
    assert r["overhead"] == pytest.approx(r["locked_s"] / r["plain_s"] - 1)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(UnsupportedConfig, match="repeats"):
        latency_overhead(model, original[2], digits.x_test[:8], repeats=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "random"}, "mode"), ({"unauth_weight": -1.0}, "unauth_weight"), ({"lr": 0.0}, "lr"),
    ({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"wrong_fraction": 1.5}, "wrong_fraction"),
    ({"spec": "default"}, "spec"), ({"version": 2}, "version"), ({"epochs": 2.5}, "epochs"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronLockConfig(**kwargs)


def test_config_defaults():
    cfg = NeuronLockConfig()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.unauth_weight, cfg.mode, cfg.wrong_fraction, cfg.version) == (
        3, 1e-3, 64, 1.0, "mixed", 0.25, 1)
    assert cfg.spec == PasswordSpec()


def test_bad_inputs_raise_chiplock_errors(digits, original):
    model, stats, pw = original
    x, y = digits.x_train[:64], digits.y_train[:64]
    with pytest.raises(UnsupportedConfig, match="one integer label per sample"):
        lock_train(copy.deepcopy(model), x, y[:10], pw)
    with pytest.raises(UnsupportedConfig, match="integer class labels"):
        evaluate(model, x, y.float())
    with pytest.raises(UnsupportedConfig, match="Password"):
        lock_train(copy.deepcopy(model), x, y, pw.to_json())
    with pytest.raises(UnsupportedConfig, match="NeuronLockConfig"):
        lock_train(copy.deepcopy(model), x, y, pw, {"epochs": 1})
    other = build_architecture("resnet18", image_size=8, width=4)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(UnsupportedConfig, match="the model lacks"):
        lock_train(other, x, y, pw, NeuronLockConfig(epochs=1))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
