"""``torchrun`` entry point for multi-process lock training (DDP; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 -m chiplock.softlock.ddp --spec run.json

``run.json`` is a :class:`chiplock.softlock.pipeline.TrainSpec` as JSON whose ``base`` model already exists.
Every rank loads the same base weights, takes its slice of every global batch, and DDP averages gradients;
rank 0 writes the locked model and the checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from chiplock.softlock.pipeline import TrainSpec, run_lock

    p = argparse.ArgumentParser(description="DDP lock training (launch with torchrun)")
    p.add_argument("--spec", required=True, help="TrainSpec JSON file")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    with open(args.spec) as fh:
        spec = TrainSpec.from_json(fh.read())
    torch.set_num_threads(args.threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        run_lock(spec, progress=os.environ.get("CHIPLOCK_PROGRESS", "0") == "1")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
