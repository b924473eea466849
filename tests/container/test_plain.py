"""Plain safetensors files read and written one tensor at a time (:mod:`chiplock.container.plain`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chiplock.container.plain import read_plain, write_safetensors
from chiplock.errors import ContainerError, UnsupportedConfig


def test_write_safetensors_takes_torch_dtypes_and_reads_back(tmp_path: Path) -> None:
    ts = {"w": torch.randn(3, 2), "i": torch.arange(4, dtype=torch.int16), "h": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as fh:
        size = write_safetensors(fh, [(n, t.dtype, t.shape) for n, t in ts.items()], list(ts.items())[::-1],
                                 metadata={"format": "pt", "k": "v"})
    assert size == os.path.getsize(path)
    got = load_file(str(path))
    assert all(torch.equal(got[n], t) for n, t in ts.items())
    plain = read_plain(path)
    assert [e.name for e in plain.entries] == list(ts) and plain.metadata == {"format": "pt", "k": "v"}
    assert all(torch.equal(t, ts[n]) for n, t in plain)


def test_write_safetensors_refuses_an_unstorable_dtype(tmp_path: Path) -> None:
    with open(tmp_path / "x.safetensors", "wb") as fh, pytest.raises(UnsupportedConfig, match="cannot store"):
        write_safetensors(fh, [("c", torch.complex64, (2,))], [])


@pytest.mark.parametrize("damage, why", [
    (lambda b: b[:-1], "truncated or has trailing bytes"),
    (lambda b: b + b"\0", "truncated or has trailing bytes"),
    (lambda b: (1 << 40).to_bytes(8, "little") + b[8:], "not a valid safetensors weights file"),
])
def test_read_plain_refuses_damaged_files(tmp_path: Path, damage, why: str) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ContainerError, match=why):
        read_plain(path)
