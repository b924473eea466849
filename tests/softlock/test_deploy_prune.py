"""Calibration-based pruning steps (magnitude, Wanda, SparseGPT) for sparsity targets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.softlock import MagnitudePruning, NMSparsity, apply_config, parse_config
from chiplock.softlock.deploy import Calibration, attack_table, recipes_for, run_recipe
from chiplock.softlock.deploy import prune as P
from chiplock.softlock.nm_sparsity import nm_mask
from chiplock.softlock.registry import get_handler
from chiplock_demo.models import resnet18

TARGETS = ["prune0.5", "2:4", "2:4-flat", "1:4"]


@pytest.fixture(scope="module")
def tiny():
    """ResNet-18 width 4 with non-trivial BatchNorm statistics, and 64 calibration images of 8x8."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = resnet18(10, 1, 4)
    x = torch.rand(96, 1, 8, 8, generator=g)
    model.train()
    with torch.no_grad():
        model(x)  # Running statistics that differ from the defaults.
    return model.eval(), Calibration(x[:64]), x[64:]


def _satisfies(w: torch.Tensor, cfg) -> bool:
    """The target's constraint, checked independently of both the pruning code and the target's handler."""
    if isinstance(cfg, MagnitudePruning):
        return int((w == 0).sum()) >= int(cfg.level * w.numel())
    if cfg.order == "channel" and w.dim() == 4:
        rows = w.movedim(1, -1).reshape(-1, w.shape[1])
    else:
        rows = w.reshape(w.shape[0], -1)
    rows = F.pad(rows, (0, (-rows.shape[1]) % cfg.m))
    return bool(((rows.reshape(rows.shape[0], -1, cfg.m) != 0).sum(-1) <= cfg.n).all())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("step", [P.magnitude_prune, P.wanda_prune, P.sparsegpt_prune])
def test_pruned_weights_satisfy_the_target_so_it_is_a_no_op(tiny, step, target):
    model, calib, x_test = tiny
    cfg = parse_config(target)
    pruned = step(copy.deepcopy(model), cfg, calib)
    handler = get_handler(cfg)
    for name, layer in P.prunable_layers(pruned):
        w = layer.weight.detach()
        assert _satisfies(w, cfg), name
        assert torch.equal(handler.weight(w), w), name  # The target leaves every surviving weight as it is.
    with torch.no_grad():
        plain = pruned(x_test)
        deployed = apply_config(pruned, cfg)(x_test)
    assert torch.equal(plain, deployed)


def test_unstructured_counts_are_exact_per_layer():
    # Tanh and a kernel that always overlaps the image: no input column is ever all zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6 * 36, 10)).eval()
    calib = Calibration(torch.randn(32, 2, 6, 6))
    for level in (0.3, 0.5, 0.77):
        for step in (P.wanda_prune, P.sparsegpt_prune):
            pruned = step(copy.deepcopy(model), MagnitudePruning(level), calib)
            for name, layer in P.prunable_layers(pruned):
                # Dense random weights: exactly floor(p * n) zeros, none fewer and (almost surely) none more.
                assert int((layer.weight == 0).sum()) == int(level * layer.weight.numel()), (step.__name__, name)


def test_sparsegpt_counts_dead_inputs_towards_the_level():
    g = torch.Generator().manual_seed(4)
    x, w = _correlated(g)
    x[:, :40] = 0  # 40 of 64 inputs never fire: their weights are zeroed first and count towards the level.
    out = P.sparsegpt_weight(w, x.double().T @ x.double(), MagnitudePruning(0.75))
    assert (out[:, :40] == 0).all()
    assert int((out == 0).sum()) == int(0.75 * w.numel())


