"""benchmarks/sharded.py: the synthetic HF folder it generates, and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_sharded", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sharded = _load_script()


@pytest.mark.parametrize("total", [int(1e8), int(1e9), int(1e10)])
def test_plan_hits_the_size_with_both_dtypes_and_a_bounded_largest_tensor(total):
    largest = 256 << 20
    tensors, config = sharded.plan_model(total, largest)
    sizes = [sharded.nbytes(s, d) for _, s, d in tensors]
    assert abs(sum(sizes) - total) / total < 0.15
    assert max(sizes) <= min(largest, total // 8)
    assert max(sizes) == sharded.nbytes(tensors[0][1], tensors[0][2])  # The embedding is the largest tensor.
    fp32 = sum(b for (_, _, d), b in zip(tensors, sizes) if d == "fp32")
    assert 0.1 < fp32 / sum(sizes) < 0.6
    assert config["num_hidden_layers"] >= 1 and len({n for n, _, _ in tensors}) == len(tensors)


def test_pack_shards_keeps_order_and_respects_the_shard_size():
    tensors, _ = sharded.plan_model(int(1e9), 256 << 20)
    shard = int(250e6)
    shards = sharded.pack_shards(tensors, shard)
    assert [t for sh in shards for t in sh] == tensors
    assert len(shards) > 1
    for sh in shards:
        assert len(sh) == 1 or sum(sharded.nbytes(s, d) for _, s, d in sh) <= shard


def test_generate_writes_an_hf_folder(tmp_path):
    info = sharded.generate(tmp_path, 4 << 20, 1 << 19, 1 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == info["shards"] > 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    seen, total = {}, 0
    for f in files:
        for name, t in load_file(str(tmp_path / f)).items():
            seen[name] = f
            total += t.numel() * t.element_size()
            if t.dim() == 2:
                assert abs(t.float().std().item() - 0.02) < 0.002, name
    assert seen == index["weight_map"]
    assert total == index["metadata"]["total_size"] == info["bytes"]
    dtypes = {t.dtype for f in files for t in load_file(str(tmp_path / f)).values()}
    assert dtypes == {torch.bfloat16, torch.float32}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, str(SCRIPT), "--sizes", "0.01", "--transforms", "aes", "--runs", "1", "--pairs", "1",
           "--out", str(out), "--cache", str(cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "sharded.json").read_text())
    (entry,) = result["results"]
    (row,) = entry["rows"]
    assert row["transform"] == "aes"
    for op in ("lock", "unlock", "baseline", "unlock_to_file"):
        assert row[op]["s"] > 0
        assert row[op]["peak_rss"] >= row[op]["rss_before"] > 0
    assert row["ratio"] > 0 and row["unlock"]["kept_tensors"] == entry["model"]["tensors"]
    assert row["lock"]["pass_rss"] == (row["lock"]["peak_rss"] <= entry["rss_target_bytes"])
    assert "| 0.01 GB | aes |" in (out / "sharded.md").read_text()
    # The outputs are removed; the generated source stays cached for the next run.
    assert not (cache / "work").exists()
    assert (Path(entry["source"]) / ".complete").is_file()
