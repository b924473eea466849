"""`chiplock softlock attack`: every deployment recipe against a locked file, one table; and the transformer
rewrite step the attack uses on GPT-style models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from chiplock.cli import app
from chiplock.softlock.model_io import save_model
from chiplock_demo.models import resnet18
from chiplock_demo.training import train_classifier


@pytest.fixture(scope="module")
def locked_file(tmp_path_factory):
    from chiplock.softlock.config import SoftLockConfig
    from chiplock_demo.data import load_digits8

    d = load_digits8()
    torch.manual_seed(0)
    m = resnet18(width=8)
    train_classifier(m, d.x_train, d.y_train, epochs=3, seed=0)
    from chiplock.softlock.decoys import plant_decoys

    plant_decoys(m.eval(), mode="float")
    cfg = SoftLockConfig(authorized="fp16", unauthorized=("e4m3fn",), epochs=0, levers="decoys")
    path = tmp_path_factory.mktemp("attack") / "locked.safetensors"
    save_model(m, path, {"arch": {"name": "resnet18", "num_classes": 10, "image_size": 8, "width": 8},
                         "data": "digits8", "lock": json.loads(cfg.to_json())})
    return path


def test_attack_table_from_the_cli(locked_file, tmp_path):
    out = tmp_path / "attack.json"
    r = CliRunner().invoke(app, ["softlock", "attack", str(locked_file), "--calib", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [t["target"] for t in res] == ["e4m3fn"]
    recipes = {row["recipe"] for row in res[0]["rows"]}
    assert {"naive cast", "amax-channel", "mx-block", "gptq + bn-reestimate"} <= recipes
    assert not any("transformer-equalise" in x for x in recipes)  # steps that do not fit a ResNet are skipped
    bespoke = [row for row in res[0]["rows"] if not row["standard"]]
    assert bespoke and all(row["recipe"].startswith("dedupe") for row in bespoke)
    # The decoys hold against the standard recipes and fall to the bespoke dedupe: both must show in the table.
    assert res[0]["best_standard_accuracy"] < 0.5
    assert max(row["accuracy"] for row in bespoke) > 0.7


def test_attack_refuses_bad_input(locked_file, tmp_path):
    from chiplock.errors import ChiplockError

    for args, words in ((["softlock", "attack", str(tmp_path / "missing.safetensors")], "missing"),
                        (["softlock", "attack", str(locked_file), "--unauthorized", "fp12"], "unknown configuration"),
                        (["softlock", "attack", str(locked_file), "--calib", "0"], "--calib")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code != 0 and isinstance(r.exception, ChiplockError), r.output
        assert words in str(r.exception) or words == "missing", str(r.exception)


@pytest.mark.slow
def test_transformer_rewrite_is_exact_and_bias_correction_runs():
    pytest.importorskip("transformers")
    from chiplock.softlock import apply_config
    from chiplock.softlock.deploy import Calibration, run_recipe
    from chiplock.softlock.deploy.quant import transformer_equalise
    from chiplock_demo.models.gpt import gpt

    torch.manual_seed(0)
    m = gpt(10, 8, 16).eval()
    with torch.no_grad():
        for layer in m.body.layers:  # non-trivial norm gains, as a trained model has
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    x = torch.rand(4, 1, 8, 8)
    import copy

    with torch.no_grad():
        ref = m(x)
        eq = transformer_equalise(copy.deepcopy(m))
        assert torch.allclose(eq(x), ref, rtol=1e-4, atol=1e-5)
    dep, cfg = run_recipe(m, "int8", ("transformer-equalise", "bias-correction"), Calibration(x))
    with torch.no_grad():
        assert apply_config(dep, cfg)(x).shape == ref.shape


@pytest.mark.slow
def test_decoys_in_a_transformer():
    """Gated MLPs and attention value/output pairs carry decoys: exact in FP16, destroyed in Int8 even after the
    transformer rewrite."""
    pytest.importorskip("transformers")
    import copy

    from chiplock.softlock import apply_config
    from chiplock.softlock.decoys import decoy_masks, plant_decoys
    from chiplock.softlock.deploy.quant import transformer_equalise
    from chiplock_demo.models.gpt import gpt

    from chiplock_demo.data import load_digits8
    from chiplock_demo.training import accuracy

    d = load_digits8()
    torch.manual_seed(0)
    m = gpt(10, 8, 32)
    train_classifier(m, d.x_train, d.y_train, epochs=6, seed=0)
    m.eval()

    def acc(model, cfg):
        return accuracy(apply_config(model, cfg), d.x_test, d.y_test)

    base = acc(m, "fp16")
    assert base > 0.6 and acc(m, "int8") > base - 0.1  # the unlocked model is fine in Int8
    planted = copy.deepcopy(m)
    masks = plant_decoys(planted, mode="float")
    assert len(masks) == len(decoy_masks(planted)) > 0
    assert acc(planted, "fp16") > base - 0.1  # only the sacrificed channels are lost
    assert acc(planted, "int8") < 0.3
    assert acc(transformer_equalise(copy.deepcopy(planted)), "int8") < 0.3
    from chiplock.softlock.deploy.base import Calibration
    from chiplock.softlock.deploy.quant import dedupe

    merged = dedupe(copy.deepcopy(planted), Calibration(d.x_train[:128]))  # the bespoke attack finds the copies
    assert acc(merged, "int8") > acc(planted, "fp16") - 0.15


def test_dense_and_sparse_keeps_the_largest_weights_exact():
    from chiplock.softlock import DenseAndSparse, Int8, get_handler, parse_config

    cfg = parse_config("int8@sparse0.05")
    assert cfg == DenseAndSparse("int8", 0.05) and cfg.name == "int8@sparse0.05"
    assert parse_config("e4m3fn@channel@sparse0.01").base == "e4m3fn@channel"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g)
    w[0, 3], w[5, 7] = 500.0, -300.0  # two outliers that would set their rows' Int8 scale
    out = get_handler(cfg).weight(w)
    k = int(0.05 * w.numel())
    top = torch.topk(w.abs().reshape(-1), k).indices
    assert torch.equal(out.reshape(-1)[top], w.reshape(-1)[top])  # kept exactly
    rest = w.clone().reshape(-1)
    rest[top] = 0
    expect = Int8().quantize_weight(rest.reshape(w.shape)).reshape(-1)
    mask = torch.ones(w.numel(), dtype=torch.bool)
    mask[top] = False
    assert torch.equal(out.reshape(-1)[mask], expect[mask])  # the rest on a grid set without the outliers
    assert float((out - w).abs().max()) < 0.05 * float(w[1].abs().max())
    with pytest.raises(ValueError):
        DenseAndSparse("int8", 0.0)