@pytest.mark.parametrize("shape", [(8, 8, 3, 3), (5, 6, 3, 3), (3, 1, 3, 3), (4, 12, 1, 1), (7, 10)])
@pytest.mark.parametrize("order", ["channel", "flat"])
def test_hardware_groups_are_the_targets_groups(shape, order):
    cfg = NMSparsity(2, 4, order=order)
    groups = P.hardware_groups(cfg, shape)
    real = groups[groups >= 0]
    assert sorted(real.tolist()) == list(range(torch.Size(shape[1:]).numel()))  # A partition of the columns.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    # The two best of each returned group is the target's own mask.
    assert torch.equal(P._mask_from_groups(w.abs(), groups, 2), nm_mask(w, 2, 4, order=order))
    if order == "channel" and len(shape) == 4 and shape[1] >= 4:
        assert groups[0].tolist() == [0, shape[2] * shape[3], 2 * shape[2] * shape[3], 3 * shape[2] * shape[3]]


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1, stride=2),
                                dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
                                dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding=1, padding_mode="reflect")])
def test_conv_input_statistics_are_those_of_im2col(kw):
    conv = nn.Conv2d(3, 5, **kw)
    x = torch.randn(4, 3, 9, 10, generator=torch.Generator().manual_seed(5))
    stats = P._Stats(conv, True, 10 ** 9, len(x))
    stats.add(x)
    xp = P._padded(conv, x)
    assert torch.allclose(F.conv2d(xp, conv.weight, conv.bias, conv.stride, 0, conv.dilation), conv(x), atol=1e-5)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    cols = cols.reshape(-1, cols.shape[-1]).double()
    assert torch.allclose(stats.sq, (cols ** 2).sum(0))
    assert torch.allclose(stats.h, cols.T @ cols, rtol=1e-4, atol=1e-3)


