"""DDP lock training on 2 CPU ranks (gloo, launched with torchrun): ranks agree and match single-process runs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from chiplock.softlock.model_io import load_model, save_model
from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.pipeline import TrainSpec, run_lock

ARCH = {"name": "resnet18", "num_classes": 10, "image_size": 8, "width": 2}


@pytest.mark.slow
def test_two_cpu_ranks_match_single_process(tmp_path):
    from chiplock_demo.models import resnet18

    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_model(resnet18(width=2), base, {"arch": ARCH, "data": "digits8"})
    # lam = 0 makes the loss a plain mean over the batch, so averaging two half-batch gradients (DDP) equals
    # the full-batch gradient of a single process; a lock term is included in the second run.
    lock = SoftLockConfig(authorized="fp32", unauthorized=("e4m3fn",), epochs=1, lam=0.0, batch_size=32,
                          levers="none")
    spec = TrainSpec(out=str(tmp_path / "ddp.safetensors"), lock=lock, data="digits8", width=2, base=str(base),
                     max_train=192)
    assert TrainSpec.from_json(spec.to_json()) == spec  # what the ranks read is the spec itself
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "chiplock.softlock.ddp", "--spec", str(spec_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_model, info = load_model(spec.out)
    assert info["lock"]["lam"] == 0.0 and len(info["history"]) == 1
    single = dataclasses.replace(spec, out=str(tmp_path / "single.safetensors"))
    run_lock(single)
    one, _ = load_model(single.out)
    for (k, a), b in zip(ddp_model.state_dict().items(), one.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), k
