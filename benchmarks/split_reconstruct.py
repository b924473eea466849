"""Reconstruction attacks on a split model (issue 14, item 3): recovered accuracy and compute vs the fraction p of
a trained ResNet-18 (MNIST-5000) an attacker holds, by position and by size, with and without boundary transforms,
and for k of N colluding pipeline ranks (:mod:`chiplock.split.reconstruct`).

Writes ``reconstruct.json``, ``reconstruct.md`` and ``reconstruct.png`` to ``--out``; the trained victim goes to
``--cache`` (shared with the soft-lock attacks' file names, so a copy of
``original_resnet18_mnist5000_w16_e8_s0.safetensors`` there is reused). One torch thread (on a busy 2-core machine
the thread pool is several times slower). Not collected by pytest. Examples::

    .venv/bin/python benchmarks/split_reconstruct.py                      # the paper preset (hours on 2 cores)
    .venv/bin/python benchmarks/split_reconstruct.py --set fractions=0.1 --set steps=100   # a reduced run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper", help="smoke or paper (default)")
    ap.add_argument("--out", default="bench/results/split", help="folder for reconstruct.{json,md,png}")
    ap.add_argument("--cache", default="bench/cache/split", help="folder for the trained victim")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset setting (JSON or comma-separated list), e.g. --set steps=100")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from chiplock.attacks.result import _json_or_text
    from chiplock.split import reconstruct

    overrides = {"cache": args.cache}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: use KEY=VALUE, e.g. --set steps=100")
        overrides[key.strip()] = _json_or_text(value.strip())
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {stage}: {done}/{total}", file=sys.stderr, flush=True)

    result = reconstruct.run(preset=args.preset, progress=progress, **overrides)
    paths = result.save(args.out)
    print(result.to_markdown())
    print(json.dumps({k: str(v) for k, v in paths.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
