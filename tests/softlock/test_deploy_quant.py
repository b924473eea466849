"""Quantisation-side deployment steps: function preservation, and recovery on small planted cases."""

import pytest
import torch
from torch import nn

from chiplock.errors import ChiplockError, UnsupportedConfig
from chiplock.softlock.apply import apply_config
from chiplock.softlock.deploy import quant as Q
from chiplock.softlock.deploy.base import STEPS, Calibration, recipes_for, run_recipe
from chiplock.softlock.int8 import Int8
from chiplock.softlock.levers import outlier_channels, scale_layers, stream_outliers
from chiplock.softlock.registry import parse_config
from chiplock.softlock.scaled import Scaled
from chiplock_demo.models.resnet import resnet18


def _model(seed: int = 0) -> nn.Module:
    """A width-4 ResNet-18 with random BatchNorm statistics (so folding and rescaling have work to do)."""
    torch.manual_seed(seed)
    m = resnet18(10, 1, 4).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.5)
    return m


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 1, 8, 8, generator=g).abs(), torch.randn(32, 1, 8, 8, generator=g).abs()


def _err(model, cfg, ref_model, x):
    """Relative logit error of ``model`` on ``cfg`` against the fp32 reference."""
    ref = ref_model(x)
    with torch.no_grad():
        y = apply_config(model, cfg)(x)
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("step", ["fold-bn", "rebalance-pow2", "cle", "cle-stream", "high-bias-absorb",
                                  "const-fold", "dedupe"])
def test_step_preserves_fp32_function(step, data):
    calib, x = data
    if step == "high-bias-absorb":
        x = calib  # Exact where the calibration minima hold, i.e. on the calibration inputs.
    m = _model()
    scale_layers(m, 6)
    outlier_channels(m, 4, 0.25)
    out, cfg = run_recipe(m, "e4m3fn" if step == "rebalance-pow2" else "int8", [step], Calibration(calib))
    with torch.no_grad():
        assert (out(x) - m(x)).abs().max().item() < 1e-4 * m(x).abs().max().item()
    assert cfg == parse_config("e4m3fn" if step == "rebalance-pow2" else "int8")


def test_fold_bn_replaces_batchnorm_by_identity(data):
    m, _ = run_recipe(_model(), "int8", ["fold-bn"], Calibration(data[0]))
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert isinstance(m.bn1, nn.Identity) and m.conv1.bias is not None
    assert isinstance(m.layer2[0].shortcut[1], nn.Identity) and m.layer2[0].shortcut[0].bias is not None


def test_rebalance_pow2_puts_max_weight_in_half_one(data):
    m = _model()
    scale_layers(m, 12)
    out, _ = run_recipe(m, "e4m3fn", ["rebalance-pow2"], Calibration(data[0]))
    amax = out.layer1[0].conv1.weight.abs().amax(dim=(1, 2, 3))
    assert ((amax >= 0.5) & (amax < 1)).all()


@pytest.mark.parametrize("chain", [("amax-channel",), ("rebalance-pow2",), ("amax-tensor",), ("mx-block",)])
def test_scale_lever_planted_before_e4m3_is_undone(chain, data):
    calib, x = data
    m = _model()
    scale_layers(m, 16)  # Weights and outputs far above E4M3's 448: they saturate.
    naive = _err(m, "e4m3fn", m, x)
    out, cfg = run_recipe(m, "e4m3fn", chain, Calibration(calib))
    fixed = _err(out, cfg, m, x)
    assert naive > 0.2 and fixed < naive / 4, (naive, fixed)


def test_amax_steps_switch_to_scaled_configs():
    m = _model()
    names = {s: run_recipe(m, "e4m3fn", [s], Calibration(torch.zeros(2, 1, 8, 8)))[1].name
             for s in ("amax-tensor", "amax-channel", "mx-block")}
    assert names == {"amax-tensor": "e4m3fn@tensor", "amax-channel": "e4m3fn@channel",
                     "mx-block": "e4m3fn@block32-e8m0"}


def test_cle_undoes_outlier_channels_before_int8(data):
    calib, x = data
    m = _model()
    outlier_channels(m, 8, 0.25)
    stream_outliers(m, 8, 0.25)
    naive = _err(m, "int8-per_tensor", m, x)
    out, cfg = run_recipe(m, "int8-per_tensor", ["cle-stream"], Calibration(calib))
    fixed = _err(out, cfg, m, x)
    assert fixed < naive / 3, (naive, fixed)


def test_high_bias_absorb_removes_a_logit_offset_channel(data):
    calib, x = data
    m = _model()
    with torch.no_grad():  # A constant +2**10 on two final channels, cancelled in the classifier bias.
        m.layer4[-1].bn2.bias[:2] += 2.0 ** 10
        m.fc.bias -= m.fc.weight[:, :2].sum(1) * 2.0 ** 10
    naive = _err(m, "int8", m, x)
    out, cfg = run_recipe(m, "int8", ["high-bias-absorb"], Calibration(calib))
    assert _err(out, cfg, m, x) < naive / 3


