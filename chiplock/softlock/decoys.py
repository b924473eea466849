"""Decoy cancellation: a lock mechanism that no rescaling can undo.

The levers of :mod:`chiplock.softlock.levers` move *where* a network's numbers sit (scale, outlier channels,
offsets); every one of them is a function-preserving reparametrisation, and the standard deployment tools (amax
scaling, cross-layer equalisation, bias absorption) undo exactly those. A decoy changes *how precisely* the
network must compute instead:

* in a residual block ``conv1 -> bn1 -> relu -> conv2`` (likewise a gated MLP, or an attention value/output pair
  inside one head), ``copies`` low-importance channels of ``conv1`` are made exact copies of one "carrier" channel
  (same filter, same BatchNorm), so their activations are bit-identical;
* ``conv2`` reads the copies with large weights that sum to zero at every (output channel, kernel position):
  ``A, B, -(A + B)`` with ``|A|, |B| ~ 2**log2_m`` times the layer's typical weight.

In the authorized format the three weights are exactly representable (``A`` and ``B`` carry ``grid_bits``
fraction bits) and the products cancel exactly, so the network computes what it did before (less the sacrificed
channels, which lock fine-tuning re-learns). In a format with fewer significant bits each weight is rounded on its
own and the rounding errors, ``~2**-m`` times a weight ``2**log2_m`` times larger than the real ones, swamp the
real signal at every layer. Scales do not help: a per-channel or per-block scale cannot make ``A``, ``B`` and
``A + B`` representable together, the product ``weight x activation`` is invariant under cross-layer
equalisation, and the copies are not constant (so constant folding and bias correction see only the mean).

In ``int8`` mode (an Int8-authorized model locked against a float format) the decoys are integers on each output
channel's Int8 grid, ``headroom`` powers of two above the channel's real weights, so Int8 reproduces them exactly
while a 3-mantissa-bit float does not.

What it does not resist (measured in docs/softlock.md): an attacker who looks for identical channels over a few
calibration images and merges them (``dedupe`` in :mod:`chiplock.softlock.deploy`) removes the decoys, at the
price of knowing the mechanism; Hessian-based weight quantisation (GPTQ) compensates part of the error through
the copies' perfect correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Site:
    """Where decoys can live: channels made by ``producers`` (rows along dim 0) and read by ``consumer``
    (columns along dim 1) through an elementwise nonlinearity.

    ``scaled`` are the producer rows that the ``tiny`` mode multiplies by a power of two (the factor the
    nonlinearity passes through exactly); ``frozen`` the parameters lock fine-tuning must not move for copies.
    """

    producers: list
    scaled: list
    frozen: list
    consumer: nn.Module
    importance: torch.Tensor
    limit: int = 0  # channels usable for decoys are the first `limit` (0: all)

    @property
    def width(self) -> int:
        return self.limit or self.consumer.weight.shape[1]


def _sites(model: nn.Module) -> list[_Site]:
    """Residual blocks (``conv_i -> bn_i -> relu -> conv_{i+1}``) and gated MLPs (``down(act(gate x) * up x)``,
    as Llama's)."""
    out = []
    for mod in model.modules():
        if hasattr(mod, "shortcut"):
            for i in (1, 2):
                c1, b, c2 = (getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None),
                             getattr(mod, f"conv{i + 1}", None))
                if isinstance(c1, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and isinstance(c2, nn.Conv2d):
                    gain = b.weight.abs() / torch.sqrt(b.running_var + b.eps)
                    imp = gain * c2.weight.pow(2).sum(dim=(0, 2, 3)).sqrt()
                    conv = [c1.weight] + ([c1.bias] if c1.bias is not None else [])
                    out.append(_Site(conv + [b.weight, b.bias, b.running_mean, b.running_var],
                                     [b.weight, b.bias], conv + [b.weight, b.bias], c2, imp))
        gate, up, down = (getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if all(isinstance(m, nn.Linear) for m in (gate, up, down)):
            g = [gate.weight] + ([gate.bias] if gate.bias is not None else [])
            u = [up.weight] + ([up.bias] if up.bias is not None else [])
            imp = up.weight.norm(dim=1) * gate.weight.norm(dim=1) * down.weight.norm(dim=0)
            out.append(_Site(g + u, u, g + u, down, imp))
        v, o = getattr(mod, "v_proj", None), getattr(mod, "o_proj", None)
        hd = getattr(mod, "head_dim", None)
        if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and hd and v.out_features == o.in_features:
            # Attention output is linear in V within a head (same attention weights for every channel of the
            # head), so copies of a V channel inside one head give identical inputs to o_proj. Decoys stay
            # inside the first head (copies must share a head; without grouped KV heads o_proj reads V 1:1).
            vv = [v.weight] + ([v.bias] if v.bias is not None else [])
            imp = v.weight.norm(dim=1) * o.weight.norm(dim=0)
            head = torch.full_like(imp, float("inf"))
            head[:hd] = imp[:hd]
            out.append(_Site(vv, vv, vv, o, head, limit=hd))
    return out


@torch.no_grad()
def plant_decoys(model: nn.Module, *, copies: int = 3, groups: int = 1, log2_m: int | None = None, grid_bits: int = 6,
                 mode: str = "float", headroom: int = 2, log2_k: int = 12, min_share: float = 0.0,
                 seed: int = 0) -> dict:
    """Plant decoy cancellations in every residual block (and gated MLP) of ``model``, in place.

    Args:
        model: A chiplock ResNet (blocks with ``conv1/bn1/conv2`` and ``shortcut``) or a transformer with gated
            MLPs (``gate_proj``/``up_proj``/``down_proj``, as Llama).
        copies: Channels per decoy group (at least 3: two copies cancel exactly in every symmetric format).
        groups: Decoy groups per block.
        log2_m: Decoy magnitude, in powers of two above the layer's RMS weight. Default 16 in ``float`` mode:
            at 2**12 GPTQ's error feedback and cross-layer equalisation recovered part of the accuracy (measured
            in docs/softlock.md); also 16 for ``nm`` (SparseGPT's 1 % damping leaves ~1 % of a pruned decoy
            uncompensated: at 2**8 it recovered 0.974, at 2**16 0.126); 8 for ``tiny``, whose shrunken copy must
            stay the layer's smallest weight. The products reach ``2**16`` times a normal product: the authorized side must accumulate
            in fp32 (as tensor cores do), not in fp16.
        grid_bits: Fraction bits of the decoys' significands (6 keeps them and their sum exact in FP16 and BF16;
            E4M3 keeps 3).
        mode: ``float`` (authorized format has many significant bits: FP32, FP16, BF16), ``int8`` (decoys are
            integers on each output channel's Int8 grid; measured too weak to plan), ``nm`` (against N:M
            sparsity: ``copies`` consecutive input channels, one hardware group, all carry same-sign decoys and
            one carries minus their sum, so keeping the N largest of the group leaves a large residual) or
            ``tiny`` (against magnitude pruning: one copy runs ``2**log2_k`` times larger and is read with a
            weight ``2**log2_k`` times smaller, the smallest of the layer, which pruning removes while its
            cancelling partner stays).
        headroom: ``int8`` mode: the decoys' largest value is ``2**headroom`` times the channel's real weights.
        log2_k: ``tiny`` mode: activation scale of the shrunken copy.
        min_share: Plant at least this share of each layer's weights as decoys (more groups in wide layers),
            so a dense-and-sparse deployment that keeps that share of outliers in FP16 cannot keep them all.
        seed: Seed for the decoy values and signs.

    Returns:
        ``{parameter: bool mask}`` of everything lock fine-tuning must not move (the decoy weights, the copied
        rows of carrier and copies).

    Raises:
        ValueError: Fewer than 3 copies, an unknown mode, or a model without sites or with too few channels.
    """
    if mode not in ("float", "int8", "nm", "tiny"):
        raise ValueError(f"plant_decoys(mode={mode!r}): use float, int8, nm or tiny")
    if mode == "tiny":
        copies = 2
    elif copies < 3:
        raise ValueError(f"plant_decoys(copies={copies}): use at least 3 (two copies cancel in any format)")
    if log2_m is None:
        log2_m = 8 if mode == "tiny" else 16
    sites = _sites(model)
    if not sites:
        raise ValueError("plant_decoys needs a chiplock ResNet (residual blocks with conv1/bn1/conv2) or a "
                         "transformer with gated MLPs (gate_proj/up_proj/down_proj)")
    def n_groups(site: _Site) -> int:
        return max(groups, math.ceil(min_share * site.consumer.weight.shape[1] / copies))

    narrow = min(site.width - n_groups(site) * (copies + 1) for site in sites)
    if narrow < 2:  # Checked before anything changes: a refusal leaves the model intact.
        raise ValueError(f"plant_decoys: a block has no room for its group(s) of {copies} copies (fewer than 2 "
                         "channels would be left); lower copies/groups/min_share or widen the model")
    gen = torch.Generator().manual_seed(seed)
    masks: dict = {}

    def freeze(p: torch.Tensor, idx, dim: int = 0) -> None:
        m = masks.get(p)
        if m is None:
            m = masks[p] = torch.zeros_like(p, dtype=torch.bool)
        m.index_fill_(dim, idx, True)

    for site in sites:
        site_groups = n_groups(site)
        imp = site.importance[:site.width]
        order = torch.argsort(imp, descending=True)
        if mode == "nm":
            # Whole hardware groups: the `copies` consecutive input channels with the least importance.
            n_blocks = site.width // copies
            cost = imp[:n_blocks * copies].view(n_blocks, copies).sum(1)
            chosen = torch.argsort(cost)[:site_groups]
            spare = torch.cat([torch.arange(g * copies, (g + 1) * copies) for g in chosen.tolist()])
            carriers = torch.tensor([i for i in order.tolist() if i not in set(spare.tolist())][:site_groups])
        else:
            carriers, spare = order[:site_groups], order.flip(0)[:site_groups * copies]
        w = site.consumer.weight
        rows = w.shape[0]
        # Scales come from the real weights, before any group is planted (a second group must not see the first).
        m = 2.0 ** (math.floor(math.log2(w.pow(2).mean().sqrt().item())) + log2_m)
        step = w.abs().amax(dim=tuple(range(1, w.dim()))) * (2.0 ** headroom) / 127.0
        for g in range(site_groups):
            c = int(carriers[g])
            dst = spare[g * copies:(g + 1) * copies]
            for t in site.producers:
                t[dst] = t[c].clone()
            shape = (rows, copies - 1) + tuple(w.shape[2:])
            sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
            if mode in ("float", "nm", "tiny"):
                frac = torch.randint(0, 1 << grid_bits, shape, generator=gen).float() / (1 << grid_bits)
                if mode == "nm":
                    sign = sign[:, :1].expand_as(sign)  # Same sign in the group: the minus-sum is the largest.
                free = sign * m * (1.0 + frac)
            else:
                # Integer codes on each output channel's grid; the channel's real weights keep 7 - headroom bits.
                lo = max(1, 64 // (copies - 1) // 2)
                hi = 127 // (copies - 1)
                codes = torch.randint(lo, hi + 1, shape, generator=gen).float()
                free = sign * codes * step.view(-1, *([1] * (len(shape) - 1)))
            last = -free.sum(dim=1, keepdim=True)
            w[:, dst] = torch.cat([free, last], dim=1)
            if mode == "int8":
                # Pin each row's Int8 scale: one decoy pair at exactly +-127 steps sets the row maximum.
                first = (slice(None), dst[0]) + (0,) * (w.dim() - 2)
                w[(slice(None), dst) + (0,) * (w.dim() - 2)] = 0.0
                w[first] = 127 * step
                w[(slice(None), dst[-1]) + (0,) * (w.dim() - 2)] = -127 * step
            if mode == "tiny":
                # Copy 0 runs k times larger (the nonlinearity passes positive factors) and is read k times
                # more weakly.
                k = 2.0 ** log2_k
                for t in site.scaled:
                    t[dst[0]] *= k
                w[:, dst[0]] /= k
            keep = torch.cat([dst, torch.tensor([c])])
            freeze(w, dst, dim=1)
            for p in site.frozen:
                freeze(p, keep)
    return masks


@torch.no_grad()
def decoy_masks(model: nn.Module) -> dict:
    """The freeze masks of decoys already planted in ``model`` (for resuming lock training from a checkpoint).

    A decoy group is a set of channels with bit-identical producer rows (a ``tiny`` copy's scaled rows equal up
    to a power of two) in which the consumer's weights on all but one channel (the carrier), each times its
    channel's scale, sum to zero.
    """
    masks: dict = {}

    def freeze(p: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> None:
        m = masks.get(p)
        if m is None:
            m = masks[p] = torch.zeros_like(p, dtype=torch.bool)
        m.index_fill_(dim, idx, True)

    for site in _sites(model):
        ids = {id(t) for t in site.scaled}
        plain = [t.reshape(t.shape[0], -1) for t in site.producers if id(t) not in ids]
        sc = torch.cat([t.reshape(t.shape[0], -1) for t in site.scaled], dim=1)
        size = sc.abs().amax(dim=1)
        # Scaling by a power of two is exact, so the normalised rows of a scaled copy are bit-identical.
        key = torch.cat(plain + [sc / size.clamp(min=torch.finfo(sc.dtype).tiny)[:, None]], dim=1)
        seen: dict[bytes, list[int]] = {}
        for i in range(key.shape[0]):
            seen.setdefault(key[i].numpy().tobytes(), []).append(i)
        w = site.consumer.weight
        view = (1, -1) + (1,) * (w.dim() - 2)
        for group in seen.values():
            if len(group) < 3:
                continue
            for k in group:
                rest = [j for j in group if j != k]
                gain = (size[rest] / size[k]).view(view)
                contrib = w[:, rest] * gain
                if contrib.sum(dim=1).abs().amax() <= 1e-5 * contrib.abs().amax():
                    freeze(w, torch.tensor(rest), dim=1)
                    for p in site.frozen:
                        freeze(p, torch.tensor(group))
                    break
    return masks


__all__ = ["decoy_masks", "plant_decoys"]
