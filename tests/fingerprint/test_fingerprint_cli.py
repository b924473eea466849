"""`chiplock fingerprint` and `chiplock fingerprint report` through the real command line app."""

import json

from typer.testing import CliRunner

from chiplock.cli import app

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
    assert 0.05 < sram["ber"] < 0.15 and sram["entropy_bits"] >= 128
    md = (out / "report.md").read_text()
    assert "| sram |" in md and "10/10" in md and "reliability_sram.png" in md
    assert (out / "reliability_sram.png").read_bytes()[:4] == b"\x89PNG"
    flips = json.loads((out / "report.json").read_text())["sources"][0]["flip_rates"]
    assert len(flips) == sram["bits"]


def test_report_precision_probe_map(tmp_path):
    res = runner.invoke(app, ["fingerprint", "report", "--source", "precision", "--trials", "2", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "2/2" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "reliability_precision.png").exists()


def test_all_skips_unconfigured_sram_and_never_prints_material(monkeypatch):
    monkeypatch.delenv("CHIPLOCK_SRAM_DUMP", raising=False)
    monkeypatch.delenv("CHIPLOCK_SRAM_SIM_DEVICE", raising=False)
    # Leave the (slow, noisy) clock out of this test; it has its own.
    monkeypatch.setattr("chiplock.fingerprint.cli.available_sources", lambda: ["precision", "sram"])
    res = runner.invoke(app, ["fingerprint", "--source", "all", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert "CHIPLOCK_SRAM_SIM_DEVICE" in data["skipped"]["sram"]
    assert len(data["precision"]["id"]) == 8 and data["precision"]["entropy_bits"] is None
    from chiplock.fingerprint.precision import probe_digests

    assert not any(d in res.output for d in probe_digests().values())


def test_unknown_source_is_a_clear_error():
    res = runner.invoke(app, ["fingerprint", "--source", "nope"])
    assert res.exit_code != 0
    assert "unknown fingerprint source" in str(res.exception)
