"""`chiplock attack` and `make paper`: the harness's plumbing with a fake attack, and the whole smoke run."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from chiplock.attacks import cli as attack_cli
from chiplock.attacks.paper import recompose, run_paper
from chiplock.attacks.result import AttackResult, Table, new_figure, resolve, save_figure
from chiplock.cli import run as cli_run
from chiplock.errors import ContainerError, UnsupportedConfig


def _fake_module(fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("chiplock.attacks.fake")
    mod.PRESETS = {"smoke": {"n": 2, "cache": None}, "paper": {"n": 5, "cache": None}}

    def plot(result: AttackResult, path: Path) -> None:
        fig, (ax,) = new_figure()
        ax.plot([r[0] for r in result.tables[0].rows], [r[1] for r in result.tables[0].rows])
        save_figure(fig, path)

    def run(*, preset="paper", progress=None, **overrides):
        params = resolve(mod.PRESETS, preset, overrides)
        if fail:
            raise RuntimeError("boom")
        rows = [[i, i * i] for i in range(params["n"])]
        return AttackResult(name="fake", title="Fake attack", tables=[Table("Squares", ["i", "i²"], rows)],
                            data={"claims": [{"claim": "squares grow", "measured": f"{rows[-1][1]}"}]},
                            params=params, plot=plot)

    mod.run = run
    return mod


@pytest.fixture
def fake(monkeypatch):
    mod = _fake_module()
    monkeypatch.setitem(sys.modules, "chiplock.attacks.fake", mod)
    monkeypatch.setattr(attack_cli, "ATTACKS", {"fake": ("fake", "A fake attack.")})
    before = list(attack_cli.app.registered_commands)
    attack_cli._command("fake", "A fake attack.")
    yield mod
    attack_cli.app.registered_commands[:] = before


def test_parse_sets_reads_json_and_refuses_items_without_equals():
    assert attack_cli.parse_sets(["bits=[6,8]", "model=digitcnn", "n=3"]) == {"bits": [6, 8], "model": "digitcnn",
                                                                            "n": 3}
    with pytest.raises(UnsupportedConfig, match="KEY=VALUE"):
        attack_cli.parse_sets(["bits"])


def test_unknown_attack_preset_and_setting_are_clear_errors(fake):
    with pytest.raises(UnsupportedConfig, match="choose from fake"):
        attack_cli.module("nope")
    with pytest.raises(UnsupportedConfig, match="unknown preset 'huge'"):
        attack_cli.run_attack("fake", preset="huge")
    with pytest.raises(UnsupportedConfig, match="unknown setting.*bitz"):
        attack_cli.run_attack("fake", overrides={"bitz": 3})
    with pytest.raises(UnsupportedConfig, match="n \\(paper 5, smoke 2\\)"):
        attack_cli.run_attack("fake", overrides={"help": 1})


def test_run_attack_saves_table_json_and_plot(fake, tmp_path):
    r = attack_cli.run_attack("fake", preset="smoke", overrides={"n": 4}, out=tmp_path)
    assert r.params["n"] == 4 and len(r.tables[0].rows) == 4
    data = json.loads((tmp_path / "fake.json").read_text())
    assert data["tables"][0]["rows"][-1] == [3, 9] and data["machine"]["cores"]
    md = (tmp_path / "fake.md").read_text()
    assert "| 3 | 9 |" in md and "![Fake attack](fake.png)" in md
    assert (tmp_path / "fake.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_writes_results_md_and_reports_a_failed_attack(fake, tmp_path, monkeypatch):
    run = run_paper(tmp_path, preset="smoke", cache=tmp_path / "cache")
    assert not run.failed and run.results["fake"].params["cache"] == str(tmp_path / "cache")
    text = (tmp_path / "results.md").read_text()
    assert "| squares grow | 1 |" in text and "results/fake.png" in text and "Total run time" in text
    monkeypatch.setitem(sys.modules, "chiplock.attacks.fake", _fake_module(fail=True))
    run = run_paper(tmp_path, preset="smoke")
    assert "RuntimeError: boom" in run.failed["fake"]
    assert "Failed attacks" in (tmp_path / "results.md").read_text()
    assert "boom" in (tmp_path / "results" / "fake.error.txt").read_text()


def test_cli_runs_an_attack_and_prints_json(fake, tmp_path, capsys):
    assert cli_run(["attack", "fake", "--preset", "smoke", "--set", "n=3", "--json", "-o", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "fake" and out["params"]["n"] == 3
    assert cli_run(["attack", "fake", "--preset", "nope", "-o", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_paper_fills_every_section(tmp_path):
    """`make paper`'s smoke mode, every attack for real: no failure, every table filled, every figure drawn.

    The enumeration's end-to-end walk (about 10 fresh processes) is left to its own test."""
    run = run_paper(tmp_path, preset="smoke", cache=tmp_path / "cache", overrides={"enumerate": {"attack": False}})
    assert not run.failed, run.failed
    assert set(run.results) == set(attack_cli.ATTACKS)
    text = (tmp_path / "results.md").read_text()
    assert "## The claims of README.md" in text and "not extracted" not in text
    for name, r in run.results.items():
        assert r.tables and all(t.rows for t in r.tables), name
        assert f"## {r.title}" in text, name
        if r.plot is not None:
            assert (tmp_path / "results" / f"{name}.png").stat().st_size > 1000, name


def test_recompose_rewrites_results_md_from_the_saved_files(fake, tmp_path):
    with pytest.raises(ContainerError, match="run `make paper` first"):
        recompose(tmp_path)
    run_paper(tmp_path, preset="smoke")
    first = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    assert cli_run(["attack", "all", "--recompose", "-o", str(tmp_path)]) == 0
    again = (tmp_path / "results.md").read_text()
    assert again == first


def test_settings_take_the_presets_types():
    presets = {"paper": {"bits": [6, 8], "trials": 3, "scale": 0.5, "on": True, "name": "x", "cache": None}}
    p = resolve(presets, "paper", {"bits": 10, "trials": 2.0, "scale": 1, "cache": "/tmp/c"})
    assert p["bits"] == [10] and p["trials"] == 2 and isinstance(p["trials"], int) and p["scale"] == 1.0
    assert resolve(presets, "paper", {"bits": "6, 12"})["bits"] == [6, 12]
    for bad in ({"trials": "many"}, {"trials": 2.5}, {"on": 1}, {"name": 3}, {"scale": True}):
        with pytest.raises(UnsupportedConfig, match=f"setting {next(iter(bad))} takes"):
            resolve(presets, "paper", bad)
    with pytest.raises(UnsupportedConfig, match="setting bits takes a list of whole numbers"):
        resolve(presets, "paper", {"bits": "6,abc"})
    assert resolve({"p": {"pairs": ["a->b"]}}, "p", {"pairs": "fp32->e4m3fn,dense->2:4"})["pairs"] == [
        "fp32->e4m3fn", "dense->2:4"]
