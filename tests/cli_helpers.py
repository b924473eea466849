"""Helpers shared by the CLI tests of several packages: run the console script in this process, check the
one-line error contract, and make a synthetic device profile."""

from __future__ import annotations

import os
from pathlib import Path

from chiplock.cli import run
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.profile import DeviceProfile


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process as the console script does: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """The CLI's error contract: exit code 2 and exactly one ``error: ...`` line naming each needle."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def synthetic_device(path: Path | None = None) -> DeviceProfile:
    """A synthetic device with 80 estimated bits and a fast stored device key; saved to ``path`` if given."""
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    profile = DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))
    if path is not None:
        profile.save(path)
    return profile
