"""Sharded model folders: planning, locking and unlocking folders, and the folder rules (atomic, no data loss).

Most tests pass a plain ``lock_one`` that copies the shard (directory logic only); the round trips use the real
``chiplock.lock``/``chiplock.unlock`` with a fast KDF.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import chiplock
from chiplock.container.shards import (HF_INDEX, LOCKED_INDEX, LockedDir, lock_dir, locked_dir_shards, plan_source,
                                       unlock_dir, write_safetensors)
from chiplock.errors import ContainerError, FileAccessError, OutputError, UnsupportedConfig
from chiplock.keys import INSECURE_FAST, KdfParams

SECRET = b"vendor secret for the shard tests"


def _tensors(seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{seed}.w{i}": torch.randn(4, 3, generator=g) for i in range(n)}


def make_folder(folder: Path, shards: int = 3, *, index: bool = True) -> dict[str, torch.Tensor]:
    """An HF-style folder: ``shards`` safetensors files, the index, config.json and a tokenizer file."""
    folder.mkdir()
    weight_map, all_tensors = {}, {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if index else "model.safetensors"
        ts = _tensors(i)
        save_file(ts, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ts})
        all_tensors.update(ts)
    if index:
        (folder / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    return all_tensors


def copy_lock(src: Path, out: Path, i: int, n: int) -> dict:
    """A stand-in for a real lock: directory logic only."""
    shutil.copyfile(src, out)
    return {"content_id": "ab" * 8, "index": i, "count": n}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    make_folder(tmp_path / "src")
    return tmp_path / "src"


def _hidden(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".chiplock-")]


# --------------------------------------------------------------------------------------------------------------
# plan_source

def test_plan_hf_folder(src: Path) -> None:
    plan = plan_source(src)
    assert [p.name for p in plan.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in plan.side_files) == ["config.json", "tokenizer.json"]
    assert plan.index["metadata"] == {"total_size": 123}
    assert plan.weight_map["layer1.w0"] == "model-00002-of-00003.safetensors"
    # The index path names the same folder.
    assert plan_source(src / HF_INDEX).shards == plan.shards


def test_plan_single_file_and_pickles(tmp_path: Path) -> None:
    make_folder(tmp_path / "one", shards=1, index=False)
    (tmp_path / "one" / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "one" / "training_args.pt").write_bytes(b"pickle")
    plan = plan_source(tmp_path / "one")
    assert [p.name for p in plan.shards] == ["model.safetensors"] and plan.index is None
    # Pickle weights next to safetensors are never side files (they would carry the weights in plaintext).
    assert sorted(p.name for p in plan.side_files) == ["config.json", "tokenizer.json"]
    os.remove(tmp_path / "one" / "model.safetensors")
    with pytest.raises(UnsupportedConfig, match="pickle weights.*safe_serialization=True"):
        plan_source(tmp_path / "one")


def test_plan_refuses_ambiguous_or_empty(tmp_path: Path) -> None:
    make_folder(tmp_path / "two", shards=3)
    os.remove(tmp_path / "two" / HF_INDEX)
    with pytest.raises(UnsupportedConfig, match="3 .safetensors files but no model.safetensors.index.json"):
        plan_source(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedConfig, match="holds no \\*.safetensors"):
        plan_source(tmp_path / "empty")
    with pytest.raises(FileAccessError, match="does not exist"):
        plan_source(tmp_path / "missing")


@pytest.mark.parametrize("shard", ["../model-00001-of-00003.safetensors", "/etc/model.safetensors",
                                   "sub/model-00001-of-00003.safetensors", ".hidden.safetensors"])
def test_index_path_escape_refused(src: Path, shard: str) -> None:
    doc = json.loads((src / HF_INDEX).read_text())
    doc["weight_map"]["layer0.w0"] = shard
    (src / HF_INDEX).write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match="not a plain file name|hidden file"):
        plan_source(src)


@pytest.mark.parametrize("doc, why", [
    ([], "is not a JSON object"),
    ({"weight_map": []}, 'no "weight_map"'),
    ({"weight_map": {}}, 'no "weight_map"'),
    ({"weight_map": {"a": 3}}, "not a file name"),
    ({"weight_map": {"a": "gone.safetensors"}}, "missing from the folder"),
    ({"weight_map": {"a": "model.bin"}}, "safetensors only"),
    ({"metadata": [], "weight_map": {"a": "x.safetensors"}}, '"metadata" entry that is not an object'),
])
def test_index_types_checked(src: Path, doc: object, why: str) -> None:
    (src / HF_INDEX).write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match=why):
        plan_source(src)


def test_index_bounded(src: Path) -> None:
    (src / HF_INDEX).write_text("[" * 100 + "]" * 100)
    with pytest.raises(ContainerError, match="nested deeper"):
        plan_source(src)


def test_index_must_agree_with_shards(src: Path) -> None:
    doc = json.loads((src / HF_INDEX).read_text())
    doc["weight_map"]["layer0.w0"] = "model-00002-of-00003.safetensors"  # the wrong shard
    (src / HF_INDEX).write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match="lists tensor 'layer0.w0' in 'model-00002-of-00003.safetensors', but "
                                             "it is in 'model-00001-of-00003.safetensors'"):
        plan_source(src)
    del doc["weight_map"]["layer0.w0"]
    (src / HF_INDEX).write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match="does not list.*layer0.w0"):
        plan_source(src)


# --------------------------------------------------------------------------------------------------------------
# lock_dir: folder rules

def test_lock_dir_layout(src: Path, tmp_path: Path) -> None:
    seen = []
    r = lock_dir(src, tmp_path / "out", copy_lock, progress=lambda *a: seen.append(a))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.json", "model-00001-of-00003.chiplock", "model-00002-of-00003.chiplock",
                                       "model-00003-of-00003.chiplock", LOCKED_INDEX, "tokenizer.json"]
    index = json.loads((out / LOCKED_INDEX).read_text())
    assert index == r["index"]
    sizes = sum(os.path.getsize(out / f"model-0000{i}-of-00003.chiplock") for i in (1, 2, 3))
    import hashlib

    side = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("config.json", "tokenizer.json")}
    assert index["metadata"] == {"format": "chiplock", "total_size": sizes, "source_index": {"total_size": 123},
                                 "content_id": "ab" * 8, "side_files": side}
    assert index["weight_map"]["layer2.w1"] == "model-00003-of-00003.chiplock" and len(index["weight_map"]) == 6
    assert [m["index"] for m in r["shards"].values()] == [0, 1, 2]
    assert seen == [("shards", 1, 3), ("shards", 2, 3), ("shards", 3, 3)]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert _hidden(tmp_path) == []
    ld = locked_dir_shards(out)
    assert [p.name for p in ld.shards] == sorted(set(index["weight_map"].values()))
    assert ld.weight_map == index["weight_map"] and sorted(p.name for p in ld.side_files) == ["config.json",
                                                                                              "tokenizer.json"]


def test_lock_dir_parallel_same_result(src: Path, tmp_path: Path) -> None:
    a = lock_dir(src, tmp_path / "a", copy_lock)
    b = lock_dir(src, tmp_path / "b", copy_lock, workers=3)
    assert a["index"] == b["index"] and a["shards"] == b["shards"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_input_refused(src: Path, where: str) -> None:
    out = {"same": src, "inside": src / "locked", "parent": src.parent}[where]
    before = sorted(os.listdir(src))
    with pytest.raises(OutputError, match={"same": "is the input folder", "inside": "is inside the input folder",
                                           "parent": "is inside the output folder"}[where]):
        lock_dir(src, out, copy_lock, force=True)
    assert sorted(os.listdir(src)) == before


def test_existing_output(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock_dir(src, out, copy_lock)  # An empty folder is filled.
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty.*force"):
        lock_dir(src, out, copy_lock)
    assert (out / "keep.txt").exists()
    lock_dir(src, out, copy_lock, force=True)
    assert not (out / "keep.txt").exists() and (out / LOCKED_INDEX).exists()
    assert _hidden(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        lock_dir(src, tmp_path / "file", copy_lock)
    with pytest.raises(OutputError, match="does not exist; create it first"):
        lock_dir(src, tmp_path / "missing" / "out", copy_lock)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_leaves_nothing(src: Path, tmp_path: Path, workers: int) -> None:
    def fail_second(s: Path, o: Path, i: int, n: int) -> dict:
        if i == 1:
            raise UnsupportedConfig("boom")
        return copy_lock(s, o, i, n)

    with pytest.raises(UnsupportedConfig, match="boom"):
        lock_dir(src, tmp_path / "out", fail_second, workers=workers)
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []
    # A failure while replacing keeps the old folder intact.
    lock_dir(src, tmp_path / "out", copy_lock)
    with pytest.raises(UnsupportedConfig):
        lock_dir(src, tmp_path / "out", fail_second, force=True, workers=workers)
    assert (tmp_path / "out" / LOCKED_INDEX).exists() and _hidden(tmp_path) == []


def test_stale_build_folder_swept(src: Path, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".chiplock-tmp-out.{pid}.0123456789ab"
    stale.mkdir()
    (stale / "model-00001-of-00003.chiplock").write_bytes(b"partial")
    other = tmp_path / f".chiplock-tmp-other.{pid}.0123456789ab"  # Another target's: left alone.
    other.mkdir()
    mine = tmp_path / f".chiplock-tmp-out.{os.getpid()}.0123456789ab"  # A live process's: left alone.
    mine.mkdir()
    lock_dir(src, tmp_path / "out", copy_lock)
    assert not stale.exists() and other.exists() and mine.exists()


def test_workers_checked(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be a positive int"):
        lock_dir(src, tmp_path / "out", copy_lock, workers=0)


# --------------------------------------------------------------------------------------------------------------
# locked_dir_shards

def test_locked_index_validated(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock_dir(src, out, copy_lock)
    doc = json.loads((out / LOCKED_INDEX).read_text())
    for shard, why in [("../x.chiplock", "not a plain file name"), ("gone.chiplock", "missing from the folder"),
                       ("model-00001-of-00003.safetensors", "not a .chiplock file")]:
        bad = json.loads(json.dumps(doc))
        bad["weight_map"]["layer0.w0"] = shard
        (out / LOCKED_INDEX).write_text(json.dumps(bad))
        with pytest.raises(ContainerError, match=why):
            locked_dir_shards(out)
    bad = json.loads(json.dumps(doc))
    bad["metadata"]["format"] = "other"
    (out / LOCKED_INDEX).write_text(json.dumps(bad))
    with pytest.raises(ContainerError, match="not a chiplock index"):
        locked_dir_shards(out)
    os.remove(out / LOCKED_INDEX)
    with pytest.raises(ContainerError, match="3 containers but no model.chiplock.index.json"):
        locked_dir_shards(out)
    with pytest.raises(ContainerError, match="holds no \\*.chiplock container"):
        locked_dir_shards(src)


def test_single_container_folder(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.chiplock").write_bytes(b"x")
    (tmp_path / "one" / "config.json").write_text("{}")
    ld = locked_dir_shards(tmp_path / "one")
    assert [p.name for p in ld.shards] == ["model.chiplock"] and ld.weight_map == {}
    assert [p.name for p in ld.side_files] == ["config.json"]


# --------------------------------------------------------------------------------------------------------------
# Real lock / unlock round trip

def _real_lock(profile, kdf):
    def one(s: Path, o: Path, i: int, n: int) -> dict:
        return chiplock.lock(s, o, profile, transform="aes", secret=SECRET, kdf=kdf)
    return one


def _unlock_fns(profile):
    def iter_shard(p: Path):
        return chiplock.unlock(p, profile, SECRET).items()

    def shard_header(p: Path):
        return [(n, t["dtype"], t["shape"]) for n, t in chiplock.inspect(p)["tensors"].items()]
    return iter_shard, shard_header


def test_round_trip(tmp_path: Path, profile, assert_bit_exact) -> None:
    want = make_folder(tmp_path / "src")
    (tmp_path / "src" / "vocab.txt").write_text("a\nb\n")
    lock_dir(tmp_path / "src", tmp_path / "locked", _real_lock(profile, KdfParams(**INSECURE_FAST)), workers=2)
    locked = tmp_path / "locked"
    # No plaintext weights in a locked folder; every shard is a container.
    assert not [n for n in os.listdir(locked) if n.endswith(".safetensors")]
    assert all(chiplock.inspect(p)["format"] == "chiplock" for p in locked_dir_shards(locked).shards)
    assert (locked / "vocab.txt").read_text() == "a\nb\n"
    r = unlock_dir(locked, tmp_path / "plain", *_unlock_fns(profile))
    plain = tmp_path / "plain"
    got = {}
    for name in r["shards"]:
        got.update(load_file(str(plain / name)))
    assert sorted(got) == sorted(want)
    for k in want:
        assert_bit_exact(got[k], want[k], k)
    index = json.loads((plain / HF_INDEX).read_text())
    assert index["weight_map"] == json.loads((tmp_path / "src" / HF_INDEX).read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in want.values())
    assert sorted(r["side_files"]) == ["config.json", "tokenizer.json", "vocab.txt"]
    # Plaintext is the owner's only, as a single unlocked file is.
    assert os.stat(plain).st_mode & 0o777 == 0o700
    assert {os.stat(plain / n).st_mode & 0o777 for n in r["shards"]} == {0o600}
    # The plaintext folder loads with the lock_dir it came from: a full circle.
    assert plan_source(plain).weight_map == plan_source(tmp_path / "src").weight_map
    # Unlocked weights never replace a locked folder, even with force.
    with pytest.raises(OutputError, match="holds a locked model"):
        unlock_dir(locked, shutil.copytree(locked, tmp_path / "locked2"), *_unlock_fns(profile), force=True)


def test_unlock_checks_weight_map_before_keys(tmp_path: Path, profile, wrong_profile) -> None:
    make_folder(tmp_path / "src")
    lock_dir(tmp_path / "src", tmp_path / "locked", _real_lock(profile, KdfParams(**INSECURE_FAST)))
    index_path = tmp_path / "locked" / LOCKED_INDEX
    doc = json.loads(index_path.read_text())
    doc["weight_map"]["layer0.w0"] = "model-00003-of-00003.chiplock"
    index_path.write_text(json.dumps(doc))
    # The wrong device would get InvalidKey: a ContainerError shows the check ran before any key work.
    with pytest.raises(ContainerError, match="lists tensor 'layer0.w0' in 'model-00003-of-00003.chiplock', but it "
                                             "is in 'model-00001-of-00003.chiplock'"):
        unlock_dir(tmp_path / "locked", tmp_path / "plain", *_unlock_fns(wrong_profile))
    del doc["weight_map"]["layer0.w0"]
    index_path.write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match="the index does not list"):
        unlock_dir(tmp_path / "locked", tmp_path / "plain", *_unlock_fns(wrong_profile))
    assert not (tmp_path / "plain").exists() and _hidden(tmp_path) == []


def test_unlock_failure_leaves_nothing(tmp_path: Path, profile, wrong_profile) -> None:
    make_folder(tmp_path / "src")
    lock_dir(tmp_path / "src", tmp_path / "locked", _real_lock(profile, KdfParams(**INSECURE_FAST)))
    with pytest.raises(chiplock.InvalidKey):
        unlock_dir(tmp_path / "locked", tmp_path / "plain", *_unlock_fns(wrong_profile))
    assert not (tmp_path / "plain").exists() and _hidden(tmp_path) == []


def test_unlock_single_container(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.chiplock").write_bytes(b"x")
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    r = unlock_dir(LockedDir(tmp_path / "one", [tmp_path / "one" / "model.chiplock"], {}, {}, []),
                   tmp_path / "plain", lambda p: iter([("t", t)]), lambda p: [("t", torch.int16, (2, 3))])
    assert r["shards"] == ["model.safetensors"] and not (tmp_path / "plain" / HF_INDEX).exists()
    assert torch.equal(load_file(str(tmp_path / "plain" / "model.safetensors"))["t"], t)


# --------------------------------------------------------------------------------------------------------------
# write_safetensors

def test_write_safetensors_any_order(tmp_path: Path) -> None:
    ts = {"a": torch.randn(3, 2), "b": torch.arange(5, dtype=torch.int64), "c": torch.zeros(0, 4, dtype=torch.bfloat16),
          "d": torch.tensor(True)}
    entries = [(n, {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16", torch.bool: "BOOL"}[t.dtype],
                tuple(t.shape)) for n, t in ts.items()]
    with open(tmp_path / "x.safetensors", "wb") as fh:
        size = write_safetensors(fh, entries, reversed(list(ts.items())))
    assert size == os.path.getsize(tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in ts.items())


@pytest.mark.parametrize("stream, why", [
    ([("a", torch.zeros(2))], "never came out"),
    ([("a", torch.zeros(2)), ("b", torch.zeros(3)), ("a", torch.zeros(2))], "came twice"),
    ([("a", torch.zeros(2)), ("z", torch.zeros(3))], "index does not list"),
    ([("a", torch.zeros(3)), ("b", torch.zeros(3))], "has dtype torch.float32 and shape \\(3,\\)"),
    ([("a", torch.zeros(2, dtype=torch.float64)), ("b", torch.zeros(3))], "not F32"),
])
def test_write_safetensors_checks(tmp_path: Path, stream: list, why: str) -> None:
    with open(tmp_path / "x.safetensors", "wb") as fh, pytest.raises(ContainerError, match=why):
        write_safetensors(fh, [("a", "F32", (2,)), ("b", "F32", (3,))], stream)


# --------------------------------------------------------------------------------------------------------------
# kill -9

KILLER = r'''
import os, signal, sys
from pathlib import Path
import chiplock
from chiplock.container.shards import lock_dir
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
profile = chiplock.DeviceProfile(enrollments=(Enrollment(source="precision", helper={}, material=b"k" * 32),))
kdf = KdfParams(**INSECURE_FAST)
def one(s, o, i, n):
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return chiplock.lock(s, o, profile, transform="aes", secret=b"x" * 32, kdf=kdf)
lock_dir(sys.argv[1], sys.argv[2], one)
'''


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="needs kill -9 (POSIX)")
def test_kill9_leaves_only_locked_shards(src: Path, tmp_path: Path) -> None:
    """A kill -9 mid-folder leaves a hidden build folder holding only containers; the next lock_dir removes it."""
    proc = subprocess.run([sys.executable, "-c", KILLER, str(src), str(tmp_path / "out")], capture_output=True,
                          check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "out").exists()
    left = _hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(".chiplock-tmp-out.")
    names = sorted(os.listdir(tmp_path / left[0]))
    assert names == ["model-00001-of-00003.chiplock", "model-00002-of-00003.chiplock"]
    assert all(chiplock.inspect(tmp_path / left[0] / n)["format"] == "chiplock" for n in names)
    lock_dir(src, tmp_path / "out", copy_lock)
    assert _hidden(tmp_path) == []


def test_plan_refuses_a_truncated_shard_before_locking(src: Path) -> None:
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ContainerError, match="model-00002-of-00003.safetensors.*truncated"):
        plan_source(src)


def test_a_side_file_holding_weights_is_refused_whatever_its_name(tmp_path):
    # Checkpoints named like side files (model_best.pth.tar, weights.bak) would ship in plaintext next to the
    # locked shards: the content decides, not the name.
    import gzip
    import io
    import pickle

    from chiplock.container.shards import plan_source, weights_like

    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    cases = {"model_best.pth.tar": buf.getvalue(), "w.pkl.bak": pickle.dumps({"w": [1.0]}),
             "ckpt.gz": gzip.compress(b"x" * 100), "notes.txt": b"just text", "config.json": b'{"a": 1}'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert (weights_like(tmp_path / name) is None) == name.endswith((".txt", ".json")), name
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / "model.safetensors.bak").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedConfig, match="model.safetensors.bak"):
        plan_source(src)
