"""Partition strategies: equivalence with the plain model, what each side holds, strict spec/tensor checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from chiplock.enclave.models import NetSpec, TeeSliceNet, build
from chiplock.enclave.partition import (
    STRATEGIES,
    HostModel,
    LocalCall,
    SecurePart,
    build_secure,
    parse_spec,
    split,
)
from chiplock.errors import EnclaveError, UnsupportedConfig

NET = NetSpec(image=8, widths=(4, 8, 8), fc=16)
N = NET.units


def _trained_like(seed: int = 1):
    """A net whose BN statistics and biases are not the defaults, so a dropped post or bias shows."""
    net = build(NET, seed=seed)
    net.train()
    with torch.no_grad():
        net(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 3)
        for u in net.units:
            u.lin.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return net.eval()


def _model(strategy: str):
    net = _trained_like()
    return TeeSliceNet(net, ratio=0.25, seed=3).eval() if strategy == "teeslice" else net


def _host(p, call=None):
    call = call or LocalCall(build_secure(p.spec, p.secure))
    return HostModel(p.spec, p.public, call), call


X = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("strategy, k", [(s, 2) for s in STRATEGIES] + [("last-k", 1), ("last-k", N),
                                                                       ("first-k", 1), ("first-k", N)])
def test_host_model_matches_plain_model(strategy, k):
    model = _model(strategy)
    p = split(model, strategy, k=k)
    host, call = _host(p)
    ref = model(X)
    out = host(X)
    tol = 1e-5 if strategy == "shadownet" else 0.0  # un-scaling costs float rounding only
    assert torch.allclose(out, ref, rtol=tol, atol=tol), (out - ref).abs().max()
    assert call.switches == {"all-out": 0, "shadownet": N}.get(strategy, 1)
    assert not set(p.public) & set(p.secure)
    json.dumps(p.spec)  # public JSON


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_secure_side_holds_weights_the_host_lacks(strategy):
    model = _model(strategy)
    p = split(model, strategy, k=2)
    if strategy == "all-out":
        assert p.secure == {} and p.spec["ops"] == {}
    public = list(p.public.values())
    # Linear weights of the model whose values appear nowhere in the public part (under any name).
    hidden = [m for m, t in model.state_dict().items() if m.endswith(("lin.weight", "head.weight"))
              and not any(u.shape == t.shape and torch.equal(u, t) for u in public)]
    assert bool(hidden) == (strategy != "all-out"), hidden
    assert all(m not in p.public for m in p.secure)


def test_shadownet_public_weights_are_disguised():
    net = _trained_like()
    p = split(net, "shadownet", seed=5, fake_ratio=0.25)
    for i, c in enumerate([*NET.widths, NET.fc, NET.classes]):
        real = net.units[i].lin.weight.detach().flatten(1)
        shown = p.public[f"shadow.{i}.weight"].flatten(1)
        assert shown.shape[0] == c + math.ceil(0.25 * c) == c + p.spec["fakes"][i]
        assert f"units.{i}.lin.bias" in p.secure and f"units.{i}.lin.bias" not in p.public
        scale = p.secure[f"shadow.{i}.scale"]
        assert bool((scale >= 0.5).all() and (scale <= 2.0).all())
        # No shown row equals a real filter, but the real rows are the real filters scaled.
        assert not any(torch.allclose(row, r) for row in shown for r in real)
        idx = p.secure[f"shadow.{i}.index"]
        assert torch.allclose(shown[idx], real * scale[:, None], atol=1e-6)
    q = split(net, "shadownet", seed=6)
    assert not torch.equal(q.public["shadow.0.weight"], p.public["shadow.0.weight"])


@pytest.mark.parametrize("breakage", ["scale", "index", "bias"])
def test_broken_disguise_is_detected(breakage):
    """The equivalence check can fail: a wrong key or a missing bias changes the output."""
    net = _trained_like()
    p = split(net, "shadownet")
    secure = dict(p.secure)
    if breakage == "scale":
        secure["shadow.1.scale"] = secure["shadow.1.scale"].clone() * torch.linspace(0.8, 1.2, 8)
    elif breakage == "index":
        secure["shadow.1.index"] = secure["shadow.1.index"].flip(0).clone()
    else:
        secure["units.2.lin.bias"] = torch.zeros_like(secure["units.2.lin.bias"])
    host, _ = _host(type(p)(p.spec, p.public, secure))
    assert not torch.allclose(host(X), net(X), atol=1e-3)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "all-out"])
def test_build_secure_keeps_tensor_storage(strategy):
    p = split(_model(strategy), strategy, k=2)
    part = build_secure(p.spec, p.secure)
    held = {t.data_ptr() for t in part._module.state_dict().values()}
    assert all(t.data_ptr() in held for t in p.secure.values())
    # Behaviour agrees: an in-place change of a given tensor changes what the part computes.
    op = next(iter(p.spec["ops"]))
    inputs = [torch.rand(2, *d["shape"]) for d in p.spec["ops"][op]["inputs"]]
    before = part.run(op, inputs)[0]
    w = next(t for m, t in p.secure.items() if m.endswith("weight") and t.dtype == torch.float32)
    w.mul_(3.0)
    assert not torch.allclose(before, part.run(op, inputs)[0])


def test_spec_has_no_weight_dependence():
    """Two models of the same architecture (and two disguise seeds) give the same spec: no secret is in it."""
    for s in ("last-k", "first-k", "shadownet", "all-in"):
        assert split(build(NET, seed=1), s, seed=1).spec == split(build(NET, seed=2), s, seed=2).spec
    a, b = TeeSliceNet(build(NET, seed=1)), TeeSliceNet(build(NET, seed=2), seed=9)
    assert split(a, "teeslice").spec == split(b, "teeslice").spec


def test_split_copies():
    net = _trained_like()
    p = split(net, "last-k", k=1)
    with torch.no_grad():
        net.units[-1].lin.weight.zero_()
    assert p.secure[f"units.{N - 1}.lin.weight"].abs().sum() > 0


@pytest.mark.parametrize("start", [0, 1, 3])
def test_teeslice_any_start_matches(start):
    model = TeeSliceNet(_trained_like(), ratio=0.5, seed=2, start=start).eval()
    p = split(model, "teeslice")
    assert p.spec["start"] == start and len(p.spec["ops"]["slices"]["inputs"]) == N - start
    host, call = _host(p)
    assert torch.equal(host(X), model(X)) and call.switches == 1
    with pytest.raises(EnclaveError, match="'start'"):
        parse_spec({**p.spec, "start": 4})
    with pytest.raises(EnclaveError, match="'ops' does not match"):
        parse_spec({**p.spec, "start": (start + 1) % 4})


def test_spec_survives_json_round_trip():
    p = split(_model("teeslice"), "teeslice")
    spec = json.loads(json.dumps(p.spec))
    host, _ = _host(type(p)(spec, p.public, p.secure))
    assert host(X).shape == (5, 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "darknetz"}, "unknown partition strategy"), ({"strategy": "last-k", "k": 0}, "out of range"),
    ({"strategy": "first-k", "k": N + 1}, "out of range"), ({"strategy": "teeslice"}, "needs a TeeSliceNet"),
    ({"strategy": "shadownet", "fake_ratio": 2.0}, "fake_ratio"), ({"strategy": "all-in", "max_batch": 0}, "max_batch"),
])
def test_split_rejects(kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(UnsupportedConfig, match=match):
        split(build(NET), kwargs.pop("strategy"), **kwargs)


def test_split_refuses_teeslicenet_for_other_strategies():
    with pytest.raises(UnsupportedConfig, match="needs a SeqNet"):
        split(TeeSliceNet(build(NET)), "last-k")


def _spec(strategy="last-k"):
    return copy.deepcopy(split(_model(strategy), strategy, k=2).spec)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: "not a dict", "JSON object"),
    (lambda s: {**s, "version": 2}, "version"),
    (lambda s: {**s, "version": True}, "version"),
    (lambda s: {**s, "version": 1.0}, "version"),
    (lambda s: {**s, "strategy": "magic"}, "unknown strategy"),
    (lambda s: {**s, "extra": 1}, "unknown fields"),
    (lambda s: {m: v for m, v in s.items() if m != "ops"}, "missing fields"),
    (lambda s: {**s, "k": 99}, "'k'"),
    (lambda s: {**s, "k": True}, "'k'"),
    (lambda s: {**s, "max_batch": 10 ** 9}, "max_batch"),
    (lambda s: {**s, "net": {**s["net"], "widths": [4, 8, 9]}}, "'ops' does not match"),
    (lambda s: {**s, "net": {**s["net"], "image": 10 ** 6}}, "image"),
    (lambda s: {**s, "ops": {"tail": {"inputs": [{"dtype": "float32", "shape": [1]}], "outputs": []}}},
     "'ops' does not match"),
    (lambda s: {**s, "secure_tensors": {}}, "'secure_tensors' does not match"),
])
def test_spec_validation(mutate, match):
    with pytest.raises(EnclaveError, match=match):
        parse_spec(mutate(_spec()))


def test_strategy_fields_validated():
    s = _spec("shadownet")
    for bad in ([1] * (N - 1), [99] * N, "x", [True] * N):
        with pytest.raises(EnclaveError, match="fakes"):
            parse_spec({**s, "fakes": bad})
    t = _spec("teeslice")
    for bad in (0, 1.5, "0.25", None):
        with pytest.raises(EnclaveError, match="ratio"):
            parse_spec({**t, "ratio": bad})
    with pytest.raises(EnclaveError, match="'secure_tensors' does not match"):
        parse_spec({**t, "ratio": 0.5})  # the declared slice shapes no longer fit


@pytest.mark.parametrize("mutate, match", [
    (lambda t: {m: v for m, v in list(t.items())[1:]}, "missing"),
    (lambda t: {**t, "units.0.lin.weight": torch.zeros(4, 1, 3, 3)}, "unexpected"),
    (lambda t: {**t, f"units.{N - 1}.lin.bias": torch.zeros(11)}, "declares float32 \\[10\\]"),
    (lambda t: {**t, f"units.{N - 1}.lin.bias": torch.zeros(10, dtype=torch.float64)}, "float64"),
    (lambda t: {**t, f"units.{N - 1}.lin.bias": [0.0] * 10}, "is list"),
    (lambda t: list(t.values()), "must be a dict"),
])
def test_build_secure_checks_tensors(mutate, match):
    p = split(_model("last-k"), "last-k", k=2)
    with pytest.raises(EnclaveError, match=match):
        build_secure(p.spec, mutate(dict(p.secure)))


@pytest.mark.parametrize("key, value", [("shadow.0.index", torch.tensor([0, 1, 2, 99])),
                                        ("shadow.0.index", torch.tensor([0, 1, 1, 2])),
                                        ("shadow.0.scale", torch.tensor([1.0, 0.0, 1.0, 1.0])),
                                        ("shadow.0.scale", torch.tensor([1.0, float("nan"), 1.0, 1.0]))])
def test_build_secure_checks_disguise_key(key, value):
    p = split(_model("shadownet"), "shadownet")
    with pytest.raises(EnclaveError, match="disguise key"):
        build_secure(p.spec, {**p.secure, key: value})


@pytest.mark.parametrize("answer", [lambda xs: [], lambda xs: [torch.zeros(2, 3)], lambda xs: torch.zeros(5, 10),
                                    lambda xs: [torch.zeros(5, 10, dtype=torch.float64)],
                                    lambda xs: [torch.zeros(5, 10), torch.zeros(5, 10)]])
def test_host_model_checks_answers(answer):
    p = split(_model("all-in"), "all-in")
    host = HostModel(p.spec, p.public, lambda op, xs: answer(xs))
    with pytest.raises(EnclaveError, match="answer to op 'forward'"):
        host(X)


def test_example_inputs_fit_every_op():
    for s in ("shadownet", "teeslice", "first-k"):
        p = split(_model(s), s)
        part = build_secure(p.spec, p.secure)
        for op in part.ops:
            assert len(part.run(op, part.example_inputs(op, batch=3))[0]) == 3
    with pytest.raises(EnclaveError, match="unknown op"):
        part.example_inputs("nope")


def test_host_model_checks_public_tensors():
    p = split(_model("first-k"), "first-k", k=2)
    with pytest.raises(EnclaveError, match="public tensor"):
        HostModel(p.spec, {**p.public, f"units.{N - 1}.lin.weight": torch.zeros(3, 3)}, lambda op, xs: xs)


@pytest.fixture(scope="module")
def teeslice_part():
    p = split(_model("teeslice"), "teeslice", max_batch=4)
    return p, build_secure(p.spec, p.secure)


def _feats(batch, part):
    return [torch.rand(batch, *d["shape"]) for d in part.ops["slices"]["inputs"]]


@pytest.mark.parametrize("op, inputs, match", [
    ("forward", lambda part: [torch.rand(1, 1, 8, 8)], "unknown op 'forward'"),
    ("slices", lambda part: _feats(2, part)[:-1], f"takes {N - 2} input"),
    ("slices", lambda part: torch.rand(2, 1, 8, 8), "takes"),
    ("slices", lambda part: [_feats(2, part)[0].double(), *_feats(2, part)[1:]], "float64"),
    ("slices", lambda part: [torch.rand(2, 8, 4, 5), *_feats(2, part)[1:]], "expected float32 \\[batch, 8, 4, 4\\]"),
    ("slices", lambda part: [torch.rand(8, 4, 4), *_feats(2, part)[1:]], "input 0"),
    ("slices", lambda part: [_feats(3, part)[0], *_feats(2, part)[1:]], "same batch"),
    ("slices", lambda part: _feats(5, part), "1..4"),
    ("slices", lambda part: [0, *_feats(2, part)[1:]], "input 0 is int"),
])
def test_run_checks_inputs(teeslice_part, op, inputs, match):
    _, part = teeslice_part
    with pytest.raises(EnclaveError, match=match):
        part.run(op, inputs(part))


def test_run_answers_declared_shapes(teeslice_part):
    _, part = teeslice_part
    assert isinstance(part, SecurePart)
    out = part.run("slices", _feats(4, part))
    assert [list(o.shape) for o in out] == [[4, *d["shape"]] for d in part.ops["slices"]["outputs"]]
    assert part.parameters_bytes() == sum(t.numel() * 4 for t in teeslice_part[0].secure.values()
                                          if t.dtype == torch.float32) + 8 * sum(
        t.numel() for t in teeslice_part[0].secure.values() if t.dtype == torch.int64)


def test_host_model_splits_large_batches_and_counts_bytes(teeslice_part):
    p, part = teeslice_part
    host, call = _host(p, LocalCall(part))
    x = torch.rand(10, 1, 8, 8)
    out = host(x)
    assert out.shape == (10, 10) and call.switches == 3  # 4 + 4 + 2
    per_sample = sum(math.prod(d["shape"]) * 4 for d in p.spec["ops"]["slices"]["inputs"])
    assert call.bytes_in == 10 * per_sample and call.bytes_out == 10 * 10 * 4
    assert torch.allclose(out, _model("teeslice")(x), atol=1e-6)
    host.train()
    assert not host.training
