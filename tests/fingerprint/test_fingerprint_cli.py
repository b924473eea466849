"""`chiplock fingerprint` and `chiplock fingerprint report` through the real command line app."""

import hashlib
import json

from typer.testing import CliRunner

from chiplock.cli import app
from chiplock.fingerprint.precision import PRECISION_ENTROPY_BITS, config_facts, probe_digests, probe_ids

runner = CliRunner()


def test_report_writes_markdown_json_and_png(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    out = tmp_path / "rep"
    res = runner.invoke(app, ["fingerprint", "report", "--source", "sram", "--sram-sim", "dev-1", "--trials", "10",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (sram,) = data["sources"]
    assert sram["source"] == "sram" and sram["trials"] == 10 and sram["reproduced"] == 10
    assert 0.05 < sram["ber"] < 0.15 and sram["entropy_bits"] == 0.0  # simulated: binds nothing
    md = (out / "report.md").read_text()
    assert "| sram |" in md and "10/10" in md and "reliability_sram.png" in md
    assert (out / "reliability_sram.png").read_bytes()[:4] == b"\x89PNG"
    flips = json.loads((out / "report.json").read_text())["sources"][0]["flip_rates"]
    assert len(flips) == sram["bits"]


def test_report_precision_probe_map(tmp_path):
    res = runner.invoke(app, ["fingerprint", "report", "--source", "precision", "--trials", "2", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    assert "2/2" in md and (tmp_path / "reliability_precision.png").exists()
    assert "## Precision: configurations software can reach" in md
    assert f"Credited {PRECISION_ENTROPY_BITS:.1f} bits" in md and "--enumerate" in md
    for v in _enumerator_values()["ids"]:
        assert v not in md and v not in (tmp_path / "report.json").read_text()


def test_all_skips_unconfigured_sram_and_never_prints_material(monkeypatch):
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    monkeypatch.delenv("CHIPLOCK_SRAM_SIM_DEVICE", raising=False)
    # Leave the (slow, noisy) clock out of this test; it has its own.
    monkeypatch.setattr("chiplock.fingerprint.cli.available_sources", lambda: ["precision", "sram"])
    res = runner.invoke(app, ["fingerprint", "--source", "all", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert "CHIPLOCK_SRAM_SIM_DEVICE" in data["skipped"]["sram"]
    assert data["precision"]["entropy_bits"] == PRECISION_ENTROPY_BITS and "id" not in data["precision"]
    assert not any(d in res.output for d in probe_digests().values())


def _enumerator_values() -> dict[str, list[str]]:
    """What an attacker who enumerates configurations can compute and look for in a published output."""
    from chiplock.fingerprint import get_source

    digests = probe_digests()
    material = get_source("precision").enroll().material
    facts = config_facts()
    return {"ids": [hashlib.sha256(b"chiplock/id" + material).hexdigest()[:8], *probe_ids(digests).values(),
                    *digests.values(), material.hex()],
            "facts": [facts["torch"], facts["numpy"], facts["cpu_capability"], *([facts["cpu"]] if facts.get("cpu")
                                                                               else [])]}


def test_public_output_holds_nothing_an_enumerator_can_match():
    values = _enumerator_values()
    for args in (["--json"], []):
        res = runner.invoke(app, ["fingerprint", "--source", "precision", *args])
        assert res.exit_code == 0, res.output
        found = [v for v in values["ids"] + values["facts"] if v in res.output]
        assert not found, f"public output contains {found}"
    data = json.loads(runner.invoke(app, ["fingerprint", "--source", "precision", "--json"]).output)
    assert set(data) == {"precision"} and set(data["precision"]) == {"entropy_bits", "helper", "info"}
    assert "threads" not in data["precision"]["info"] and "config" not in data["precision"]["info"]


def test_sensitive_flag_adds_ids_and_configuration_facts():
    values = _enumerator_values()
    res = runner.invoke(app, ["fingerprint", "--source", "precision", "--json", "--sensitive"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["precision"]["id"] == values["ids"][0]
    assert data["precision"]["probes"] == probe_ids(probe_digests())
    assert data["config"]["torch"] == values["facts"][0] and "threads" in data["config"]
    assert "SENSITIVE" in runner.invoke(app, ["fingerprint", "--source", "precision", "--sensitive"]).output


def test_unknown_source_is_a_clear_error():
    res = runner.invoke(app, ["fingerprint", "--source", "nope"])
    assert res.exit_code != 0
    assert "unknown fingerprint source" in str(res.exception)


def test_report_enumerate_adds_the_measured_configuration_space(tmp_path, monkeypatch):
    # A synthetic machine (no fresh processes): two variables, one with 3 classes, one with 2, independent.
    from chiplock.fingerprint import configurations as cfg

    space = {"X": {cfg.UNSET: {}, "x1": {"X": "x1"}, "x2": {"X": "x2"}}, "Y": {cfg.UNSET: {}, "y1": {"Y": "y1"}}}
    monkeypatch.setattr(cfg, "default_space", lambda *a, **k: space)
    monkeypatch.setattr(cfg._Runner, "_one", lambda self, s: {"p": s.get("X", "-"), "q": s.get("Y", "-")})
    res = runner.invoke(app, ["fingerprint", "report", "--source", "precision", "--trials", "2", "-o", str(tmp_path),
                              "--enumerate", "--json"])
    assert res.exit_code == 0, res.output
    enum = json.loads(res.output)["precision_enumeration"]
    assert enum["composed"] == 6 and enum["bits"] == 2.58 and enum["checks_matched"] == enum["checks"] > 0
    assert "classes" not in enum  # which settings equal the default would name this CPU's ISA
    md = (tmp_path / "report.md").read_text()
    assert "**6 distinct = 2.6 bits**" in md and "| X | 3 | 3 | 1 |" in md
    assert json.loads((tmp_path / "report.json").read_text())["precision_enumeration"]["composed"] == 6
