"""The small GPT-style classifier: builds from a random transformers config, runs soft-locked, saves and loads."""

import pytest
import torch
from torch import nn

from chiplock.softlock.apply import SoftLinear, apply_config
from chiplock.softlock.model_io import build_architecture, load_model, save_model
from chiplock_demo.models.gpt import GPTClassifier

pytest.importorskip("transformers", reason="the GPT example model needs transformers")
# Importing transformers' Llama takes 5-25 s on the shared 2-core machine; the tests themselves take under 1 s.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_architecture("gpt", num_classes=10, image_size=8, width=16).eval()


def test_builds_and_runs_rows_as_tokens(model):
    assert isinstance(model, GPTClassifier)
    x = torch.rand(3, 1, 8, 8)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    # Causal: the logits read the last row, which attends to every row, so changing the first row changes them.
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert not torch.allclose(model(x2), out)


def test_every_linear_is_swapped_and_configs_differ(model):
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert n_linear == 2 + 2 * 7  # embedding, head, and q/k/v/o + gate/up/down in each of 2 layers
    x = torch.rand(4, 1, 8, 8)
    ref = model(x)
    outs = {}
    for cfg in ("fp16", "int8"):
        soft = apply_config(model, cfg)
        assert sum(type(m) is SoftLinear for m in soft.modules()) == n_linear
        assert not any(type(m) is nn.Linear for m in soft.modules())
        outs[cfg] = soft(x)
    # FP16 is close to fp32; int8 rounds coarser; neither is exactly the fp32 function.
    err16, err8 = (outs["fp16"] - ref).abs().max(), (outs["int8"] - ref).abs().max()
    assert 0 < err16 < 1e-2 and err8 > err16
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear  # the original is untouched


def test_save_load_roundtrip(model, tmp_path):
    path = tmp_path / "gpt.safetensors"
    arch = {"name": "gpt", "num_classes": 10, "image_size": 8, "width": 16}
    save_model(apply_config(model, "int8"), path, {"arch": arch})
    loaded, info = load_model(path)
    assert info["arch"] == arch
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(apply_config(loaded, "int8")(x), apply_config(model, "int8")(x))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible by heads"):
        GPTClassifier(10, 8, width=10, heads=4)
