"""pre-aes: known answers, encryption of the stored codes, indistinguishability of wrong-key output, and the
size of the public distribution model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from chiplock.transforms import get_transform
from chiplock.transforms.pre_aes import from_order_key, order_key, probability_grid

KS_P = 0.01
UNIFORM_P = 1e-3
WRONG_KEY = bytes(range(200, 232))
KEY = bytes(range(32))

pre_aes = get_transform("pre-aes")


def _gaussian(n: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32) * scale)


def _laplace(n: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).laplace(0.0, scale, n).astype(np.float32))


def synthetic_tensors() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(11)
    return {
        "gauss_1000": _gaussian(1000, 1),
        "gauss_10k": _gaussian(10_000, 2),
        "gauss_100k": _gaussian(100_000, 3),
        "laplace_1000": _laplace(1000, 4),
        "laplace_10k": _laplace(10_000, 5),
        "laplace_100k": _laplace(100_000, 6),
        "gauss_f16_20k": _gaussian(20_000, 7).half(),
        "gauss_bf16_20k": _gaussian(20_000, 8).bfloat16(),
        "student_t3_20k": torch.from_numpy(rng.standard_t(3, 20_000).astype(np.float32)),
        "bimodal_20k": torch.from_numpy(np.concatenate([rng.normal(-1, .1, 5000),
                                                        rng.normal(2, .3, 15000)]).astype(np.float32)),
        "relu_20k": torch.from_numpy(np.maximum(rng.standard_normal(20_000), 0).astype(np.float32)),
        "int8_quantized_20k": torch.from_numpy(np.clip(np.rint(rng.standard_normal(20_000) * 20), -128, 127)
                                               .astype(np.int8)),
    }


def encode(t: torch.Tensor, key: bytes = KEY):
    return pre_aes.encode(t, key)


def decode(enc, t: torch.Tensor, key: bytes) -> torch.Tensor:
    stored = np.ascontiguousarray(enc.data).reshape(-1).view(np.uint8)
    return pre_aes.decode(stored, json.loads(json.dumps(enc.params)), key, t.dtype, tuple(t.shape))


def ks_p(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(ks_2samp(a.double().reshape(-1).numpy(), b.double().reshape(-1).numpy()).pvalue)


# --- indistinguishability ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(synthetic_tensors()))
def test_wrong_key_output_is_ks_indistinguishable(name, fixed_nonce):
    t = synthetic_tensors()[name]
    assert t.numel() >= 1000
    out = decode(encode(t), t, WRONG_KEY)
    assert not torch.equal(out, t)
    p = ks_p(t, out)
    assert p > KS_P, f"{name}: KS p = {p:.2e} <= {KS_P}; wrong-key weights are distinguishable from real ones"


def test_trained_model_wrong_key_is_ks_indistinguishable(trained_model, fixed_nonce):
    big = {k: v.detach().clone() for k, v in trained_model.state_dict().items() if v.numel() >= 1000}
    assert len(big) >= 2, "the fixture model should have at least two tensors of >= 1000 elements"
    for name, t in big.items():
        out = decode(encode(t), t, WRONG_KEY)
        p = ks_p(t, out)
        assert p > KS_P, f"{name}: KS p = {p:.2e}"
        # A real model and its wrong-key copy should differ almost everywhere.
        assert (out != t).float().mean() > 0.9


def test_right_key_output_is_bit_exact_for_trained_model(trained_model, assert_bit_exact):
    for name, t in trained_model.state_dict().items():
        assert_bit_exact(decode(encode(t), t, KEY), t, name)


def test_aes_wrong_key_output_fails_the_same_ks_test(fixed_nonce):
    # The control: plain AES decrypted with a wrong key gives random bit patterns, which KS spots at once.
    aes = get_transform("aes")
    for name in ("gauss_1000", "gauss_10k", "laplace_100k", "gauss_f16_20k"):
        t = synthetic_tensors()[name]
        enc = aes.encode(t, KEY)
        out = aes.decode(enc.data.reshape(-1).view(np.uint8), enc.params, WRONG_KEY, t.dtype, tuple(t.shape))
        finite = out[torch.isfinite(out)]
        assert ks_p(t, finite) < 1e-6, name


def test_wrong_key_values_stay_within_the_real_range_and_finite(fixed_nonce):
    for name, t in synthetic_tensors().items():
        out = decode(encode(t), t, WRONG_KEY)
        if t.dtype.is_floating_point:
            assert torch.isfinite(out).all(), name
        assert out.min() >= t.min() and out.max() <= t.max(), name


def test_pre_aes_never_detects_a_wrong_key():
    t = _gaussian(5000, 9)
    enc = encode(t)
    for _ in range(5):
        decode(enc, t, os.urandom(32))  # must not raise
    assert "key_check" not in enc.params and pre_aes.detects_wrong_key is False


# --- encryption of the stored codes --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_stored_codes_pass_byte_uniformity_and_plaintext_fails(dtype, fixed_nonce, byte_uniformity_p):
    t = _gaussian(100_000, 12).to(dtype) if dtype.is_floating_point else \
        torch.from_numpy(np.clip(np.rint(np.random.default_rng(3).standard_normal(100_000) * 20), -128, 127)
                         .astype(np.int8))
    enc = encode(t)
    p_stored = byte_uniformity_p(np.ascontiguousarray(enc.data).view(np.uint8))
    assert p_stored > UNIFORM_P, f"stored codes are not uniform bytes (p = {p_stored:.2e})"
    p_plain = byte_uniformity_p(t.contiguous().view(torch.uint8).numpy())
    assert p_plain < UNIFORM_P, "the control failed: plaintext weights looked uniform"


def test_stored_codes_do_not_depend_on_the_weights_without_the_key(fixed_nonce, byte_uniformity_p):
    # Two very different tensors give stored bytes that are both uniform, and the codes of equal weights differ.
    t = torch.zeros(50_000, dtype=torch.float32)
    t[::2] = 1.0
    enc = encode(t)
    assert byte_uniformity_p(enc.data.view(np.uint8)) > UNIFORM_P
    codes = enc.data.reshape(-1)
    assert len(np.unique(codes[::2])) > 0.99 * codes[::2].size


# --- the public distribution model -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [10_000, 12_345, 100_000, 1_000_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_public_model_is_about_one_percent(n, dtype):
    t = _gaussian(n, n).to(dtype) if dtype.is_floating_point else \
        torch.from_numpy(np.random.default_rng(n).integers(-128, 128, n).astype(np.int8))
    enc = encode(t)
    model_bytes = len(enc.params["breaks"]) // 2
    assert model_bytes <= 0.011 * t.numel() * t.element_size(), \
        f"public model {model_bytes} B for a {t.numel() * t.element_size()} B tensor"
    assert enc.params["mode"] == "model"


def test_model_breakpoints_are_sorted_quantiles_of_the_tensor():
    t = _gaussian(20_000, 13)
    enc = encode(t)
    breaks = torch.from_numpy(np.frombuffer(bytes.fromhex(enc.params["breaks"]), dtype=np.float32).copy())
    assert torch.all(breaks[1:] >= breaks[:-1])
    assert breaks[0] == t.min() and breaks[-1] == t.max()


def test_float64_falls_back_to_raw_mode_but_round_trips(assert_bit_exact):
    t = _gaussian(5000, 14).double()
    enc = encode(t)
    assert enc.params["mode"] == "raw"
    assert_bit_exact(decode(enc, t, KEY), t)


# --- the public code map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,kind,w", [(np.uint32, "float", 32), (np.uint16, "float", 16),
                                          (np.uint8, "int", 8), (np.uint64, "int", 64), (np.uint8, "uint", 8)])
def test_order_key_is_monotone_and_invertible(dtype, kind, w):
    bits = np.random.default_rng(w).integers(0, np.iinfo(dtype).max, 5000, dtype=dtype, endpoint=True)
    u = order_key(bits, kind, w)
    assert np.array_equal(from_order_key(u, kind, w), bits)
    if kind == "float" and w == 32:
        vals = bits.view(np.float32)
        ok = np.isfinite(vals)
        order = np.argsort(u[ok], kind="stable")
        assert np.all(np.diff(vals[ok][order]) >= 0)
        # -0.0 sorts just below +0.0.
        z = order_key(np.array([0x80000000, 0x00000000], dtype=np.uint32), kind, w)
        assert z[0] + 1 == z[1]


def test_probability_grid_is_monotone_from_zero_to_one():
    for k in (1, 2, 7, 100, 4096):
        p = probability_grid(k)
        assert len(p) == k + 1 and p[0] == 0.0 and p[-1] == 1.0
        assert np.all(np.diff(p) > 0)


def test_damaged_public_parameters_raise_container_error():
    from chiplock.errors import ContainerError

    t = _gaussian(2000, 15)
    enc = encode(t)
    stored = enc.data.reshape(-1).view(np.uint8)
    bad = [dict(enc.params, breaks="zz"), dict(enc.params, breaks=enc.params["breaks"][:8]),
           {k: v for k, v in enc.params.items() if k != "nonce"}, dict(enc.params, mode="raw"),
           dict(enc.params, breaks=enc.params["breaks"][8:] + enc.params["breaks"][:8])]
    for params in bad:
        with pytest.raises(ContainerError, match="damaged"):
            pre_aes.decode(stored, params, KEY, t.dtype, tuple(t.shape))
    with pytest.raises(ContainerError, match="wrong number of bytes"):
        pre_aes.decode(stored[:-8], enc.params, KEY, t.dtype, tuple(t.shape))


def test_small_float64_tensor_holding_the_largest_double_round_trips(assert_bit_exact):
    # Tensors under SMALL_N elements get +-(next power of two of max |x|) bounds; for max|x| = finfo.max the
    # next power of two is 2**1024, which overflows a Python float.
    t = torch.tensor([1.0, torch.finfo(torch.float64).max, -3.0], dtype=torch.float64)
    assert_bit_exact(decode(encode(t), t, KEY), t)


def test_known_answer_vectors(check_transform_vectors):
    check_transform_vectors("pre-aes")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_small_int_tensor_holding_the_minimum_round_trips(dtype, assert_bit_exact):
    # |iinfo.min| overflows in the tensor's own dtype; pre-aes must still give the value back bit-exactly.
    t = torch.tensor([torch.iinfo(dtype).min, 3, 1], dtype=dtype)
    assert_bit_exact(decode(encode(t), t, KEY), t)
