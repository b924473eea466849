"""The soft-locked models of the soft-lock attacks: locked as asked, cached to files, loaded back the same."""

from __future__ import annotations

import pytest
import torch

from chiplock.attacks import softmodels
from chiplock.errors import UnsupportedConfig

SMOKE = {"data": "digits8", "width": 8, "pretrain_epochs": 3, "lock_epochs": 2}


@pytest.mark.parametrize("kwargs, match", [({"pair": "fp32->int3"}, "soft-lock pair"),
                                           ({"pair": "dense->2:4", "data": "cifar"}, "data set"),
                                           ({"pair": "dense->2:4", "width": 0}, ">= 1"),
                                           ({"pair": "dense->2:4", "mechanism": "magic"}, "mechanism")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(UnsupportedConfig, match=match):
        softmodels.locked_model(**{**SMOKE, **kwargs})


@pytest.mark.slow
def test_locked_model_is_locked_and_its_cache_round_trips(tmp_path):
    model, data, info = softmodels.locked_model("dense->2:4", cache=tmp_path, **SMOKE)
    assert data.name == "digits8" and info["authorized"] == "fp32" and info["unauthorized"] == "2:4"
    assert info["mechanism"] == ["decoys"]
    assert info["locked_authorized"] > 0.8 and info["locked_unauthorized"] < 0.3
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files[0].startswith("locked_fp32-2_4_digits8_w8")
    if not info["cached"]:  # trained here (not memoised by an earlier test): the original is cached too
        assert files[1].startswith("original_resnet18_digits8_w8_e3")
    softmodels.clear_memo()
    again, _, info2 = softmodels.locked_model("dense->2:4", cache=tmp_path, **SMOKE)
    assert info2["cached"] and info2["locked_authorized"] == info["locked_authorized"]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # The memo hands out copies: changing one leaves the next untouched.
    with torch.no_grad():
        next(again.parameters()).add_(1.0)
    third, _, _ = softmodels.locked_model("dense->2:4", cache=tmp_path, **SMOKE)
    assert torch.equal(next(third.parameters()), next(model.parameters()))
