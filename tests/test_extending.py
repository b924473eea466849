"""docs/extending.md, checked: a toy transform, fingerprint source and soft-lock format, each one file plus one
registration (tests/plugins/), work through the public API and show up in the CLI's choices."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import chiplock
from chiplock.fingerprint import SOURCES
from chiplock.keys.combine import key_strength
from chiplock.softlock.registry import FORMATS
from chiplock.transforms.base import _TRANSFORMS

PLUGINS = Path(__file__).parent / "plugins"
SECRET = b"extending-test-vendor-secret-32b"


def _plugin(module: str, registry, name: str):
    """Import a toy plug-in (registering it) and unregister it afterwards, so other tests see the built-ins."""
    mod = importlib.import_module(f"plugins.{module}")
    if name not in registry:
        importlib.reload(mod)  # A previous test unregistered it: run its registration again.
    yield mod
    registry.unregister(name)


@pytest.fixture
def toy_transform():
    yield from _plugin("toy_transform", _TRANSFORMS, "toy")


@pytest.fixture
def toy_source():
    yield from _plugin("toy_source", SOURCES, "toy")


@pytest.fixture
def toy_format():
    yield from _plugin("toy_format", FORMATS, "ToyFixed")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16),
            "n": torch.arange(-8, 8, dtype=torch.int32)}


def test_toy_transform_round_trips_and_a_wrong_device_gets_flipped_signs(toy_transform, tmp_path, profile,
                                                                           wrong_profile, fast_kdf):
    from safetensors import safe_open

    weights = _weights()
    path = tmp_path / "m.chiplock"
    chiplock.lock(weights, path, profile, transform="toy", secret=SECRET, kdf=fast_kdf)
    assert chiplock.inspect(path)["groups"]["main"]["transform"] == "toy"
    got = chiplock.unlock(path, profile=profile, secret=SECRET)
    for k, v in weights.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
    with safe_open(str(path), framework="np") as f:
        assert not (f.get_tensor("w") == weights["w"].numpy()).all()  # the stored bytes are transformed
    wrong = chiplock.unlock(path, profile=wrong_profile, secret=SECRET)  # silent, as declared
    assert torch.equal(wrong["w"].abs(), weights["w"].abs()) and not torch.equal(wrong["w"], weights["w"])


def test_toy_source_enrolls_locks_and_declares_its_strength_group(toy_source, tmp_path, monkeypatch, fast_kdf):
    monkeypatch.setenv("CHIPLOCK_TOY_ID", "board-7")
    prof = chiplock.enroll(("toy",), kdf=fast_kdf)
    assert [e.source for e in prof.enrollments] == ["toy"] and prof.enrollments[0].entropy_bits == 8.0
    prof.save(tmp_path / "toy.json")
    path = tmp_path / "m.chiplock"
    chiplock.lock(_weights(), path, chiplock.DeviceProfile.load(tmp_path / "toy.json"), transform="aes",
                  secret=SECRET, kdf=fast_kdf)
    assert torch.equal(chiplock.unlock(path, secret=SECRET)["w"], _weights()["w"])  # measured here
    monkeypatch.setenv("CHIPLOCK_TOY_ID", "board-8")
    with pytest.raises(chiplock.InvalidKey):
        chiplock.unlock(path, secret=SECRET)
    # Same group as precision ("configuration"): only the larger estimate counts; sram adds.
    assert key_strength({"toy": 8.0, "precision": 12.5}).bits == 12.5
    assert key_strength({"toy": 8.0, "sram": 100.0}).bits == 108.0


def test_toy_format_parses_applies_and_brings_its_own_lever(toy_format):
    from chiplock.softlock import apply_config, config_from_dict, config_to_dict, parse_config
    from chiplock.softlock.config import SoftLockConfig
    from chiplock.softlock.levers import plan_levers
    from chiplock.softlock.registry import example_names

    cfg = parse_config("fixed4")
    assert cfg == toy_format.ToyFixed(4) and config_from_dict(config_to_dict(cfg)) == cfg
    assert "fixed4" in example_names()
    assert plan_levers("fp32", ["fixed4"]) == [("scale_layers", {"log2_alpha": 6})]
    assert plan_levers("fp16", ["fixed4"]) == []  # fp16 is not scale-invariant
    assert SoftLockConfig(authorized="fp32", unauthorized=("fixed4+2:4",)).unauthorized[0].name == "fixed4+2:4"
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.equal(apply_config(model, cfg)(x), model(x))
        assert torch.equal(apply_config(model, "fp32")(x), model(x))


@pytest.mark.slow  # a fresh process (~7 s): the CLI builds its choices when it is imported
def test_plugins_found_through_entry_points_show_in_the_cli(tmp_path):
    """An installed plug-in package declares an entry point; the CLI loads it and lists its choices."""
    dist = tmp_path / "toy_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[chiplock.plugins]\ntransform = toy_transform\nsource = toy_source\n"
                                           "format = toy_format\n")
    script = textwrap.dedent("""
        import contextlib, io, json
        from chiplock.cli import run
        out = {}
        for name, argv in {"lock": ["lock", "--help"], "fp": ["fingerprint", "--source", "toy",
                           "--toy-seed", "x", "--json"], "formats": ["softlock", "formats"]}.items():
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = run(argv)
            out[name] = (rc, buf.getvalue())
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PLUGINS)]), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["lock"][0] == 0 and "<aes|pre-aes|shuffle|toy>" in out["lock"][1]
    assert out["fp"][0] == 0 and json.loads(out["fp"][1])["toy"]["entropy_bits"] == 8.0
    assert out["formats"][0] == 0 and "ToyFixed" in out["formats"][1] and "fixed4" in out["formats"][1]
