"""Red team: a host that chooses the executor's inputs recovers the secure part exactly (last-1, ShadowNet,
first-1, TEESlice's head) or nearly (last-2 by the critical-point attack); the mitigation prototypes change what
it gets; a real executor answers hostile inputs without dying and ignores a tampered host spec."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from chiplock.enclave import extraction as ex
from chiplock.enclave.models import NetSpec, TeeSliceNet, build
from chiplock.enclave.partition import HostModel, LocalCall, build_secure, split
from chiplock.errors import ChiplockError, EnclaveError


def _net(seed: int = 1, **kw):
    """A random net whose BN layers are not the identity (so folding them is tested)."""
    net = build(NetSpec(image=8, **{"widths": (4, 8), "fc": 16, **kw}), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.4 * torch.rand(c, generator=gen) - 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.4 * torch.rand(c, generator=gen) - 0.2)
    return net


def _local(p):
    return LocalCall(build_secure(p.spec, {k: v.clone() for k, v in p.secure.items()}))


X = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def test_last1_classifier_recovered_exactly_from_d_plus_1_queries():
    net = _net()
    p = split(net, "last-k", k=1)
    got = ex.steal_last1(p.spec, p.public, _local(p))
    assert got.queries == 16 + 1 and got.calls == 1
    for name in ("units.3.lin.weight", "units.3.lin.bias"):
        assert torch.allclose(got.weights[name], p.secure[name], atol=1e-5, rtol=0)
    assert torch.allclose(got.model(X), net(X), atol=1e-5)


def test_labels_only_answers_defeat_the_exact_solve():
    p = split(_net(), "last-k", k=1)
    got = ex.steal_last1(p.spec, p.public, ex.LabelsOnly(_local(p)))
    assert (got.weights["units.3.lin.weight"] - p.secure["units.3.lin.weight"]).abs().max() > 0.05


def test_shadownet_key_recovered_exactly():
    net = _net()
    p = split(net, "shadownet", fake_ratio=0.5, seed=3)
    got = ex.steal_shadownet(p.spec, p.public, _local(p))
    for i in range(net.spec.units):
        index = p.secure[f"shadow.{i}.index"]
        assert torch.equal(got.info["index"][i], index)
        assert got.info["fakes"][i] == sorted(set(range(p.public[f"shadow.{i}.weight"].shape[0])) -
                                              set(index.tolist()))
    folded = ex.fold_bn(net)
    for name, want in folded.items():
        assert torch.allclose(got.weights[name], want, atol=1e-5, rtol=1e-5), name
    assert torch.allclose(got.model(X), net(X), atol=1e-4)
    # One call per post op: a zero input and 10 probe values per disguised channel.
    cin = [p.public[f"shadow.{i}.weight"].shape[0] for i in range(net.spec.units)]
    assert got.calls == net.spec.units and got.queries == sum(1 + 10 * c for c in cin) < 600


def test_first1_folded_conv_recovered_exactly():
    net = _net()
    p = split(net, "first-k", k=1)
    got = ex.steal_first1(p.spec, p.public, _local(p))
    folded = ex.fold_bn(net)
    for name in ("units.0.lin.weight", "units.0.lin.bias"):
        assert torch.allclose(got.weights[name], folded[name], atol=1e-5, rtol=0), name
    assert got.queries == 1 + 10 * net.spec.in_channels


def test_teeslice_head_columns_for_the_backbone_features_recovered_exactly():
    ts = TeeSliceNet(_net(widths=(4, 8, 8)), ratio=0.5, seed=2, start=1).eval()
    p = split(ts, "teeslice")
    base = [f[0] for f in ts.features(X[:1])[p.spec["start"]:]]
    got = ex.steal_teeslice_head(p.spec, p.public, _local(p), base=base)
    fc = ts.spec.fc
    assert got.queries == fc + 1
    assert torch.allclose(got.weights["head.weight[:, :fc]"], p.secure["head.weight"][:, :fc], atol=1e-5, rtol=0)


def test_teeslice_without_conv_slices_is_stolen_whole():
    backbone = _net()
    ts = TeeSliceNet(backbone, ratio=0.25, seed=2, start=2).eval()  # start = number of conv units: fc slice + head
    p = split(ts, "teeslice")
    base = [f.mean(0) for f in ts.features(X)[p.spec["start"]:]]
    got = ex.steal_teeslice(p.spec, p.public, _local(p), base=base, model=TeeSliceNet(backbone, ratio=0.25, seed=7, start=2))
    assert got.info["complete"] and got.info["neurons_found"] == ts.slices[-1].lin.out_features
    want = ts(X)
    assert (got.model(X) - want).abs().max() < 1e-3 * want.abs().max()


def test_last2_relu_extraction_is_functionally_exact():
    net = _net(fc=12)
    p = split(net, "last-k", k=2)
    feats = net.forward_units(X, 0, 2).detach()
    got = ex.steal_last2(p.spec, p.public, _local(p), center=feats.mean(0))
    assert got.info["neurons_found"] == 12
    names = ("units.2.lin.weight", "units.2.lin.bias", "units.3.lin.weight", "units.3.lin.bias")
    err = ex.match_relu1(ex.Relu1(*(got.weights[n].double() for n in names)),
                         ex.Relu1(*(p.secure[n].double() for n in names)))
    assert err["w1"] < 0.05 and err["w2"] < 0.05, err
    # Off the data too: the recovered tail is the victim's function.
    z = feats.mean(0) + 2 * torch.randn(256, feats.shape[1], generator=torch.Generator().manual_seed(1))
    want = net.forward_units(z, 2, 4)
    assert (got.model.forward_units(z, 2, 4) - want).abs().max() < 1e-2 * want.abs().max()


def test_mitigation_wrappers():
    p = split(_net(), "last-k", k=1)
    call = _local(p)
    x = torch.rand(3, 16)
    assert torch.equal(ex.Rounded(call, 1)("tail", [x])[0], torch.round(call("tail", [x])[0], decimals=1))
    one_hot = ex.LabelsOnly(call)("tail", [x])[0]
    assert torch.equal(one_hot.argmax(1), call("tail", [x])[0].argmax(1)) and float(one_hot.sum()) == 3
    b = ex.Budget(call, 4)
    b("tail", [x])
    with pytest.raises(EnclaveError, match="budget"):
        b("tail", [x[:2]])
    with pytest.raises(EnclaveError, match="inputs must lie in"):
        ex.InputRange(call, 0.0, 1.0)("tail", [x + 1.0])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the executor is Linux-only")
def test_real_executor_leaks_the_same_and_survives_hostile_inputs(tmp_path):
    from chiplock.enclave.executor import Enclave
    from chiplock.enclave.harden import seccomp_available
    from chiplock.enclave.package import issue, package
    from chiplock.fingerprint import Enrollment
    from chiplock.keys import INSECURE_FAST, KdfParams
    from chiplock.license import ContentKeys
    from chiplock.profile import DeviceProfile

    net = _net()
    p = split(net, "last-k", k=1, max_batch=64)
    package(p, tmp_path / "m.chiplock", content_keys_path=tmp_path / "m.keys")
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    dev = DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))
    secret = b"the executor's own vendor secret"
    _, lic = issue(ContentKeys.load(tmp_path / "m.keys"), host_profile=None, enclave_profile=dev,
                   enclave_secret=secret)
    lic.save(tmp_path / "e.license")
    dev.save(tmp_path / "e.profile")
    (tmp_path / "e.secret").write_bytes(secret)
    with Enclave.start(tmp_path / "m.chiplock", tmp_path / "e.license", profile=tmp_path / "e.profile",
                       secret_file=tmp_path / "e.secret", budget_mib=1, seccomp=seccomp_available()) as enc:
        got = ex.steal_last1(p.spec, p.public, enc)
        assert torch.allclose(got.weights["units.3.lin.weight"], p.secure["units.3.lin.weight"], atol=1e-5)
        # Denormal, extreme and max-batch inputs are answered; non-finite ones, bad batches and dtypes are refused
        # cleanly, and the executor keeps serving.
        for x in (torch.full((2, 16), 1e-45), torch.full((2, 16), 3.4e38), torch.randn(64, 16)):
            assert enc("tail", [x])[0].shape == (x.shape[0], 10)
        for x in (torch.full((2, 16), float("nan")), torch.full((2, 16), float("inf"))):
            with pytest.raises(EnclaveError, match="NaN or infinite"):
                enc("tail", [x])
        for x in (torch.randn(65, 16), torch.zeros(0, 16), torch.zeros(2, 16, dtype=torch.float64)):
            with pytest.raises(EnclaveError, match="refused 'tail'"):
                enc("tail", [x])
        # A host that rewrites its own spec (another strategy, k or max_batch) cannot make the executor run it.
        for kw in ({"strategy": "last-k", "k": 2}, {"strategy": "all-in"}, {"strategy": "last-k", "k": 1,
                                                                          "max_batch": 4096}):
            q = split(net, **kw)
            with pytest.raises(ChiplockError, match="refused"):
                HostModel(q.spec, q.public, enc)(torch.rand(100 if "max_batch" in kw else 3, 1, 8, 8))
        st = enc.status()
        assert enc._proc.poll() is None and st["errors"] == 8 and st["switches"] == 1 + 3
        assert st["outputs"] == "logits"
    # The same executor with labels-only answers: the exact solve gets nothing; honest predictions are unchanged.
    with Enclave.start(tmp_path / "m.chiplock", tmp_path / "e.license", profile=tmp_path / "e.profile",
                       secret_file=tmp_path / "e.secret", budget_mib=1, seccomp=seccomp_available(),
                       labels_only=True) as enc:
        got = ex.steal_last1(p.spec, p.public, enc)
        assert (got.weights["units.3.lin.weight"] - p.secure["units.3.lin.weight"]).abs().max() > 0.05
        x = torch.rand(32, 1, 8, 8)
        labels = HostModel(p.spec, p.public, enc)(x)
        assert torch.equal(labels.argmax(1), net(x).argmax(1)) and set(labels.unique().tolist()) <= {0.0, 1.0}
        assert enc.status()["outputs"] == "labels"


# ----------------------------------------------------------------------------------------------------------------
# The harness (`chiplock attack extract`)
# ----------------------------------------------------------------------------------------------------------------

def test_harness_refuses_bad_settings():
    from chiplock.errors import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match="unknown preset"):
        ex.run(preset="huge")
    with pytest.raises(UnsupportedConfig, match="unknown setting"):
        ex.run(preset="smoke", epochs=3)
    with pytest.raises(UnsupportedConfig, match="attacks"):
        ex.run(preset="smoke", attacks=["last-3"])
    with pytest.raises(UnsupportedConfig, match="datasets"):
        ex.run(preset="smoke", datasets=["cifar10"])
    with pytest.raises(UnsupportedConfig, match="label_queries"):
        ex.run(preset="smoke", label_queries=[1])


@pytest.mark.slow
def test_smoke_preset_fills_every_table_and_claim(tmp_path):
    r = ex.run(preset="smoke")
    assert r.name == "extract" and len(r.tables) == 2
    attacks, mitigations = r.tables
    col = {c: i for i, c in enumerate(attacks.columns)}
    rows = {row[col["attack"]]: row for row in attacks.rows}
    assert set(rows) == set(ex.ATTACKS)
    # The exact attacks are exact on the trained victim; learning-based ones are not claimed exact.
    for name in ("last-1", "last-2", "shadownet", "first-1", "teeslice head", "teeslice no-conv"):
        assert rows[name][col["exact"]] is True, rows[name]
    for name in ("first-2 fit", "labels-only fit"):
        assert rows[name][col["exact"]] is False
    d = r.params["fc_digits8"]
    assert rows["last-1"][col["queries"]] == d + 1 and rows["last-1"][col["agreement"]] == 1.0
    mcol = {c: i for i, c in enumerate(mitigations.columns)}
    mit = {(row[mcol["attack"]], row[mcol["mitigation"]]): row for row in mitigations.rows}
    assert {t for t, _ in mit} == {"last-1", "shadownet"}
    assert mit[("last-1", "none (raw logits)")][mcol["exact"]] is True
    assert mit[("last-1", "labels only: exact solve")][mcol["exact"]] is False
    assert mit[("last-1", "labels only: exact solve")][mcol["agreement"]] < 0.9
    budgets = [row for (t, m), row in mit.items() if m.startswith("budget")]
    assert [row[mcol["exact"]] for row in budgets] == [False, False, True]  # only d + 1 rows suffice
    claims = r.data["claims"]
    assert len(claims) >= 10 and all(c["claim"] and any(ch.isdigit() for ch in c["measured"]) for c in claims)
    assert any(c["claim"].startswith("labels-only") and "fails" in c["measured"] for c in claims)
    paths = r.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and "Mitigation prototypes" in paths["md"].read_text()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the executor is Linux-only")
def test_harness_labels_only_rows_through_a_real_executor():
    r = ex.run(preset="smoke", attacks=["last-1"], enclave=True)
    col = {c: i for i, c in enumerate(r.tables[1].columns)}
    rows = {(row[col["via"]], row[col["mitigation"]]): row for row in r.tables[1].rows}
    real = {m: row for (via, m), row in rows.items() if via.startswith("Enclave")}
    assert len(real) == 2 and all("executor outputs labels" in row[col["note"]] for row in real.values())
    solve = real["labels only: exact solve"]
    assert solve[col["exact"]] is False and solve[col["agreement"]] < 0.9
    # The real executor's labels are the prototype's: the same fit gives the same agreement.
    fit = next(m for m in real if m.startswith("labels only: softmax"))
    assert real[fit][col["agreement"]] == rows[("LocalCall", fit)][col["agreement"]]


def test_labels_only_covers_first_k_over_every_unit():
    """first-k with k = n returns the logits from its front op: labels-only must reduce it too (review finding)."""
    net = _net()
    full = split(net, "first-k", k=net.spec.units)
    assert build_secure(full.spec, full.secure).final_ops == {"front"}
    part = split(net, "first-k", k=1)
    assert build_secure(part.spec, part.secure).final_ops == set()
    for s, op in (("last-k", "tail"), ("all-in", "forward"), ("shadownet", f"post{net.spec.units - 1}")):
        q = split(net, s)
        assert build_secure(q.spec, q.secure).final_ops == {op}
