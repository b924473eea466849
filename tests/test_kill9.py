"""kill -9 during `lock` and `unlock -o`: no file is ever left behind but a complete output; the input is intact.

A helper process imports chiplock once (torch costs seconds to import) and, per trial, forks a child that runs
``chiplock.lock`` (fast KDF, vendor secret) or the real CLI ``unlock ... -o``; the helper SIGKILLs the child after
a random delay drawn over the measured length of a full run, and reports whether the child had its unnamed
output file open at that moment (``/proc/PID/fd``), i.e. whether the kill landed mid-write. This test process
then checks the output folder and the input. Half the trials start with a complete output already in place
(the replace path), half with none.

``CHIPLOCK_KILL_TRIALS`` sets the trials per operation (default 20).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import chiplock
from chiplock.keys import INSECURE_FAST, KdfParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs fork and /proc (Linux)")]

TRIALS = int(os.environ.get("CHIPLOCK_KILL_TRIALS", "20"))
SECRET = b"vendor secret for the kill -9 test"

HELPER = r'''
import json, os, signal, sys, time
import chiplock, chiplock.cli, safetensors.torch
from chiplock.keys import INSECURE_FAST, KdfParams

cfg = json.loads(sys.argv[1])
profile = chiplock.DeviceProfile.load(cfg["profile"])
secret = open(cfg["secret"], "rb").read()

def child(op, out):
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    if op == "lock":
        chiplock.lock(cfg["model"], out, profile, "aes", secret, kdf=KdfParams(**INSECURE_FAST))
        return 0
    return chiplock.cli.run(["unlock", cfg["container"], "--profile", cfg["profile"], "--secret-file",
                             cfg["secret"], "-o", out])

def writing(pid, folder):
    # An O_TMPFILE file shows in /proc/PID/fd as "FOLDER/#INODE (deleted)"; the fallback as a named part.
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(l.startswith(folder + "/") and l != cfg["model"] and l != cfg["container"] for l in links)

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            code = child(req["op"], req["out"])
        except BaseException:
            code = 3
        os._exit(code)
    folder = os.path.dirname(req["out"])
    mid, opened, status = None, None, None
    if req["mode"] in ("write", "measure"):
        # Wait until the child has its output file open (or has finished).
        while opened is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
                break
            if writing(pid, folder):
                opened = time.monotonic()
            else:
                time.sleep(0.0005)
    if req["mode"] != "measure" and status is None:
        time.sleep(req["delay"])
        mid = writing(pid, folder)
        os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    end = time.monotonic()
    print(json.dumps({"seconds": end - t0, "write_seconds": None if opened is None else end - opened,
                      "mid_write": mid,
                      "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
'''


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Helper:
    def __init__(self, cfg: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, op: str, out: Path, mode: str, delay: float = 0.0) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "out": str(out), "mode": mode, "delay": delay}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, profile):
    root = tmp_path_factory.mktemp("kill9")
    inputs = root / "in"
    inputs.mkdir()
    gen = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(1024, 1536, generator=gen) for i in range(5)}  # 31 MB float32
    save_file(weights, str(inputs / "model.safetensors"))
    profile.save(inputs / "device.json")
    (inputs / "secret").write_bytes(SECRET)
    chiplock.lock(inputs / "model.safetensors", inputs / "model.chiplock", profile, "aes", SECRET,
                  kdf=KdfParams(**INSECURE_FAST))
    cfg = {"model": str(inputs / "model.safetensors"), "container": str(inputs / "model.chiplock"),
           "profile": str(inputs / "device.json"), "secret": str(inputs / "secret")}
    helper = Helper(cfg)
    yield root, inputs, helper, weights
    helper.close()


def _check_complete(op: str, out: Path, weights: dict, profile, reference: str | None) -> None:
    if op == "unlock":
        # safetensors output is deterministic: a complete file is byte-identical to the reference run's.
        assert _sha(out) == reference, "the unlocked output is not complete"
        return
    got = chiplock.unlock(out, profile=profile, secret=SECRET)  # Verifies every tensor's digest.
    assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in weights)


@pytest.mark.parametrize("op", ["lock", "unlock"])
def test_sigkill_leaves_no_file_but_a_complete_output(setup, profile, op):
    root, inputs, helper, weights = setup
    src = inputs / ("model.safetensors" if op == "lock" else "model.chiplock")
    src_sha = _sha(src)
    outdir = root / f"out-{op}"
    outdir.mkdir()
    out = outdir / ("model.chiplock" if op == "lock" else "model.safetensors")

    # Complete runs measure how long the operation and its write phase take, and give the reference output.
    runs = [helper.run(op, out, "measure") for _ in range(3)]
    assert all(r["exit"] == 0 and r["write_seconds"] is not None for r in runs), runs
    full = {"seconds": min(r["seconds"] for r in runs), "write_seconds": min(r["write_seconds"] for r in runs)}
    assert sorted(os.listdir(outdir)) == [out.name]
    reference = _sha(out) if op == "unlock" else None
    _check_complete(op, out, weights, profile, reference)
    complete = root / f"complete-{op}"
    shutil.copyfile(out, complete)

    rng = random.Random(1234 if op == "lock" else 5678)
    stats = {"trials": 0, "killed": 0, "mid_write": 0, "leftovers": 0, "new_outputs_checked": 0}
    for trial in range(TRIALS):
        existing = trial % 2 == 0
        if not existing and out.exists():
            out.unlink()
        if existing and not out.exists():
            shutil.copyfile(complete, out)
        before = (out.stat().st_ino, _sha(out)) if existing else None
        # Trials 0, 1 (mod 4) kill anywhere in the run; 2, 3 while the output is being written (or just after).
        if trial % 4 < 2:
            res = helper.run(op, out, "uniform", rng.uniform(0.0, full["seconds"]))
        else:
            res = helper.run(op, out, "write", rng.uniform(0.0, 1.2 * full["write_seconds"]))
        stats["trials"] += 1
        stats["killed"] += res["killed"]
        stats["mid_write"] += bool(res["mid_write"])
        names = sorted(os.listdir(outdir))
        stats["leftovers"] += len([n for n in names if n != out.name])
        assert names in ([], [out.name]), f"trial {trial}: left {names} (killed={res['killed']})"
        if existing:
            assert names == [out.name], f"trial {trial}: the existing output was lost"
        if out.exists():
            if before is not None and out.stat().st_ino == before[0]:
                assert _sha(out) == before[1], f"trial {trial}: the existing output was modified in place"
            else:  # A new file got the name: it must be complete.
                stats["new_outputs_checked"] += 1
                _check_complete(op, out, weights, profile, reference)
        assert _sha(src) == src_sha, f"trial {trial}: the input changed"
    print(f"\nkill -9 {op}: {json.dumps(stats)} (full run {full['seconds']:.2f} s, "
          f"write {full['write_seconds']:.3f} s)")
    assert stats["killed"] >= TRIALS // 4, f"too few kills landed before the end ({stats})"
    assert stats["mid_write"] >= 1, f"no kill landed while the output was being written ({stats})"
