"""Saving and loading neuron-locked models: bit-identical round trip, public metadata only, hostile files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save, save_file

from chiplock.errors import ContainerError, FileAccessError, UnsupportedConfig
from chiplock.neuronlock import PasswordSpec, apply_password, derive_password, rank_neurons
from chiplock.neuronlock.model_io import META_KEY, NeuronLockInfo, load_model, save_model
from chiplock.softlock.model_io import build_architecture

KEY = bytes(range(32))
ARCH = {"name": "smallcnn", "num_classes": 10, "image_size": 8, "width": 8}
SPEC = PasswordSpec(gamma=0.2, pool=0.6)


@pytest.fixture(scope="module")
def model_and_stats():
    torch.manual_seed(0)
    model = build_architecture("smallcnn", image_size=8, width=8).eval()
    x = torch.rand(64, 1, 8, 8)
    return model, rank_neurons(model, x), x


def _outputs(model, x, pw=None):
    with torch.no_grad():
        if pw is None:
            return model(x)
        with apply_password(model, pw):
            return model(x)


def test_round_trip_is_bit_identical_and_keeps_public_metadata(tmp_path, model_and_stats):
    model, stats, x = model_and_stats
    path = tmp_path / "locked.safetensors"
    save_model(model, path, arch=ARCH, stats=stats, spec=SPEC, extra={"authorized_acc": 0.97})
    loaded, info = load_model(path)
    assert isinstance(info, NeuronLockInfo) and not loaded.training
    assert info.arch == ARCH and info.spec == SPEC and info.stats == tuple(stats)
    assert info.layers == ("features.0", "features.3", "head.1")
    assert info.extra == {"authorized_acc": 0.97} and info.version == 1
    pw = derive_password(KEY, stats, SPEC)
    # The device re-derives the same password from the stored public data.
    assert derive_password(KEY, info.stats, info.spec) == pw
    assert torch.equal(_outputs(loaded, x, pw), _outputs(model, x, pw))
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_file_holds_no_password(tmp_path, model_and_stats):
    model, stats, _ = model_and_stats
    path = tmp_path / "locked.safetensors"
    save_model(model, path, arch=ARCH, stats=stats, spec=SPEC)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert set(meta) == {META_KEY}
    doc = json.loads(meta[META_KEY])
    assert set(doc) == {"version", "arch", "layers", "stats", "spec", "extra"}
    assert names == set(model.state_dict())
    raw = path.read_bytes()
    pw = derive_password(KEY, stats, SPEC)
    assert KEY not in raw and KEY.hex().encode() not in raw
    assert b'"neurons"' not in raw and b'"scale"' not in raw and b'"values"' not in raw
    for lp in pw.layers:
        assert json.dumps(lp.values).encode()[1:-1] not in raw


@pytest.mark.parametrize("extra, match", [
    ({"password": {"layers": []}}, "password"), ({"notes": {"content_key": "00"}}, "content_key"),
    ({"raw": b"\x00" * 32}, "bytes"), ({"x": [float("nan")]}, "finite"), ({1: "a"}, "string keys"),
])
def test_save_refuses_secret_or_bad_extra(tmp_path, model_and_stats, extra, match):
    model, stats, _ = model_and_stats
    path = tmp_path / "m.safetensors"
    with pytest.raises(UnsupportedConfig, match=match):
        save_model(model, path, arch=ARCH, stats=stats, spec=SPEC, extra=extra)
    assert not path.exists()


def test_save_refuses_a_password_object(tmp_path, model_and_stats):
    model, stats, _ = model_and_stats
    with pytest.raises(UnsupportedConfig, match="never stores the password"):
        save_model(model, tmp_path / "m.safetensors", arch=ARCH, stats=stats, spec=SPEC,
                   extra={"pw": derive_password(KEY, stats)})


def test_save_checks_arch_stats_and_spec(tmp_path, model_and_stats):
    model, stats, _ = model_and_stats
    path = tmp_path / "m.safetensors"
    with pytest.raises(UnsupportedConfig, match="do not match arch"):
        save_model(model, path, arch={**ARCH, "width": 16}, stats=stats, spec=SPEC)
    with pytest.raises(UnsupportedConfig, match="exactly the keys"):
        save_model(model, path, arch={"name": "smallcnn"}, stats=stats, spec=SPEC)
    with pytest.raises(UnsupportedConfig, match="unknown architecture"):
        save_model(model, path, arch={**ARCH, "name": "vgg"}, stats=stats, spec=SPEC)
    with pytest.raises(UnsupportedConfig, match="NeuronStats"):
        save_model(model, path, arch=ARCH, stats=[], spec=SPEC)
    with pytest.raises(UnsupportedConfig, match="PasswordSpec"):
        save_model(model, path, arch=ARCH, stats=stats, spec=SPEC.to_json())
    renamed = [type(stats[0])("features.9", stats[0].importance, stats[0].mean, stats[0].std)]
    with pytest.raises(UnsupportedConfig, match="does not have"):
        save_model(model, path, arch=ARCH, stats=renamed, spec=SPEC)
    short = [type(stats[0])("features.0", stats[0].importance[:3], stats[0].mean[:3], stats[0].std[:3])]
    with pytest.raises(UnsupportedConfig, match="cover 3 neurons"):
        save_model(model, path, arch=ARCH, stats=short, spec=SPEC)
    assert not path.exists()


def _write(path, tensors, doc):
    path.write_bytes(save(tensors, metadata={META_KEY: doc if isinstance(doc, str) else json.dumps(doc)}))


def test_load_refuses_bad_files(tmp_path, model_and_stats):
    model, stats, _ = model_and_stats
    good = tmp_path / "good.safetensors"
    save_model(model, good, arch=ARCH, stats=stats, spec=SPEC)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        doc = json.loads(f.metadata()[META_KEY])
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = tmp_path / "bad.safetensors"

    with pytest.raises(FileAccessError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    save_file(tensors, str(bad))
    with pytest.raises(UnsupportedConfig, match="no 'chiplock.neuronlock' metadata"):
        load_model(bad)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ContainerError, match="not a readable safetensors file"):
        load_model(bad)
    _write(bad, tensors, "{not json")
    with pytest.raises(ContainerError, match="not a valid neuron-locked model"):
        load_model(bad)
    _write(bad, tensors, {**doc, "version": 2})
    with pytest.raises(ContainerError, match="version 2"):
        load_model(bad)
    _write(bad, tensors, {**doc, "password": {}})
    with pytest.raises(ContainerError, match="wrong fields"):
        load_model(bad)
    _write(bad, tensors, {**doc, "layers": ["features.0"]})
    with pytest.raises(ContainerError, match="layers do not match"):
        load_model(bad)
    _write(bad, tensors, {**doc, "stats": [{**doc["stats"][0], "std": [-1.0] * 8}]})
    with pytest.raises(ContainerError, match="not a valid"):
        load_model(bad)
    _write(bad, tensors, {**doc, "spec": {**doc["spec"], "gamma": 3}})
    with pytest.raises(ContainerError, match="spec"):
        load_model(bad)
    _write(bad, tensors, {**doc, "arch": {**ARCH, "width": 4}})
    with pytest.raises(ContainerError, match="do not fit"):
        load_model(bad)
    _write(bad, {k: v for k, v in tensors.items() if k != "head.1.bias"}, doc)
    with pytest.raises(ContainerError, match="do not fit"):
        load_model(bad)


def test_softlock_and_neuronlock_files_are_told_apart(tmp_path, model_and_stats):
    from chiplock.softlock.model_io import save_model as softlock_save

    model, _, _ = model_and_stats
    path = tmp_path / "soft.safetensors"
    softlock_save(model, path, {"arch": ARCH})
    with pytest.raises(UnsupportedConfig, match="softlock.model_io.load_model"):
        load_model(path)
