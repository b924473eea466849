"""Synthetic but realistic weights for the unlock benchmark.

A state dict of fp32 tensors whose shapes look like a transformer's: many large matrices (at ~1 GB: 2-16 M
elements each, scaled down for smaller sizes so every size still has several tensors of different sizes), a bias
vector per matrix and a LayerNorm weight/bias pair every few matrices. Values are Gaussian with a per-tensor
scale, as trained weights roughly are; the distribution matters for ``pre-aes``, whose distribution model and
escape codes depend on it.
"""

from __future__ import annotations

import torch

#: Matrix row counts to choose from (hidden sizes of common models).
_ROWS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)


def make_weights(target_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fp32 state dict of about ``target_bytes`` bytes (within one bias vector), deterministic in ``seed``.

    The largest matrix holds at most a quarter of the total (capped at 16 M elements), the smallest an eighth
    of the largest, so a 10 MB model still has several tensors and a 1 GB model has tens of 2-16 M-element
    matrices.
    """
    g = torch.Generator().manual_seed(seed)
    budget = target_bytes // 4
    hi = max(1024, min(16 << 20, budget // 4))
    lo = max(256, hi // 8)
    out: dict[str, torch.Tensor] = {}
    layer = 0
    while budget > 0:
        rows = _ROWS[int(torch.randint(len(_ROWS), (1,), generator=g))]
        numel = int(torch.randint(lo, hi + 1, (1,), generator=g))
        cols = max(1, numel // rows)
        if rows * cols + rows > budget:  # The last matrix takes what is left.
            rows = min(rows, max(1, budget // 2))
            cols = max(1, (budget - rows) // rows)
        scale = float(0.5 / (cols ** 0.5))
        out[f"layers.{layer}.weight"] = torch.randn(rows, cols, generator=g) * scale
        out[f"layers.{layer}.bias"] = torch.randn(rows, generator=g) * 0.01
        budget -= rows * cols + rows
        if layer % 4 == 3 and budget > 2 * rows:
            out[f"layers.{layer}.norm.weight"] = 1.0 + 0.05 * torch.randn(rows, generator=g)
            out[f"layers.{layer}.norm.bias"] = 0.02 * torch.randn(rows, generator=g)
            budget -= 2 * rows
        layer += 1
    return out


def describe(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Counts for the report: tensors, matrices, vectors, total bytes, largest and smallest matrix."""
    mats = [t.numel() for t in weights.values() if t.dim() == 2]
    return {
        "tensors": len(weights),
        "matrices": len(mats),
        "vectors": len(weights) - len(mats),
        "bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "largest_matrix_elements": max(mats, default=0),
        "smallest_matrix_elements": min(mats, default=0),
    }
