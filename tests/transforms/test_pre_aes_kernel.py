"""The compiled pre-aes decoder must agree bit for bit with the numpy definition, on every kind of code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiplock.transforms.base import raw_view
from chiplock.transforms.pre_aes import _Codec, build_model

CASES = {
    "f32-gauss": torch.randn(20_000) * 0.05,
    "f32-nonfinite": torch.tensor([1.0, float("nan"), float("-inf")] + [0.5, -0.25] * 200),
    "f32-small": torch.randn(7),
    "f16-gauss": (torch.randn(20_000) * 0.1).half(),
    "f16-tiny-and-inf": torch.tensor([0.0, float("inf")] + [1e-7, -6e-8] * 200).half(),
    "bf16": torch.randn(20_000).bfloat16(),
    "i8": torch.randint(-128, 128, (5000,), dtype=torch.int8),
    "i32": torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32),
    "i64": torch.randint(-2**40, 2**40, (5000,)),
    "u8": torch.randint(0, 256, (5000,), dtype=torch.uint8),
    "bool": torch.rand(500) > 0.5,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_decoder_matches_the_numpy_definition(name):
    x = CASES[name]
    breaks, nonfinite = build_model(x)
    codec = _Codec(x.dtype, raw_view(breaks), nonfinite)
    rng = np.random.default_rng(7)
    codes = rng.integers(0, np.iinfo(codec.cdtype).max, size=200_000, dtype=codec.cdtype, endpoint=True)
    # Include the boundaries of every slot, where rounding and clamping matter most.
    slots = (np.arange(1 << 16, dtype=np.uint64) << np.uint64(codec.b - 16)).astype(codec.cdtype)
    codes = np.concatenate([codes, slots, slots - codec.cdtype(1)])
    np.testing.assert_array_equal(codec.decode(codes), codec.decode_reference(codes))