def _correlated(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    return x, torch.randn(16, 64, generator=g)


@pytest.mark.parametrize("target", ["prune0.5", "2:4"])
def test_sparsegpt_reconstructs_a_layer_better_than_magnitude(target):
    x, w = _correlated(torch.Generator().manual_seed(0))
    cfg = parse_config(target)
    h = x.double().T @ x.double()
    w_sgpt = P.sparsegpt_weight(w, h, cfg)
    w_mag = get_handler(cfg).weight(w)
    assert _satisfies(w_sgpt, cfg) and torch.equal(get_handler(cfg).weight(w_sgpt), w_sgpt)

    def err(a: torch.Tensor) -> float:
        return float(((x @ (a - w).T) ** 2).sum())
    assert err(w_sgpt) < 0.3 * err(w_mag)


def test_sparsegpt_through_the_model_uses_the_layer_inputs():
    g = torch.Generator().manual_seed(1)
    x, w = _correlated(g)
    model = nn.Sequential(nn.Linear(64, 16, bias=False))
    model[0].weight.data = w.clone()
    P.sparsegpt_prune(model, MagnitudePruning(0.5), Calibration(x))
    expected = P.sparsegpt_weight(w, x.double().T @ x.double(), MagnitudePruning(0.5))
    assert torch.allclose(model[0].weight, expected, atol=1e-5)


def test_wanda_ranks_by_weight_times_input_norm():
    g = torch.Generator().manual_seed(2)
    scales = torch.exp(2 * torch.randn(32, generator=g))  # Input features of very different sizes.
    x = torch.randn(256, 32, generator=g) * scales
    model = nn.Sequential(nn.Linear(32, 8))
    w = model[0].weight.detach().clone()
    P.wanda_prune(model, MagnitudePruning(0.5), Calibration(x))
    keep = model[0].weight != 0
    # Independent reference: the 16 best |W_ij| * ||X_j|| of each row.
    score = w.abs() * x.norm(dim=0)
    expected = torch.zeros_like(keep).scatter_(1, score.topk(16, dim=1).indices, True)
    assert torch.equal(keep, expected)
    assert not torch.equal(keep, get_handler(MagnitudePruning(0.5)).weight(w) != 0)  # Magnitude chooses otherwise.
    assert torch.equal(model[0].weight[keep], w[keep])  # Wanda does not update the survivors.

    def err(a: torch.Tensor) -> float:
        return float(((x @ (a.detach() - w).T) ** 2).sum())
    assert err(model[0].weight) < err(get_handler(MagnitudePruning(0.5)).weight(w))


def _reference_wanda_2_4(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Wanda 2:4 the slow way: a full forward pass per layer, F.unfold, the target's own nm_mask."""
    for _, layer in P.prunable_layers(model):
        seen = []
        handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        a = seen[0]
        if isinstance(layer, nn.Conv2d):
            cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        score = layer.weight.detach().abs() * a.norm(dim=0).reshape(layer.weight.shape[1:])
        layer.weight.data *= nm_mask(score, 2, 4)
    return model


def test_wanda_sees_the_inputs_of_the_already_pruned_layers(tiny):
    model, calib, _ = tiny
    ours = P.wanda_prune(copy.deepcopy(model), NMSparsity(2, 4), calib)
    ref = _reference_wanda_2_4(copy.deepcopy(model), calib.x)
    for (name, a), (_, b) in zip(P.prunable_layers(ours), P.prunable_layers(ref)):
        assert torch.equal(a.weight != 0, b.weight != 0), name


class _Shared(nn.Module):
    """A layer that runs twice, one that never runs, and a conv with no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.twice = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        return self.head(self.twice(self.twice(h).relu()))


@pytest.mark.parametrize("step", [P.wanda_prune, P.sparsegpt_prune])
def test_shared_and_unused_layers(step):
    torch.manual_seed(0)
    model = _Shared().eval()
    calib = Calibration(torch.randn(32, 1, 6, 6))
    cfg = NMSparsity(2, 4)
    step(model, cfg, calib)
    for name, layer in P.prunable_layers(model):
        assert _satisfies(layer.weight, cfg), name


def test_non_sparsity_targets_are_refused(tiny):
    model, calib, _ = tiny
    with pytest.raises(UnsupportedConfig, match="sparsity target"):
        P.wanda_prune(copy.deepcopy(model), parse_config("fp16"), calib)
    with pytest.raises(UnsupportedConfig, match="grouped convolutions"):
        P.sparsegpt_prune(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), MagnitudePruning(0.5),
                          Calibration(torch.randn(4, 4, 5, 5)))
    assert not any("wanda" in chain for chain in recipes_for("fp16"))


def test_recipes_for_sparsity_targets():
    chains = recipes_for("2:4")
    for chain in [("magnitude",), ("wanda",), ("sparsegpt",), ("const-fold", "sparsegpt", "bn-reestimate"),
                  ("fold-bn", "sparsegpt")]:
        assert chain in chains
    assert not any("global-magnitude" in chain for chain in chains)


def test_compositions_with_bn_reestimate_run(tiny):
    model, calib, x_test = tiny
    for target in ("2:4",):
        cfg = parse_config(target)
        deployed, out_cfg = run_recipe(model, target, ("const-fold", "sparsegpt", "bn-reestimate"), calib)
        assert out_cfg == cfg
        plain, _ = run_recipe(model, target, ("const-fold", "sparsegpt"), calib)
        for (name, a), (_, b) in zip(P.prunable_layers(deployed), P.prunable_layers(plain)):
            assert torch.equal(a.weight, b.weight), name  # Re-estimation leaves the pruned weights alone...
            assert _satisfies(a.weight, cfg), name
        assert not torch.equal(deployed.bn1.running_var, plain.bn1.running_var)  # ...and refreshes the BNs.
        assert torch.isfinite(deployed(x_test)).all()
    folded, _ = run_recipe(model, "prune0.5", ("fold-bn", "wanda", "bn-reestimate"), calib)
    assert isinstance(folded.bn1, nn.Identity) and _satisfies(folded.conv1.weight, MagnitudePruning(0.5))


def test_attack_table_rows(tiny):
    model, calib, x_test = tiny
    y = torch.zeros(len(x_test), dtype=torch.long)
    table = attack_table(model, "2:4", calib.x, x_test, y, recipes=[(), ("wanda",), ("sparsegpt", "bn-reestimate")])
    assert [r.recipe for r in table.rows] == ["naive cast", "wanda", "sparsegpt + bn-reestimate"]
    assert all(0.0 <= r.accuracy <= 1.0 and r.config == "2:4" for r in table.rows)
