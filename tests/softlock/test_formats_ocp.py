"""The formats added for issue 10: fnuz FP8, the OCP MX elements FP6/FP4, MX block scaling, hardware 2:4 grouping and
torch's native float8 casts.

Element rounding is checked bit for bit against ml_dtypes (an independent implementation, in C++) on every code,
every midpoint between neighbours, one fp32 ulp either side of those, and random fp32 values. ml_dtypes overflows by
type (to NaN for e4m3fn and the fnuz types, to inf for e5m2, saturating for the FP6/FP4 types); our ``-inf`` names
do the same, so those are compared on every input including out-of-range ones and +-inf, and our default
(saturating) names are compared in range and checked to give +-max beyond it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chiplock.errors import UnsupportedConfig
from chiplock.softlock import MiniFloat, NMSparsity, Scaled, parse_config
from chiplock.softlock.minifloat import _native_matches, _native_plan, probe_values
from chiplock.softlock.nm_sparsity import nm_mask
from chiplock.softlock.registry import config_from_dict, config_to_dict, get_handler
from chiplock.softlock.scaled import MX_FORMATS, mx

ml_dtypes = pytest.importorskip("ml_dtypes", reason="install the test extra: pip install -e .[test]")

# Our name -> (ml_dtypes type name, the overflow suffix under which our policy equals ml_dtypes', max finite).
TYPES = {
    "e4m3fn": ("float8_e4m3fn", "-inf", 448.0),
    "e5m2": ("float8_e5m2", "-inf", 57344.0),
    "e4m3fnuz": ("float8_e4m3fnuz", "-inf", 240.0),
    "e5m2fnuz": ("float8_e5m2fnuz", "-inf", 57344.0),
    "e4m3b11fnuz": ("float8_e4m3b11fnuz", "-inf", 30.0),
    "e2m3fin": ("float6_e2m3fn", "", 7.5),
    "e3m2fin": ("float6_e3m2fn", "", 28.0),
    "e2m1fin": ("float4_e2m1fn", "", 6.0),
}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _assert_same(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    """Bitwise equality (the sign of zero included), with any NaN equal to any NaN."""
    ok = (np.isnan(got) & np.isnan(want)) | (_bits(got) == _bits(want))
    bad = np.flatnonzero(~ok)[:5]
    assert ok.all(), [(float(x[i]), float(got[i]), float(want[i])) for i in bad]


def _codes(t) -> np.ndarray:
    """Every code of ml_dtypes type ``t``, decoded to fp32."""
    n = 1 << ml_dtypes.finfo(t).bits
    return np.arange(n, dtype=np.uint8).view(t).astype(np.float32)


def _probes(t) -> np.ndarray:
    """Codes, midpoints (also past the largest code), one fp32 ulp either side, and fuzz, both signs, finite."""
    pos = np.unique(np.abs(_codes(t)[np.isfinite(_codes(t))])).astype(np.float64)
    step = pos[-1] - pos[-2]
    ext = np.concatenate([pos, pos[-1] + step * np.arange(1, 4)])
    base = np.concatenate([pos, (ext[:-1] + ext[1:]) / 2, ext[-3:]]).astype(np.float32)
    near = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))])
    rng = np.random.default_rng(0)
    lo, hi = math.frexp(float(pos[1]))[1] - 4, math.frexp(float(pos[-1]))[1] + 2
    fuzz = (rng.standard_normal(50_000) * np.exp2(rng.integers(lo, hi, 50_000))).astype(np.float32)
    wild = rng.integers(0, 2 ** 32, 20_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    allv = np.concatenate([near, fuzz, wild[np.isfinite(wild)], [1e-45, 1e-40, 1e30, 3e38]]).astype(np.float32)
    return np.concatenate([allv, -allv])


def _ours(name: str, x: np.ndarray, native: bool = True) -> np.ndarray:
    return parse_config(name).round(torch.from_numpy(x), native=native).numpy()


@pytest.mark.parametrize("name", TYPES)
def test_max_and_codes_match_ml_dtypes(name):
    t = getattr(ml_dtypes, TYPES[name][0])
    cfg = parse_config(name)
    assert cfg.max_finite == TYPES[name][2] == float(ml_dtypes.finfo(t).max)
    assert cfg.bits == ml_dtypes.finfo(t).bits
    codes = _codes(t)
    finite = codes[np.isfinite(codes)]
    _assert_same(_ours(name, finite), finite, finite)  # every code is a fixed point (fnuz has no -0 code)
    assert np.isnan(codes).sum() == {"fn": 2, "fnuz": 1, "fin": 0, "ieee": 6}[cfg.variant.value]


@pytest.mark.parametrize("native", [True, False], ids=["native", "arith"])
@pytest.mark.parametrize("name", TYPES)
def test_rounding_matches_ml_dtypes_bit_for_bit(name, native):
    t = getattr(ml_dtypes, TYPES[name][0])
    x = _probes(t)
    want = x.astype(t).astype(np.float32)
    mx = TYPES[name][2]
    # Under the overflow policy ml_dtypes uses, every finite input and +-inf agree.
    same_policy = np.concatenate([x, np.float32([np.inf, -np.inf])])
    _assert_same(_ours(name + TYPES[name][1], same_policy, native), same_policy.astype(t).astype(np.float32),
                 same_policy)
    # The default policy saturates: identical wherever ml_dtypes' result is finite, and +-max beyond.
    got = _ours(name, x, native)
    fin = np.isfinite(want)
    _assert_same(got[fin], want[fin], x[fin])
    assert (got[~fin] == np.copysign(mx, x[~fin])).all() and (np.abs(x[~fin]) > mx).all()


@pytest.mark.parametrize("name", ["e4m3fnuz", "e5m2fnuz", "e4m3b11fnuz"])
def test_fnuz_has_no_negative_zero_and_nan_stays_nan(name):
    x = torch.tensor([-0.0, -1e-30, -1e-45, 0.0, math.nan])
    for native in (True, False):
        y = parse_config(name).round(x, native=native)
        assert not torch.signbit(y[:4]).any() and (y[:4] == 0).all() and torch.isnan(y[4])


def test_fin_formats_only_saturate_and_keep_nan():
    with pytest.raises(ValueError, match="no inf or NaN"):
        MiniFloat(2, 1, variant="fin", overflow="inf")
    with pytest.raises(UnsupportedConfig, match="overflow='saturate'"):
        parse_config("e2m1fin-inf")
    # ml_dtypes turns NaN into -0 for these types (they have no NaN code); we keep NaN so that it stays visible.
    assert torch.isnan(parse_config("fp4").round(torch.tensor([math.nan]))).all()
    assert parse_config("fp4").round(torch.tensor([math.inf, -7.0, 5.0, 2.75])).tolist() == [6.0, -6.0, 4.0, 3.0]


def test_names_are_stable_and_round_trip():
    canonical = {"e4m3fnuz": (4, 3, 8, "fnuz"), "e5m2fnuz": (5, 2, 16, "fnuz"), "e4m3b11fnuz": (4, 3, 11, "fnuz"),
                 "e2m3fin": (2, 3, 1, "fin"), "e3m2fin": (3, 2, 3, "fin"), "e2m1fin": (2, 1, 1, "fin"),
                 # Names that existed before keep their meaning.
                 "e2m1": (2, 1, 1, "ieee"), "e2m1fn": (2, 1, 1, "fn"), "e4m3fnb11": (4, 3, 11, "fn"),
                 "e4m3b11": (4, 3, 11, "ieee"), "e4m3fn": (4, 3, 7, "fn"), "e5m2": (5, 2, 15, "ieee")}
    for name, (e, m, bias, variant) in canonical.items():
        cfg = parse_config(name)
        assert (cfg.exp_bits, cfg.man_bits, cfg.bias, cfg.variant.value) == (e, m, bias, variant), name
        assert cfg.name == name and config_from_dict(config_to_dict(cfg)) == cfg
    assert parse_config("e2m1").max_finite == 3.0 and parse_config("e2m1fn").max_finite == 4.0
    aliases = {"e4m3fnuzb11": "e4m3b11fnuz", "E4M3FNUZ": "e4m3fnuz", "float8_e4m3b11fnuz": "e4m3b11fnuz",
               "float6_e2m3fn": "e2m3fin", "fp6e3m2": "e3m2fin", "float4_e2m1fn": "e2m1fin", "fp4": "e2m1fin",
               "e5m2fnuz-inf": "e5m2fnuz-inf", "e4m3finb2": "e4m3b2fin"}
    for alias, name in aliases.items():
        assert parse_config(alias).name == name
        assert parse_config(alias) == parse_config(name)
    with pytest.raises(UnsupportedConfig, match="bias once"):
        parse_config("e4m3b11fnuzb11")


def test_native_cast_is_used_where_exact_and_refused_where_not():
    cpu = torch.device("cpu")
    expected = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e4m3fnuz": torch.float8_e4m3fnuz,
                "e5m2fnuz": torch.float8_e5m2fnuz, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name, dtype in expected.items():
        assert _native_plan(parse_config(name), cpu)[0] is dtype, name
    assert _native_plan(parse_config("e4m3b11fnuz"), cpu) is None  # no torch dtype
    # The check can fail: a format with other codes than the dtype's is caught on the probes, and so is an overflow
    # policy the cast does not follow (e5m2's cast gives inf, so saturating needs the clamp).
    assert not _native_matches(MiniFloat(4, 3, bias=8, variant="fn"), torch.float8_e4m3fn, cpu, clamp=True)
    assert not _native_matches(MiniFloat(5, 2, overflow="inf"), torch.float8_e5m2fnuz, cpu, clamp=False)
    assert not _native_matches(MiniFloat(5, 2), torch.float8_e5m2, cpu, clamp=False)
    assert _native_plan(MiniFloat(5, 2), cpu) == (torch.float8_e5m2, True)


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "e4m3fnuz", "e5m2fnuz", "fp16", "bf16", "e5m2-inf"])
def test_native_and_arithmetic_paths_agree(name):
    cfg = parse_config(name)
    plan = _native_plan(cfg, torch.device("cpu"))
    dtype = plan[0] if plan else torch.float8_e4m3fn
    g = torch.Generator().manual_seed(1)
    fuzz = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-40, 40, (100_000,), generator=g).float())
    x = torch.cat([probe_values(dtype), fuzz])
    _assert_same(cfg.round(x).numpy(), cfg.round(x, native=False).numpy(), x.numpy())
    xt = fuzz[:99_000].reshape(990, 100).t()  # a non-contiguous view keeps its shape and values
    assert torch.equal(cfg.round(xt), cfg.round(xt, native=False)) and cfg.round(xt).shape == (100, 990)


# ---------------------------------------------------------------------------------------------------- MX


def test_mx_names():
    expected = {"mxfp8": "e4m3fn", "mxfp8e4m3": "e4m3fn", "mxfp8e5m2": "e5m2", "mxfp6": "e2m3fin",
                "mxfp6e2m3": "e2m3fin", "mxfp6e3m2": "e3m2fin", "mxfp4": "e2m1fin", "MXFP4": "e2m1fin"}
    for name, element in expected.items():
        cfg = parse_config(name)
        assert cfg == Scaled(element, weights="block", activations="block", block=32, scale="e8m0")
        assert cfg.name == f"{element}@block32-e8m0" and parse_config(cfg.name) == cfg
    assert set(MX_FORMATS) <= set(expected)
    with pytest.raises(ValueError, match="mxfp8"):
        mx("mxfp9")
    with pytest.raises(UnsupportedConfig):
        parse_config("mxfp9")


@pytest.mark.parametrize("name,emax", [("mxfp8", 8), ("mxfp8e5m2", 15), ("mxfp6", 2), ("mxfp6e3m2", 4),
                                       ("mxfp4", 2)])
def test_e8m0_scale_is_floor_log2_amax_minus_element_emax(name, emax):
    cfg = parse_config(name)
    amax = torch.tensor([1.0, 1.5, 8.0, 3e-3, 6e4, 2.0 ** -100, 1e38])
    amax = torch.cat([amax, torch.nextafter(amax, torch.zeros(()))])  # just below powers of two too
    want = torch.tensor([2.0 ** (math.frexp(a)[1] - 1 - emax) for a in amax.tolist()])
    assert torch.equal(cfg._scale_of(amax), want)


def test_mx_block_quantisation_saturates_and_rounds_elementwise():
    cfg = parse_config("mxfp4")
    x = torch.tensor([[7.9, 1.1, -0.2, 0.3] + [0.0] * 28]) * 2.0 ** 5  # amax 7.9 * 32: scale 2**(2 + 5 - 2) = 32
    q = cfg.quantize(x, "block")
    assert q[0, :4].tolist() == [6.0 * 32, 1.0 * 32, 0.0, 0.5 * 32]  # 7.9 saturates to 6; 0.3 -> 0.5; 0.2 -> 0
    x8 = torch.full((1, 32), 1.0)
    x8[0, 0] = 500.0  # e4m3fn: scale 2**(8 - 8) = 1 and 500 saturates to 448
    assert parse_config("mxfp8").quantize(x8, "block")[0, :2].tolist() == [448.0, 1.0]


def test_mx_blocks_of_a_conv_weight_run_along_input_channels():
    w = torch.full((2, 64, 3, 3), 0.3)
    w[0, 5, 1, 2] = 1000.0  # its block is w[0, 0:32, 1, 2]: scale 2**(9 - 2), so 0.3 rounds to zero there
    q = get_handler(parse_config("mxfp4")).weight(w)
    zero = torch.zeros_like(w, dtype=torch.bool)
    zero[0, 0:32, 1, 2] = True
    zero[0, 5, 1, 2] = False
    assert torch.equal(q == 0, zero)
    assert q[0, 5, 1, 2] == 6.0 * 2.0 ** 7
    # Activations (NCHW) block along the channels too; a linear weight along its inputs.
    a = torch.full((1, 64, 2, 2), 0.3)
    a[0, 40, 1, 0] = 1000.0
    zero_a = torch.zeros_like(a, dtype=torch.bool)
    zero_a[0, 32:64, 1, 0] = True
    zero_a[0, 40, 1, 0] = False
    assert torch.equal(get_handler(parse_config("mxfp4")).activation(a) == 0, zero_a)
    lin = torch.full((3, 64), 0.3)
    lin[1, 33] = 1000.0
    ql = get_handler(parse_config("mxfp4")).weight(lin)
    assert (ql[1, 32:] == 0).sum() == 31 and (ql[1, :32] != 0).all() and (ql[[0, 2]] != 0).all()


# ---------------------------------------------------------------------------------------------------- 2:4


def test_two_four_groups_input_channels_at_each_kernel_position():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, 3, 3, generator=g)
    q = get_handler(parse_config("2:4")).weight(w)
    groups = q.movedim(1, -1).reshape(8, 3, 3, 4, 4)  # (out, kh, kw, channel group, 4 channels)
    assert ((groups != 0).sum(-1) == 2).all()
    mags = w.abs().movedim(1, -1).reshape(8, 3, 3, 4, 4)
    keep = groups != 0
    assert (torch.where(keep, mags, torch.inf).amin(-1) >= torch.where(keep, -torch.inf, mags).amax(-1)).all()
    # The flattened NCHW order of version 1 groups differently on the same weight.
    assert not torch.equal(nm_mask(w, 2, 4), nm_mask(w, 2, 4, order="flat"))


def test_two_four_channel_tail_and_linear():
    w = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(2))  # 6 channels: a group of 4, a tail of 2
    mask = nm_mask(w, 2, 4).movedim(1, -1)
    assert (mask[..., :4].sum(-1) == 2).all() and mask[..., 4:].all()
    lin = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(nm_mask(lin, 2, 4), nm_mask(lin, 2, 4, order="flat"))


def test_two_four_versions_and_names():
    old = config_from_dict({"type": "NMSparsity", "n": 2, "m": 4, "version": 1})  # a file written before
    assert old.order == "flat" and old.name == "2:4-flat"
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    flat = get_handler(old).weight(w).reshape(4, -1, 4)
    assert ((flat != 0).sum(-1) == 2).all()
    new = parse_config("2:4")
    assert new == NMSparsity(2, 4) and new.order == "channel" and new.version == 2 and new.name == "2:4"
    assert config_from_dict(config_to_dict(new)) == new and config_from_dict(config_to_dict(old)) == old
    assert parse_config("2:4-flat").order == "flat"
    with pytest.raises(ValueError, match="order"):
        NMSparsity(2, 4, order="nhwc")
    with pytest.raises(UnsupportedConfig, match="upgrade chiplock"):
        config_from_dict({"type": "NMSparsity", "n": 2, "m": 4, "version": 3})
