"""The emulation attack (chiplock.attacks.emulate): its emulated layers really round or mask, its native layers
compute the right thing, and a run fills a row for every configuration on tiny sizes."""

from __future__ import annotations

import time

import pytest
import torch

from chiplock.attacks import emulate
from chiplock.errors import UnsupportedConfig

TINY = {"matmul_n": 64, "gpt_hidden": 64, "gpt_layers": 1, "gpt_vocab": 128, "batch": 1, "seq": 32,
        "repeats": 1, "gpu": "off"}


def _int8_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``linear(a, w)`` after chiplock's default Int8 fake quantisation, computed on integer codes: symmetric
    per-output-channel weights (codes -127..127), asymmetric per-row activations (codes -128..127 and a zero
    point), the products of codes summed exactly in int64 and scaled once at the end."""
    sw = w.abs().amax(dim=1, keepdim=True) / 127
    qw = torch.clamp(torch.round(w / sw), -127, 127).long()
    lo = a.amin(dim=1, keepdim=True).clamp(max=0)
    hi = a.amax(dim=1, keepdim=True).clamp(min=0)
    sa = (hi - lo) / 255
    za = torch.clamp(-128 - torch.round(lo / sa), -128, 127)
    qa = torch.clamp(torch.round(a / sa) + za, -128, 127).long() - za.long()
    return (qa @ qw.T).double() * sa.double() * sw.double().T


def test_emulated_int8_matmul_equals_an_integer_fake_quant_reference():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(48, 64, generator=g)
    w = torch.randn(32, 64, generator=g) * 0.1
    fns = emulate.matmul_fns("int8", a, w)
    ref = _int8_reference(a, w).float()
    plain = a @ w.T
    for mode in ("emulated", "cached"):
        y = fns[mode]()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        # The rounding really happened: the result is measurably off the unrounded product.
        assert (y - plain).abs().max() > 1e-3 * plain.abs().max()
    assert fns["native"] is not None and fns["native"]().dtype == torch.int32


def test_emulated_fp8_rounds_activations_weights_and_outputs_to_e4m3():
    g = torch.Generator().manual_seed(2)
    a, w = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    h = emulate.handler_for("e4m3fn")
    for x in (h.activation(a), h.weight(w), emulate.matmul_fns("e4m3fn", a, w)["emulated"]()):
        assert torch.equal(x.to(torch.float8_e4m3fn).float(), x)
    assert not torch.equal(h.activation(a), a)


def test_emulated_2_4_weights_keep_exactly_two_of_every_four():
    model = emulate.gpt_model(64, 1, 128)
    layers = [m for m in emulate.emulated_model(model, "2:4", cache_weights=True).modules()
              if isinstance(m, emulate.EmulatedLinear)]
    assert len(layers) == 8  # q, k, v, o, gate, up, down, lm_head
    for lin in layers:
        zeros = (lin.weight.reshape(lin.weight.shape[0], -1, 4) == 0).sum(-1)
        assert torch.equal(zeros, torch.full_like(zeros, 2))
    per_call = [m for m in emulate.emulated_model(model, "2:4").modules() if isinstance(m, emulate.EmulatedLinear)]
    assert not (per_call[0].weight == 0).any()  # stored dense, masked on every call
    assert torch.equal(per_call[0].handler.weight(per_call[0].weight), layers[0].weight)


@pytest.mark.parametrize("name", ["int8", "e4m3fn", "2:4"])
def test_emulated_gpt_matches_the_softlock_definition(name):
    from chiplock.softlock import apply_config

    model = emulate.gpt_model(64, 1, 128)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = apply_config(model, name)(input_ids=ids, use_cache=False).logits
        plain = model(input_ids=ids, use_cache=False).logits
        for cache in (False, True):
            got = emulate.emulated_model(model, name, cache_weights=cache)(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want, plain)


@pytest.mark.parametrize("name", ["bf16", "int8", "e4m3fn"])
def test_native_gpt_paths_compute_the_model(name):
    model = emulate.gpt_model(64, 1, 128)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    native, path = emulate.native_model(model, name, torch.device("cpu"))
    assert native is not None, path
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits
        got = native(input_ids=ids, use_cache=False).logits.float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, f"{name}: relative error {rel}"


def test_no_2_4_kernel_on_cpu_is_reported_not_faked():
    model = emulate.gpt_model(64, 1, 128)
    native, reason = emulate.native_model(model, "2:4", torch.device("cpu"))
    assert native is None and "CUDA" in reason
    fns = emulate.matmul_fns("2:4", torch.randn(8, 64), torch.randn(8, 64))
    assert fns["native"] is None and "CUDA" in fns["path"]


def test_time_side_by_side_reports_failures_and_does_not_repeat_slow_calls():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():  # busy, not asleep: on the CPU the clock is the process's CPU time
        calls["slow"] += 1
        t0 = time.process_time()
        while time.process_time() - t0 < 0.03:
            pass

    def broken():
        raise RuntimeError("no kernel for this\nsecond line")

    timed, failed = emulate.time_side_by_side({"fast": fast, "slow": slow, "broken": broken},
                                              device=torch.device("cpu"), repeats=4, slow_s=0.02)
    assert failed == {"broken": "RuntimeError: no kernel for this"}
    assert timed["fast"]["samples"] == 4 and calls["fast"] == 5  # warm-up + 4 repeats
    assert timed["slow"]["samples"] == 1 and calls["slow"] == 1 and timed["slow"]["s"] >= 0.03


def test_bad_settings_raise_unsupported_config():
    with pytest.raises(UnsupportedConfig, match="unknown configuration 'fp99'"):
        emulate.run(preset="smoke", configs="fp32,fp99")
    with pytest.raises(UnsupportedConfig, match="multiple of 64"):
        emulate.run(preset="smoke", matmul_n=100)
    with pytest.raises(UnsupportedConfig, match="gpu="):
        emulate.run(preset="smoke", gpu="maybe")
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        emulate.run(preset="smoke", threads=4)


def test_run_fills_a_row_for_every_configuration(tmp_path):
    res = emulate.run(preset="smoke", **TINY)
    t4 = res.tables[0]
    assert "Table 4" in t4.title and len(t4.rows) == 10
    matmul, gpt = res.tables[1], res.tables[2]
    for table in (matmul, gpt):
        assert [r[0] for r in table.rows] == list(emulate.CONFIGS)
    for workload in ("matmul", "gpt"):
        rows = res.data["cpu"][workload]
        for name in emulate.CONFIGS:
            r = rows[name]
            assert r["emulated_s"] > 0 and r["cached_s"] > 0, (workload, name)
            assert r["native_available"] == (name != "2:4"), (workload, name, r["path"])
            if r["native_available"]:
                assert r["native_s"] > 0 and r["slowdown"] == pytest.approx(r["emulated_s"] / r["native_s"])
    assert res.data["gpu"] == {"skipped": "GPU measurement turned off (gpu=off)"}
    assert any("GPU path skipped" in n for n in res.notes)
    paths = res.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and "Table 4" in paths["md"].read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native fp16/bf16/fp8/int8/2:4 GPU paths need CUDA")
@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "e4m3fn", "2:4"])
def test_gpu_native_paths_run_and_compute_the_model(name):
    dev = torch.device("cuda")
    a, w = torch.randn(256, 256, device=dev), torch.randn(256, 256, device=dev)
    fns = emulate.matmul_fns(name, a, w)
    assert fns["native"] is not None, fns["path"]
    fns["native"]()
    model = emulate.gpt_model(256, 1, 512).to(dev)
    ids = torch.randint(0, 512, (2, 32), device=dev)
    native, path = emulate.native_model(model, name, dev)
    ref_model = emulate.emulated_model(model, "2:4", cache_weights=True) if name == "2:4" else model
    with torch.inference_mode():
        ref = ref_model(input_ids=ids, use_cache=False).logits
        got = native(input_ids=ids, use_cache=False).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.1, path
