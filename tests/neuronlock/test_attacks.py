"""The neuron-lock attacks: the mechanics that can fail (folding, brute force, scores, pruning) and the smoke run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from chiplock.errors import UnsupportedConfig  # noqa: E402
from chiplock.neuronlock import LayerPassword, Password, apply_password  # noqa: E402
from chiplock.neuronlock import attacks  # noqa: E402
from chiplock.softlock.pipeline import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def locked():
    """SmallCNN width 8 on 8x8 digits, locked on its first conv only (8 channels, one authorization neuron)."""
    data = load_dataset("digits8")
    params = dict(attacks.PRESETS["smoke"], pretrain_epochs=10, lock_epochs=10, lock_lr=3e-3)
    lk = attacks._lock("smallcnn", data, params, ["features.0"], "test")
    return lk, data


def _tiny():
    torch.manual_seed(0)
    from chiplock.softlock.model_io import build_architecture

    return build_architecture("smallcnn", image_size=8, width=4).eval()


@pytest.mark.slow  # shares a ~10 s lock-trained fixture
def test_fold_with_true_password_matches_the_hooks(locked):
    lk, data = locked
    model, pw = lk["model"], lk["password"]
    folded = attacks.fold_password(model, pw)
    with apply_password(model, pw):
        want = model(data.x_test)
    got = folded(data.x_test)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    acc = attacks._acc(folded, data.x_test, data.y_test)
    assert abs(acc - lk["authorized"]) < 1e-9
    # The original is untouched and the fold is not a no-op: the natural model differs.
    assert not torch.allclose(model(data.x_test), want, atol=1e-3)


def test_fold_into_layers_without_bias_is_exact():
    # ResNet convolutions have no bias: the fold must add one and still match the hooks (BatchNorm after it).
    from chiplock.softlock.model_io import build_architecture

    torch.manual_seed(0)
    model = build_architecture("resnet18", image_size=8, width=4).eval()
    assert model.conv1.bias is None
    pw = Password(layers=(LayerPassword("conv1", (0, 3), (1.5, -2.0), 2.0),
                          LayerPassword("layer1.0.conv2", (1,), (0.7,), 1.0)))
    x = torch.rand(5, 1, 8, 8)
    with apply_password(model, pw):
        want = model(x)
    folded = attacks.fold_password(model, pw)
    assert torch.allclose(folded(x), want, atol=1e-5)
    assert model.conv1.bias is None


@pytest.mark.slow  # shares a ~10 s lock-trained fixture
def test_fold_with_random_neurons_does_not_recover(locked):
    lk, data = locked
    model, pw = lk["model"], lk["password"]
    decoy = attacks._random_neurons(model, pw, np.random.default_rng(0))
    assert set(decoy.layers[0].neurons).isdisjoint(pw.layers[0].neurons)
    acc = attacks._acc(attacks.fold_password(model, decoy), data.x_test, data.y_test)
    assert lk["authorized"] > 0.85
    assert acc < lk["authorized"] - 0.3


@pytest.mark.slow  # shares a ~10 s lock-trained fixture
def test_brute_force_finds_the_password_in_a_tiny_space(locked):
    lk, data = locked
    model, pw, stats = lk["model"], lk["password"], lk["stats"]
    xa, ya = attacks._attacker_set(data, 0.02, 16, 0)
    ranked = attacks.brute_force(model, "features.0", 1, stats[0], xa, ya)
    assert len(ranked) == 8 * 3 * 3 * 2
    best = ranked[0]
    assert best["neurons"] == pw.layers[0].neurons
    guess = Password(layers=(LayerPassword("features.0", best["neurons"], best["values"], 1.0),))
    assert attacks._acc(model, data.x_test, data.y_test, guess) > lk["authorized"] - 0.1


def test_brute_force_refuses_a_large_search():
    with pytest.raises(UnsupportedConfig, match="max_candidates"):
        model = _tiny()
        from chiplock.neuronlock import rank_neurons

        st = rank_neurons(model, torch.rand(8, 1, 8, 8), ["features.0"])[0]
        attacks.brute_force(model, "features.0", 2, st, torch.rand(4, 1, 8, 8), max_candidates=10)


def test_constants_hook_matches_apply_password_and_removes_itself():
    model = _tiny()
    x = torch.rand(6, 1, 8, 8)
    plain = model(x)
    pw = Password(layers=(LayerPassword("features.0", (1, 2), (0.5, -1.0), 3.0),
                          LayerPassword("head.1", (7,), (2.0,), 1.5)))
    with apply_password(model, pw):
        want = model(x)
    with attacks.constants(model, {"features.0": ((1, 2), torch.tensor([1.5, -3.0])),
                                   "head.1": ((7,), torch.tensor([3.0]))}):
        got = model(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(model(x), plain)
    with pytest.raises(UnsupportedConfig, match="not a Conv2d or Linear"):
        with attacks.constants(model, {"features.1": ((0,), torch.tensor([1.0]))}):
            pass


def test_prune_global_zeroes_the_smallest_fraction():
    model = _tiny()
    pruned = attacks.prune_global(model, 0.3)
    ws = [m.weight for m in pruned.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in ws)
    total = sum(w.numel() for w in ws)
    assert abs(zeros / total - 0.3) < 0.01
    kept = torch.cat([w[w != 0].abs() for w in ws]).min()
    orig = torch.cat([m.weight.detach().abs().reshape(-1) for m in model.modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert int((orig < kept).sum()) <= zeros
    assert all(int((m.weight == 0).sum()) == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(UnsupportedConfig, match="fraction"):
        attacks.prune_global(model, 1.0)


def test_precision_at_k_counts_hits_in_either_direction():
    truth = {"a": (0, 1), "b": (3,)}
    high = attacks.precision_at_k({"a": np.array([9.0, 8, 1, 2]), "b": np.array([0.0, 1, 2, 5])}, truth)
    assert high["precision"] == 1.0 and high["direction"] == "high" and high["auc"] == 1.0
    assert high["chance"] == 3 / 8
    low = attacks.precision_at_k({"a": np.array([-9.0, -8, 1, 2]), "b": np.array([0.0, 1, 2, -5])}, truth)
    assert low["precision"] == 1.0 and low["direction"] == "low"
    miss = attacks.precision_at_k({"a": np.array([1.0, 1.5, 0.0, 3]), "b": np.array([0.0, 1, 9, 5])}, truth)
    assert miss["precision"] < 1.0


@pytest.mark.slow  # shares a ~10 s lock-trained fixture
def test_fit_constants_with_known_neurons_beats_random_neurons(locked):
    lk, data = locked
    model, pw, stats = lk["model"], lk["password"], lk["stats"]
    xa, ya = attacks._attacker_set(data, 0.02, 32, 0)
    init = {"features.0": ([stats[0].mean[c] for c in pw.layers[0].neurons],
                           [stats[0].std[c] for c in pw.layers[0].neurons])}
    before = copy.deepcopy(model.state_dict())
    fitted = attacks.fit_constants(model, {"features.0": pw.layers[0].neurons}, xa, ya, init=init, steps=60,
                                   restarts=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    acc = attacks._acc(model, data.x_test, data.y_test, fitted)
    assert acc > lk["natural"] + 0.2


def test_run_rejects_unknown_settings():
    with pytest.raises(UnsupportedConfig, match="unknown preset"):
        attacks.run(preset="huge")
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        attacks.run(preset="smoke", bogus=1)
    with pytest.raises(UnsupportedConfig, match="fractions"):
        attacks.run(preset="smoke", ft_fractions=[0.0])


@pytest.mark.slow
def test_smoke_run_reports_every_attack(tmp_path):
    seen = []
    # The harness end to end on cheap settings (lock quality is the fixture's business, not this test's).
    result = attacks.run(preset="smoke", progress=lambda stage, done, total: seen.append((done, total)),
                         pretrain_epochs=3, lock_epochs=2, prune_ratios=[0.3], wrong_keys=3, det_batches=3,
                         fit_steps=20, fit_restarts=1, bf_sigmas=[3.0], bf_scales=[2.0])
    assert result.name == "neuronlock"
    kinds = {row[0] for row in result.tables[0].rows}
    assert {"lock", "wrong password", "fine-tune", "prune", "fold (neurons + values known)", "fold (random neurons)",
            "fit constants (neurons known)", "find neurons", "detect wrong password", "brute force"} <= kinds
    arch = result.data["archs"]["smallcnn"]
    assert arch["fold_known"] == pytest.approx(arch["authorized"], abs=1e-9)
    assert 0.5 <= arch["detect"]["max-prob"]["batch_auc"] <= 1.0
    assert seen and seen[-1][0] == seen[-1][1]
    paths = result.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and "brute force" in paths["md"].read_text()


def test_per_arch_settings():
    assert attacks._per_arch(2e-3, "resnet18") == 2e-3
    assert attacks._per_arch({"resnet18": 1e-3, "default": 3e-3}, "resnet18") == 1e-3
    assert attacks._per_arch('{"default": 3e-3}', "smallcnn") == 3e-3
    with pytest.raises(UnsupportedConfig, match="no entry"):
        attacks._per_arch({"resnet18": 1e-3}, "gpt")
    assert attacks._per_arch({"resnet18": 8, "default": 3}, "smallcnn", int) == 3
    with pytest.raises(UnsupportedConfig, match="positive"):
        attacks._per_arch(-1.0, "gpt")
    with pytest.raises(UnsupportedConfig, match="whole number"):
        attacks._per_arch(2.5, "gpt", int)
    with pytest.raises(UnsupportedConfig, match="JSON object"):
        attacks._per_arch("fast", "gpt")
