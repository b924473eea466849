"""The compiled pre-aes decoder and preimage search must agree bit for bit with the numpy definition, on every
kind of code and every dtype the kernel rounds to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiplock.transforms.base import raw_view
from chiplock.transforms.pre_aes import _Codec, _model_and_codec, from_order_key, order_key

F8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    cases = {
        "f32-gauss": torch.randn(20_000, generator=g) * 0.05,
        "f32-nonfinite": torch.tensor([1.0, float("nan"), float("-inf")] + [0.5, -0.25] * 200),
        "f32-zeros-tiny": torch.cat([torch.randn(5000, generator=g), torch.zeros(500), torch.full((9,), 1e-42)]),
        "f32-small": torch.randn(7, generator=g),
        "f16-gauss": (torch.randn(20_000, generator=g) * 0.1).half(),
        "f16-tiny-and-inf": torch.tensor([0.0, float("inf")] + [1e-7, -6e-8] * 200).half(),
        "bf16": torch.randn(20_000, generator=g).bfloat16(),
        "bf16-zeros": torch.cat([torch.randn(5000, generator=g), torch.zeros(300)]).bfloat16(),
        "i8": torch.randint(-128, 128, (5000,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-3000, 3000, (5000,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-2**40, 2**40, (5000,), generator=g),
        "u8": torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(500, generator=g) > 0.5,
    }
    for d in F8:
        cases[f"{d}".split(".")[-1]] = (torch.randn(5000, generator=g) * 4).to(d)
    return cases


CASES = _cases()


def _codec(x: torch.Tensor) -> _Codec:
    keys = order_key(raw_view(x), *_kind(x))
    return _model_and_codec(x, keys, np.random.SeedSequence(5))[1]


def _kind(x: torch.Tensor) -> tuple[str, int]:
    from chiplock.transforms.base import DTYPES

    udtype, kind = DTYPES[x.dtype]
    return kind, np.dtype(udtype).itemsize * 8


def _codes(codec: _Codec) -> np.ndarray:
    rng = np.random.default_rng(7)
    codes = rng.integers(0, np.iinfo(codec.cdtype).max, size=200_000, dtype=codec.cdtype, endpoint=True)
    # Include the boundaries of every slot and interval and of the escape region, where rounding, clamping and
    # the region test matter most.
    slots = (np.arange(1 << 16, dtype=np.uint64) << np.uint64(codec.b - 16)).astype(codec.cdtype)
    edges = [slots, slots - codec.cdtype(1), np.iinfo(codec.cdtype).max - np.arange(300, dtype=codec.cdtype)]
    if not codec.raw:
        edges += [codec.cs.astype(codec.cdtype), (codec.ce - np.uint64(1)).astype(codec.cdtype),
                  np.array([codec.mc % (1 << codec.b), (codec.mc - 1) % (1 << codec.b)], dtype=codec.cdtype)]
    return np.concatenate([codes, *edges])


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_decoder_matches_the_numpy_definition(name):
    codec = _codec(CASES[name])
    codes = _codes(codec)
    keys = codec.decode_reference(codes)
    np.testing.assert_array_equal(codec.decode(codes), keys)
    # The unlock path writes element bits straight into the output: the same map, then the inverse order key.
    out = np.empty(codes.size, dtype=codec.udtype)
    codec.decode_bits_into(codes, out)
    np.testing.assert_array_equal(out, from_order_key(keys.astype(codec.udtype), codec.kind, codec.w))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decoded_values_lie_in_the_model_or_the_escape_region(name):
    codec = _codec(CASES[name])
    if codec.raw:
        pytest.skip("raw mode: codes are order keys")
    keys = codec.decode(_codes(codec))
    in_model = (keys >= codec.U[0]) & (keys <= codec.U[-1])
    in_escape = (keys >= np.uint64(codec.esc_lo)) & (keys - np.uint64(codec.esc_lo) < np.uint64(codec.R))
    assert np.all(in_model | in_escape)


@pytest.mark.parametrize("name", ["f32-gauss", "f32-zeros-tiny", "bf16-zeros", "f16-gauss", "i8", "i64"])
def test_preimage_search_is_exact_for_every_value(name):
    x = CASES[name]
    codec = _codec(x)
    kind, w = _kind(x)
    u = np.unique(order_key(raw_view(x), kind, w).astype(np.uint64))
    lo, cnt = codec.preimage(u)
    ok = cnt > 0
    mc = np.uint64(codec.mc % (1 << 64))
    last = lo[ok] + cnt[ok] - np.uint64(1)
    np.testing.assert_array_equal(codec.decode_reference(lo[ok]), u[ok])
    np.testing.assert_array_equal(codec.decode_reference(last), u[ok])
    inner = lo[ok] > 0
    assert np.all(codec.decode_reference(lo[ok][inner] - np.uint64(1)) < u[ok][inner])
    inner = last + np.uint64(1) < mc
    assert np.all(codec.decode_reference(last[inner] + np.uint64(1)) > u[ok][inner])
    # Values without main-region codes have an escape code.
    has, esc = codec.escape_code(u[~ok])
    assert np.all(has) and np.array_equal(codec.decode_reference(esc), u[~ok])


def _first_code_reference(codec: _Codec, u: np.ndarray, strict: bool) -> np.ndarray:
    """The first main-region code whose numpy-defined decode is >= u (> when strict), by bisection over the
    whole main region (the decode is monotone there): an independent check of the compiled search."""
    lo = np.zeros(u.size, np.uint64)
    hi = np.full(u.size, codec.mc, np.uint64)  # mc < 2**64 wherever the main region is searched
    while np.any(lo < hi):
        mid = lo + (hi - lo) // np.uint64(2)
        d = codec.decode_reference(np.minimum(mid, np.uint64(codec.mc - 1)))
        hit = (d > u) if strict else (d >= u)
        hi = np.where((lo < hi) & hit, mid, hi)
        lo = np.where((lo < hi) & ~hit, mid + np.uint64(1), lo)
    return lo


@pytest.mark.parametrize("name", ["f32-gauss", "f32-zeros-tiny", "f16-gauss", "bf16-zeros", "i32", "i64"])
def test_preimage_is_exact_at_breakpoints_and_zeros(name):
    # Keys at, just below and just above every breakpoint (where the clamp decides), +-0 and the smallest
    # subnormals (where value order and key order part), and keys the data does not hold.
    x = CASES[name]
    codec = _codec(x)
    kind, w = _kind(x)
    top = np.uint64((1 << w) - 1)
    special = order_key(raw_view(torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-42], dtype=x.dtype)), kind, w) \
        if kind == "float" else np.zeros(0, np.uint64)
    rng = np.random.default_rng(11)
    spread = rng.integers(int(codec.U[0]), int(codec.U[-1]), 2000, dtype=np.uint64, endpoint=True)
    u = np.unique(np.concatenate([codec.U, codec.U - np.uint64(1), codec.U + np.uint64(1),
                                  special.astype(np.uint64), spread]) & top)
    lo, cnt = codec.preimage(u)
    first = _first_code_reference(codec, u, False)
    end = _first_code_reference(codec, u, True)
    np.testing.assert_array_equal(cnt, np.where(end > first, end - first, np.uint64(0)))
    np.testing.assert_array_equal(lo[cnt > 0], first[cnt > 0])
