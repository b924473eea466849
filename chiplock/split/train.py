"""``torchrun`` entry point of split pipeline training: one stage per rank (gloo, CPU).

    torchrun --standalone --nproc-per-node 4 -m chiplock.split.train --spec run.json

``run.json`` is a :class:`chiplock.split.pipeline.SplitTrainSpec`; see docs/split.md for several nodes.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from chiplock.errors import ChiplockError
    from chiplock.split.pipeline import SplitTrainSpec, run_rank

    p = argparse.ArgumentParser(description="split pipeline training (launch with torchrun)")
    p.add_argument("--spec", required=True, help="SplitTrainSpec JSON file")
    args = p.parse_args(argv)
    with open(args.spec) as fh:
        spec = SplitTrainSpec.from_json(fh.read())
    # CPU only for now: the stages and batches live on the CPU (docs/split.md).
    dist.init_process_group("gloo")
    try:
        run_rank(spec)
        dist.barrier()
    except ChiplockError as e:
        print(f"error (rank {dist.get_rank()}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
