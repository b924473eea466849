"""Round-trip bit-exactness of every transform x dtype x shape, at the transform level (expert layer).

Shapes cover scalars (0-d), empty tensors, odd sizes and tensors large enough for pre-aes's quantile model;
values cover NaN payloads, +-inf, -0.0, extremes and subnormals (see ``make_tensor`` in conftest.py).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chiplock.transforms import available_transforms, get_transform
from chiplock.transforms.pre_aes import SMALL_N
from chiplock.transforms.shuffle import FULL_MAX

TRANSFORMS = ("aes", "shuffle", "pre-aes")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool)
MODES = ("normal", "bits", "specials", "constant", "few")

shapes = st.one_of(
    st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),  # scalars, empty, small odd shapes
    st.integers(SMALL_N - 3, 3000).map(lambda n: (n,)),                # quantile-model sizes for pre-aes
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
)


def encode_decode(name: str, t: torch.Tensor, key: bytes, decode_key: bytes | None = None) -> torch.Tensor:
    """Encode, store as read-only flat bytes (as the container maps them), JSON-round-trip the public
    parameters, decode."""
    tf = get_transform(name)
    enc = tf.encode(t, key)
    stored = np.ascontiguousarray(enc.data).reshape(-1).view(np.uint8).copy()
    stored.setflags(write=False)
    params = json.loads(json.dumps(enc.params))
    return tf.decode(stored, params, decode_key or key, t.dtype, tuple(t.shape))


def test_registry_lists_the_three_transforms():
    assert set(TRANSFORMS) <= set(available_transforms())
    for name in TRANSFORMS:
        assert get_transform(name).name == name
    assert get_transform("pre-aes").detects_wrong_key is False
    assert get_transform("aes").detects_wrong_key is True
    assert get_transform("shuffle").detects_wrong_key is True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TRANSFORMS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, mode=st.sampled_from(MODES), seed=st.integers(0, 2**32 - 1),
       key=st.binary(min_size=32, max_size=32))
def test_roundtrip_bit_exact(name, dtype, shape, mode, seed, key, tensor_factory, assert_bit_exact):
    t = tensor_factory(dtype, shape, mode, seed)
    before = t.clone()
    out = encode_decode(name, t, key)
    assert_bit_exact(out, t, f"{name}/{dtype}/{shape}/{mode}")
    assert_bit_exact(t, before, "the input tensor (must not be modified)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_roundtrip_edge_shapes_and_values(name, dtype, tensor_factory, assert_bit_exact):
    key = os.urandom(32)
    cases = [((), "normal"), ((), "specials"), ((0,), "normal"), ((3, 0, 2), "normal"), ((1,), "specials"),
             ((7, 13), "specials"), ((SMALL_N,), "specials"), ((1001,), "bits"), ((2049,), "constant"),
             ((999,), "few"), ((4099,), "specials")]
    for i, (shape, mode) in enumerate(cases):
        t = tensor_factory(dtype, shape, mode, seed=i)
        assert_bit_exact(encode_decode(name, t, key), t, f"{name}/{dtype}/{shape}/{mode}")


@pytest.mark.parametrize("name", TRANSFORMS)
def test_roundtrip_above_shuffle_full_max(name, tensor_factory, assert_bit_exact):
    # One tensor past shuffle's FULL_MAX (blocked permutation + tail) with specials, for every transform.
    t = tensor_factory(torch.float32, (FULL_MAX + 12_345,), "specials", seed=7)
    assert_bit_exact(encode_decode(name, t, os.urandom(32)), t, name)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_non_contiguous_input(name, tensor_factory, assert_bit_exact):
    t = tensor_factory(torch.float32, (37, 53), "normal", seed=3).t()
    assert not t.is_contiguous()
    assert_bit_exact(encode_decode(name, t, os.urandom(32)), t.contiguous(), name)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_params_are_json_and_stored_size_matches(name, tensor_factory):
    t = tensor_factory(torch.float16, (50, 41), "normal", seed=1)
    enc = get_transform(name).encode(t, os.urandom(32))
    assert json.loads(json.dumps(enc.params)) == enc.params
    assert enc.data.size == t.numel()
    # pre-aes codes are twice as wide as 16-bit elements; aes/shuffle store the element width.
    width = 4 if name == "pre-aes" else 2
    assert enc.data.nbytes == t.numel() * width


@pytest.mark.parametrize("name", TRANSFORMS)
def test_wrong_key_gives_different_weights(name, tensor_factory):
    t = tensor_factory(torch.float32, (5000,), "normal", seed=2)
    if name == "aes":
        # aes authenticates each chunk with its key: a wrong key is refused, and skipping the tags gives noise.
        from chiplock.errors import InvalidTag

        tf = get_transform(name)
        enc = tf.encode(t, os.urandom(32))
        with pytest.raises(InvalidTag):
            tf.decode(enc.data.reshape(-1).view(np.uint8), enc.params, os.urandom(32), t.dtype, tuple(t.shape))
        out = tf.decode_unverified(enc.data.reshape(-1).view(np.uint8), enc.params, os.urandom(32), t.dtype,
                                   tuple(t.shape))
    else:
        out = encode_decode(name, t, os.urandom(32), decode_key=os.urandom(32))
    assert out.shape == t.shape and out.dtype == t.dtype
    same = (out.view(torch.int32) == t.view(torch.int32)).float().mean().item()
    assert same < 0.05, f"{name}: {same:.1%} of the elements survived a wrong key"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_same_tensor_twice_stores_different_bytes_or_same_permutation(name, tensor_factory):
    # aes and pre-aes draw a fresh nonce per encoding, so re-locking never repeats a keystream.
    t = tensor_factory(torch.float32, (4096,), "normal", seed=4)
    key = os.urandom(32)
    a, b = get_transform(name).encode(t, key), get_transform(name).encode(t, key)
    if name == "shuffle":
        assert np.array_equal(a.data, b.data)  # deterministic in the key
    else:
        assert a.params["nonce"] != b.params["nonce"]
        assert not np.array_equal(a.data, b.data)