def test_bias_correction_reduces_mean_output_error(data):
    calib, _ = data
    m = _model()
    cfg = Int8(bits=4)
    ref = m(calib)
    before = (apply_config(m, cfg)(calib) - ref).mean(0).abs().mean().item()
    out, _ = run_recipe(m, cfg, ["bias-correction"], Calibration(calib))
    after = (apply_config(out, cfg)(calib) - ref).mean(0).abs().mean().item()
    assert after < 0.5 * before, (before, after)


def test_bn_reestimate_measures_batch_statistics(data):
    calib, _ = data
    m = _model()
    out, _ = run_recipe(m, "fp32", ["bn-reestimate"], Calibration(calib))
    y = m.conv1(calib)
    assert torch.allclose(out.bn1.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not out.training and not any(type(mod).__name__.startswith("Soft") for mod in out.modules())


def test_const_fold_moves_constant_inputs_into_the_bias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 2.5  # hidden unit 1 is always 2.5
    x = torch.randn(40, 6)
    ref = m(x)
    Q.const_fold(m, x, rtol=0)
    assert (m[2].weight[:, 1] == 0).all()
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_dedupe_merges_proportional_copies():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        m[0].weight[5] = 2 * m[0].weight[0]
        m[0].bias[5] = 2 * m[0].bias[0]  # unit 5 == 2 * unit 0
        m[2].weight[:, 5] = -0.5 * m[2].weight[:, 0] + 1e-3  # a decoy that almost cancels it
    x = torch.randn(64, 4)
    ref = m(x)
    Q.dedupe(m, Calibration(x))
    assert (m[2].weight[:, 5] == 0).all() and torch.allclose(m(x), ref, atol=1e-5)
    assert m[2].weight[:, 0].abs().max() < 0.01


def test_int8_mse_clip_lowers_weight_error_and_sets_the_range():
    torch.manual_seed(0)
    lin = nn.Linear(256, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.Laplace(0, 1).sample((8, 256)))
        lin.weight[:, 0] = 40.0  # one outlier per row
    w0 = lin.weight.detach().clone()
    cfg = Int8(bits=4)
    before = ((cfg.quantize_weight(w0) - w0) ** 2).sum()
    Q.int8_mse_clip(lin, cfg)
    after = ((cfg.quantize_weight(lin.weight) - w0) ** 2).sum()
    assert after < before
    assert (lin.weight.abs().amax(1) < 40).all()


@pytest.mark.parametrize("cfg", [Int8(bits=4), Int8(bits=4, granularity="per_tensor"),
                                 Scaled("e2m1", weights="channel")])
def test_gptq_beats_round_to_nearest_and_stays_on_grid(cfg):
    from chiplock.softlock.registry import get_handler
    torch.manual_seed(0)
    x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs
    w = torch.randn(16, 32)
    rnd, qmax, per_channel = Q._gptq_grid(cfg)[1:]
    q = Q.gptq_layer(w, 2 * x.T @ x / len(x), rnd, qmax, per_channel)
    h = get_handler(cfg)
    assert torch.allclose(h.weight(q), q, atol=1e-6)  # the deployed format leaves it as it is
    err_gptq = ((x @ (q - w).T) ** 2).mean()
    err_rtn = ((x @ (h.weight(w) - w).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_step_targets_the_per_channel_grid(data):
    out, cfg = run_recipe(_model(), "e4m3fn", ["gptq"], Calibration(data[0][:16]))
    assert cfg.name == "e4m3fn@channel"
    w = out.layer1[0].conv1.weight
    assert torch.allclose(cfg.quantize(w, "channel"), w)


def test_applies_and_recipes():
    assert not STEPS.get("amax-channel").applies(parse_config("int8"))
    assert not STEPS.get("int8-mse-clip").applies(parse_config("e4m3fn"))
    assert STEPS.get("gptq").applies(parse_config("int8")) and STEPS.get("gptq").applies(parse_config("e4m3fn"))
    assert ("fold-bn", "cle", "amax-channel") in recipes_for("e4m3fn")
    assert all("amax-channel" not in r for r in recipes_for("int8"))
    assert not STEPS.get("dedupe").standard
    assert all(not any(s == "dedupe" for s in r) for r in recipes_for("int8", standard_only=True))


def test_empty_calibration_is_refused():
    with pytest.raises(UnsupportedConfig, match="calibration"):
        run_recipe(_model(), "int8", ["bias-correction"], Calibration(torch.zeros(0, 1, 8, 8)))
    assert issubclass(UnsupportedConfig, ChiplockError)


@pytest.mark.parametrize("step", ["cle-stream", "high-bias-absorb", "rebalance-pow2"])
def test_bottleneck_resnet_steps_preserve_function(step, data):
    from chiplock_demo.models.resnet import resnet50
    calib, _ = data
    torch.manual_seed(0)
    m = resnet50(10, 1, 2).eval()
    out, _ = run_recipe(m, "e4m3fn", [step], Calibration(calib))
    with torch.no_grad():
        assert (out(calib) - m(calib)).abs().max().item() < 1e-4 * m(calib).abs().max().item()
