"""Int8 affine quantisation: every code, ties, clamping, per-channel scales, zero points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.softlock import Granularity, Int8, parse_config
from chiplock.softlock.int8 import quantize_affine


def test_symmetric_every_code_and_every_tie():
    # Scale is max|x| / 127 = 1/64 exactly, so codes q / 64 are exact and (q + 0.5) / 64 are exact ties.
    codes = np.arange(-127, 128)
    x = torch.tensor(np.concatenate([codes / 64.0, (codes[:-1] + 0.5) / 64.0]), dtype=torch.float32)
    got = quantize_affine(x, dims=None, symmetric=True) * 64
    want = np.concatenate([codes, [c if c % 2 == 0 else c + 1 for c in codes[:-1]]])  # half to even
    assert got.tolist() == want.astype(float).tolist()


def test_asymmetric_every_code_and_clamp():
    # Range [-1, 254/255 * ...]: choose lo = -128 s and hi = 127 s with s = 1/32, so zero point is 0 and codes
    # -128..127 are exact; values outside the range cannot occur (range comes from the data), but a shifted range
    # exercises a non-zero zero point.
    s = 1 / 32
    x = torch.tensor(np.arange(-128, 128) * s, dtype=torch.float32)
    assert torch.equal(quantize_affine(x, dims=None, symmetric=False), x)
    y = torch.tensor([0.0, 1.0, 2.0, 255 / 128 * 2])  # all >= 0: range [0, max], zero point -128
    q = quantize_affine(y, dims=None, symmetric=False)
    step = float(y.max()) / 255
    assert torch.allclose(q, torch.round(y / step) * step, atol=0, rtol=0)
    assert float(q[0]) == 0.0  # zero is always exactly representable


def test_per_channel_uses_one_scale_per_output_channel():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-100, 100, 9)]).reshape(2, 1, 3, 3)
    per_c = Int8().quantize_weight(w)
    per_t = Int8(granularity="per_tensor").quantize_weight(w)
    assert torch.allclose(per_c[0], w[0], atol=1 / 127 / 2 + 1e-7)
    assert len(torch.unique(per_t[0])) == 3  # channel 0 is crushed by channel 1's range
    assert (per_c[1].abs().max() - 100).abs() < 1e-4


def test_activations_are_quantised_per_example():
    x = torch.stack([torch.linspace(0, 1, 50), torch.linspace(0, 1000, 50)])
    q = Int8().quantize_activation(x)
    assert torch.equal(q[0], Int8().quantize_activation(x[:1])[0])  # independent of the batch
    assert len(torch.unique(q[0])) == 50
    assert (q[0] - x[0]).abs().max() <= 1 / 255 / 2 + 1e-7


def test_codes_count_is_at_most_256():
    x = torch.randn(10_000)
    for sym in (True, False):
        assert len(torch.unique(quantize_affine(x, dims=None, symmetric=sym))) <= 256


def test_names_and_validation():
    assert Int8().name == "int8"
    assert parse_config("int8-per_tensor-asym") == Int8(granularity=Granularity.PER_TENSOR, symmetric=False)
    assert parse_config("int4").bits == 4
    with pytest.raises(ValueError, match="bits"):
        Int8(bits=1)
    with pytest.raises(UnsupportedConfig, match="unknown int option"):
        parse_config("int8-foo")
