"""The transform interface: registry, dtype checks and raw-bit views."""

from __future__ import annotations

import os

import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.transforms import DTYPE_BY_NAME, DTYPE_NAMES, get_transform
from chiplock.transforms.base import check_dtype, raw_view


def test_unknown_transform_names_the_choices():
    with pytest.raises(UnsupportedConfig, match=r"unknown transform 'rot13'; choose one of aes, pre-aes, shuffle"):
        get_transform("rot13")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16, torch.uint32])
def test_unsupported_dtype_is_refused_with_the_supported_list(dtype):
    with pytest.raises(UnsupportedConfig, match=r"not supported; convert them to one of .*F32") as exc:
        check_dtype(dtype)
    assert str(dtype) in str(exc.value)
    for name in ("aes", "shuffle", "pre-aes"):
        with pytest.raises(UnsupportedConfig):
            get_transform(name).encode(torch.zeros(4, dtype=dtype), os.urandom(32))


def test_dtype_names_round_trip_and_use_safetensors_spelling():
    assert DTYPE_NAMES[torch.float32] == "F32" and DTYPE_NAMES[torch.bfloat16] == "BF16"
    assert DTYPE_NAMES[torch.bool] == "BOOL"
    for dtype, name in DTYPE_NAMES.items():
        assert DTYPE_BY_NAME[name] is dtype


def test_raw_view_shares_bits_and_shape():
    t = torch.tensor([[-0.0, float("nan")], [1.0, float("-inf")]])
    v = raw_view(t)
    assert v.shape == (4,) and v.dtype.itemsize == 4
    assert int(v[0]) == 0x80000000 and int(v[3]) == 0xFF800000


@pytest.mark.parametrize("name", ["aes", "shuffle", "pre-aes"])
def test_empty_tensor_with_zero_stride_is_accepted(name, assert_bit_exact):
    # torch.from_numpy of an empty numpy array (e.g. rng.integers(..., size=0)) has stride 0; it is as valid
    # an empty tensor as torch.empty(0).
    t = torch.empty_strided((0,), (0,), dtype=torch.int16)
    tf = get_transform(name)
    enc = tf.encode(t, os.urandom(32))
    assert_bit_exact(tf.decode(enc.data.reshape(-1).view("u1"), enc.params, os.urandom(32), t.dtype, (0,)),
                     torch.empty(0, dtype=torch.int16))
