"""Exhaustive rounding tests of the MiniFloat emulation against an integer reference (tests/softlock/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from chiplock.errors import UnsupportedConfig
from chiplock.softlock import BF16, E4M3, E5M2, FP16, MiniFloat, Overflow, Variant, parse_config
from chiplock.softlock.minifloat.rounding import round_to_grid

from .reference import decode_all, probe_inputs, ref_round

# (exp_bits, man_bits, bias, fn variant): 8-bit OCP formats, an IEEE E4M3, shifted biases, tiny formats, and the
# 16-bit formats (65,536 codes each, still exhaustive).
FORMATS = [
    (4, 3, 7, True), (4, 3, 7, False), (5, 2, 15, False), (5, 2, 15, True), (4, 3, 11, True), (4, 3, 3, False),
    (3, 2, 3, False), (2, 1, 1, True), (3, 4, 3, False), (5, 10, 15, False), (6, 9, 31, False), (8, 7, 127, False),
    (4, 11, 7, False),
]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, with any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(nan | (a.view(np.uint32) == b.view(np.uint32))))


def _mismatches(got, want, x, limit=5):
    bad = ~((np.isnan(got) & np.isnan(want)) | (got.view(np.uint32) == want.view(np.uint32)))
    return [(float(x[i]), float(got[i]), float(want[i])) for i in np.flatnonzero(bad)[:limit]]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"e{f[0]}m{f[1]}b{f[2]}{'fn' if f[3] else ''}")
@pytest.mark.parametrize("overflow", [Overflow.SATURATE, Overflow.INF])
@pytest.mark.parametrize("method", ["auto", "frexp"])
def test_rounding_matches_integer_reference_on_every_code_and_tie(fmt, overflow, method):
    e, m, bias, fn = fmt
    cfg = MiniFloat(e, m, bias=bias, variant=Variant.FN if fn else Variant.IEEE, overflow=overflow)
    x = probe_inputs(e, m, bias, fn)
    want = ref_round(x, e, m, bias, fn, saturate=overflow == Overflow.SATURATE)
    got = round_to_grid(torch.from_numpy(x), m, cfg.emin, cfg.max_finite, overflow=overflow,
                        has_inf=not fn, method=method).numpy()
    assert _same(got, want), _mismatches(got, want, x)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"e{f[0]}m{f[1]}b{f[2]}{'fn' if f[3] else ''}")
def test_every_finite_code_is_a_fixed_point(fmt):
    e, m, bias, fn = fmt
    cfg = MiniFloat(e, m, bias=bias, variant=Variant.FN if fn else Variant.IEEE)
    vals = decode_all(e, m, bias, fn)
    finite = vals[np.isfinite(vals)].astype(np.float32)
    assert _same(cfg.round(torch.from_numpy(finite)).numpy(), finite)
    assert cfg.max_finite == float(np.nanmax(finite))


def test_known_values_e4m3fn():
    f = E4M3()
    assert f.max_finite == 448.0 and f.emin == -6
    x = torch.tensor([464.0, 464.001, 2.0 ** -10, 3 * 2.0 ** -10, 1.0625, 1.1875, -0.0, 1e30])
    assert f.round(x).tolist() == [448.0, 448.0, 0.0, 2.0 ** -8, 1.0, 1.25, -0.0, 448.0]
    assert math.copysign(1, f.round(torch.tensor([-1e-9])).item()) == -1  # the sign of zero is kept


def test_overflow_policies():
    x = torch.tensor([61440.0, 61439.0, -1e9, float("inf")])
    assert E5M2(overflow="inf").round(x).tolist() == [math.inf, 57344.0, -math.inf, math.inf]
    assert E5M2().round(x).tolist() == [57344.0, 57344.0, -57344.0, 57344.0]
    assert torch.isnan(E4M3(overflow="inf").round(torch.tensor([480.0]))).all()
    assert FP16().round(torch.tensor([65520.0, 65519.0])).tolist() == [math.inf, 65504.0]


@pytest.mark.parametrize("cfg,dtype", [(FP16(), torch.float16), (BF16(), torch.bfloat16),
                                       (E4M3(), torch.float8_e4m3fn), (E5M2(), torch.float8_e5m2)])
def test_agrees_with_torch_casts_in_range(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-30, 30, (200_000,), generator=g).float())
    x = x[x.abs() <= cfg.max_finite]
    assert torch.equal(cfg.round(x), x.to(dtype).float())


@settings(max_examples=150, deadline=None)
@given(st.floats(width=32, allow_nan=False), st.sampled_from(FORMATS))
def test_random_fp32_against_reference(v, fmt):
    e, m, bias, fn = fmt
    cfg = MiniFloat(e, m, bias=bias, variant=Variant.FN if fn else Variant.IEEE)
    x = np.array([v], dtype=np.float32)
    assert _same(cfg.round(torch.from_numpy(x)).numpy(), ref_round(x, e, m, bias, fn, saturate=True))


def test_config_validation_and_names():
    assert MiniFloat(4, 3, variant="fn").name == "e4m3fn"
    assert MiniFloat(4, 3, bias=11, variant="fn").name == "e4m3fnb11"
    assert FP16().name == "fp16" and BF16().name == "bf16" and parse_config("e6m9").bits == 16
    assert parse_config("e5m2-inf").overflow == Overflow.INF
    with pytest.raises(ValueError, match="exponent bits"):
        MiniFloat(9, 3)
    with pytest.raises(ValueError, match="fn"):
        MiniFloat(4, 0, variant="fn")
    with pytest.raises(ValueError, match="fp32"):
        MiniFloat(8, 7, bias=200)
    with pytest.raises(UnsupportedConfig, match="bad configuration"):
        parse_config("e9m3")


@pytest.mark.parametrize("fmt", [(4, 3, 7, True), (5, 2, 15, False), (5, 10, 15, False), (8, 7, 127, False)],
                         ids=["e4m3fn", "e5m2", "fp16", "bf16"])
@pytest.mark.parametrize("overflow", [Overflow.SATURATE, Overflow.INF])
def test_native_cast_path_matches_integer_reference(fmt, overflow):
    # MiniFloat.round takes torch's cast for these formats where it checked it exact (issue 10); the independent
    # integer reference must agree with whichever path runs.
    e, m, bias, fn = fmt
    cfg = MiniFloat(e, m, bias=bias, variant=Variant.FN if fn else Variant.IEEE, overflow=overflow)
    x = probe_inputs(e, m, bias, fn)
    want = ref_round(x, e, m, bias, fn, saturate=overflow == Overflow.SATURATE)
    got = cfg.round(torch.from_numpy(x)).numpy()
    assert _same(got, want), _mismatches(got, want, x)
