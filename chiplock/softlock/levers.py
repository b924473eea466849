"""Function-preserving reparametrisations that plant a lock lever before lock training ("priming").

Weights that are exactly representable in both formats cannot tell the formats apart, and two formats that both
round fp32 finely differ by tiny perturbations, so gradient descent on ``L_lock`` alone mostly drags both
configurations down together. The levers below change *where* the network's numbers sit without changing what
it computes in the authorized configuration, so that the unauthorized configuration's rounding, saturation,
dynamic range or pruning destroys it:

* :func:`scale_layers` multiplies every conv feeding a BatchNorm by ``alpha = 2**k`` and rescales the BatchNorm
  statistics to match. Scale-invariant configurations (Int8 with per-channel weights and per-example activation
  scales; fp32) compute exactly the same function; a fixed-range format such as E4M3 (max 448) saturates.
* :func:`outlier_channels` multiplies the BatchNorm output of a few channels by ``K = 2**k`` and divides the
  weights that read them by ``K`` (ReLU is positively homogeneous). Wide-range float formats are unaffected; a
  per-tensor Int8 activation scale is set by the outlier and crushes every other channel to zero; magnitude
  pruning removes the now-smallest weights first, i.e. exactly the rescaled ones.

Powers of two keep the reparametrisation exact in binary floating point. :func:`plan_levers` picks the lever
for an (authorized, unauthorized) pair by asking each unauthorized format (its ``lock_levers`` method, see
:mod:`chiplock.softlock.registry`), so a new format brings its own rule. The returned masks mark weights that
lock training must not move (Adam moves every weight by about ``lr`` per step whatever its scale, which would undo
a 1/K rescaling).

Security note: a lever is as easy to undo as to plant for someone who knows it is there; a soft lock raises the
cost of misuse, it does not prevent it (see docs/softlock.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chiplock.softlock.fp32 import FP32
from chiplock.softlock.decoys import plant_decoys
from chiplock.softlock.registry import Compose, parse_config


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BatchNorm directly normalises the conv's output, found by attribute naming
    (``convN``/``bnN`` and ``shortcut = Sequential(conv, bn)``) as in :mod:`chiplock_demo.models.resnet`."""
    pairs = []
    for mod in model.modules():
        for i in range(1, 4):
            c, b = getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None)
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                pairs.append((c, b))
        sc = getattr(mod, "shortcut", None)
        if isinstance(sc, nn.Sequential) and len(sc) == 2 and isinstance(sc[0], nn.Conv2d) \
                and isinstance(sc[1], nn.BatchNorm2d):
            pairs.append((sc[0], sc[1]))
    return pairs


def _bn_relu_conv_triples(model: nn.Module) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
    """(bn, next conv) where the conv reads ``relu(bn(.))`` directly: inside residual blocks, conv{i+1} reads
    relu(bn{i}(conv{i}(x)))."""
    out = []
    for mod in model.modules():
        for i in range(1, 3):
            b, c = getattr(mod, f"bn{i}", None), getattr(mod, f"conv{i + 1}", None)
            if isinstance(b, nn.BatchNorm2d) and isinstance(c, nn.Conv2d) and hasattr(mod, "shortcut"):
                out.append((b, c))
    return out


@torch.no_grad()
def scale_layers(model: nn.Module, log2_alpha: int) -> dict:
    """Multiply every conv that feeds a BatchNorm by ``2**log2_alpha`` and rescale the BN statistics to match.

    Returns:
        An empty mask dict (nothing needs freezing: Adam's absolute steps become relatively smaller).

    Raises:
        ValueError: The model has no conv->BatchNorm pair.
    """
    pairs = _conv_bn_pairs(model)
    if not pairs:
        raise ValueError("scale_layers: no conv -> BatchNorm pair found (use a chiplock ResNet)")
    a = 2.0 ** log2_alpha
    for conv, bn in pairs:
        conv.weight.mul_(a)
        if conv.bias is not None:
            conv.bias.mul_(a)
        # gamma' / sqrt(a^2 var + eps) * a == gamma / sqrt(var + eps): eps is not saved with the model, so the
        # compensation goes into gamma (a parameter) instead.
        old = torch.sqrt(bn.running_var + bn.eps)
        bn.running_mean.mul_(a)
        bn.running_var.mul_(a * a)
        bn.weight.mul_(torch.sqrt(bn.running_var + bn.eps) / (a * old))
    return {}


@torch.no_grad()
def outlier_channels(model: nn.Module, log2_k: int, fraction: float) -> dict:
    """Scale the first ``ceil(fraction * C)`` channels of each block-internal BN output by ``2**log2_k`` and the
    weights of the following conv that read them by ``2**-log2_k``.

    Returns:
        ``{conv.weight: bool mask}`` of the rescaled (tiny) weights, to be frozen during lock training.

    Raises:
        ValueError: No block-internal ``bn -> relu -> conv`` is found.
    """
    triples = _bn_relu_conv_triples(model)
    if not triples:
        raise ValueError("outlier_channels: no bn -> relu -> conv inside a residual block (use a chiplock ResNet)")
    k = 2.0 ** log2_k
    masks = {}
    for bn, conv in triples:
        n = max(1, math.ceil(fraction * bn.num_features))
        idx = torch.arange(n)
        bn.weight[idx] *= k
        bn.bias[idx] *= k
        conv.weight[:, idx] /= k
        mask = torch.zeros_like(conv.weight, dtype=torch.bool)
        mask[:, idx] = True
        masks[conv.weight] = mask
    return masks


@torch.no_grad()
def stream_outliers(model: nn.Module, log2_k: int, fraction: float) -> dict:
    """Like :func:`outlier_channels`, for the residual stream of a chiplock ResNet: the first
    ``ceil(fraction * C)`` stream channels are scaled by ``2**log2_k`` everywhere they are produced (stem BN, each
    block's last BN and projection-shortcut BN) and every weight that reads them (each block's first conv, the
    projection shortcuts, the classifier) is divided by the same factor.

    Raises:
        ValueError: ``model`` is not a chiplock ResNet.
    """
    _check_resnet(model, "stream_outliers")
    k = 2.0 ** log2_k
    masks: dict = {}

    def pick(c: int) -> torch.Tensor:
        return torch.arange(max(1, math.ceil(fraction * c)))

    def produce(bn: nn.BatchNorm2d) -> None:
        idx = pick(bn.num_features)
        bn.weight[idx] *= k
        bn.bias[idx] *= k

    def read(w: torch.Tensor, c: int) -> None:
        idx = pick(c)
        w[:, idx] /= k
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[:, idx] = True
        masks[w] = masks[w] | mask if w in masks else mask

    produce(model.bn1)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            cin = block.conv1.in_channels
            read(block.conv1.weight, cin)
            if len(block.shortcut):
                read(block.shortcut[0].weight, cin)
                produce(block.shortcut[1])
            produce(block.bn3 if hasattr(block, "bn3") else block.bn2)
    read(model.fc.weight, model.fc.in_features)
    return masks


@torch.no_grad()
def offset_logits(model: nn.Module, n_channels: int = 2, log2_c: int = 20, d: float = 64.0, seed: int = 0,
                  first: int = 0) -> dict:
    """Route a large per-class logit offset through ``n_channels`` final feature channels and cancel it in the
    classifier bias. The channels get ``+2**log2_c`` from the last block's BN shift; the classifier reads them
    with weights ``D / 2**log2_c`` (``|D| <= d``), the smallest weights of the layer, and its bias subtracts
    ``sum(D)``. Dense models compute the same logits (up to the channels' own small contribution, which lock
    training re-learns); any pruning that removes those smallest weights leaves ``-sum(D)`` in the logits, so
    one class wins everywhere. The first ``n_channels`` channels form one group of consecutive inputs, so 2:4
    sparsity prunes them too (keep ``first`` a multiple of 4).

    Returns:
        ``{fc.weight: mask}`` of the planted weights (frozen during lock training).

    Raises:
        ValueError: ``model`` is not a chiplock ResNet.
    """
    _check_resnet(model, "offset_logits")
    block = model.layer4[-1]
    bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    c = 2.0 ** log2_c
    idx = torch.arange(first, first + n_channels)
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(model.fc.out_features, generator=g) * 2 - 1
    D = (d * r)[:, None].expand(-1, n_channels)
    bn.bias[idx] += c
    model.fc.weight[:, idx] = D / c
    model.fc.bias -= D.sum(1)
    mask = torch.zeros_like(model.fc.weight, dtype=torch.bool)
    mask[:, idx] = True
    return {model.fc.weight: mask}


def _check_resnet(model: nn.Module, lever: str) -> None:
    """Levers that follow the residual stream need the layout of :mod:`chiplock_demo.models.resnet`."""
    if not all(hasattr(model, a) for a in ("bn1", "layer1", "layer2", "layer3", "layer4", "fc")):
        raise ValueError(f"{lever} needs a ResNet laid out as chiplock_demo.models.resnet.ResNet "
                         "(bn1, layer1..layer4 of blocks with bn2/bn3 and shortcut, fc)")


def _parts(cfg: Any) -> list:
    return list(cfg.parts) if isinstance(cfg, Compose) else [cfg]


def plan_levers(authorized: Any, unauthorized) -> list[tuple[str, dict]]:
    """Pick levers for an (authorized, unauthorized...) pair: ``[(name, kwargs), ...]`` for :func:`apply_levers`.

    Each unauthorized format's ``lock_levers(authorized_format, dense)`` says which levers break it. The built-in
    rules: against pruning (magnitude level p, or N:M) from a dense authorized model, a logit offset carried by
    the classifier's smallest weights; against Int8 from a wide-range float format, one outlier channel
    per block; against a fixed-range MiniFloat from a scale-invariant format (fp32, Int8), scale the layers
    far above the unauthorized format's largest value. Anything else gets no lever.

    Example:
        >>> plan_levers("int8", ["e4m3fn"])
        [('scale_layers', {'log2_alpha': 12})]
    """
    a_parts = _parts(parse_config(authorized))
    plans: list[tuple[str, dict]] = []
    a_dense = not any(getattr(p, "family", None) == "sparsity" for p in a_parts)
    a_fmt = [p for p in a_parts if getattr(p, "family", None) in ("float", "integer")]
    a_fmt = a_fmt[-1] if a_fmt else FP32()
    for u in unauthorized:
        for p in _parts(parse_config(u)):
            levers = getattr(p, "lock_levers", None)
            if levers is not None:
                plans.extend(levers(a_fmt, a_dense))
    # One lever of each kind is enough; keep the strongest outlier fraction.
    best: dict[str, dict] = {}
    for name, kw in plans:
        if name not in best or kw.get("fraction", 0) > best[name].get("fraction", 0):
            best[name] = kw
    return list(best.items())


def _significand_bits(fmt: Any) -> int | None:
    """Significant bits (mantissa + 1) of a float format, ``None`` for anything else."""
    fmt = getattr(fmt, "format", fmt)  # a Scaled deployment: its element format
    man = getattr(fmt, "man_bits", None)
    if man is not None:
        return man + 1
    return 24 if isinstance(fmt, FP32) else None


#: Share of each layer's weights planted as float decoys: more than a dense-and-sparse deployment's generous 5 %
#: FP16 outlier budget can keep (with one group per block, a 5 % budget recovered 0.30; with 7 %, 0.13).
MIN_SHARE = 0.07


def plan_decoys(authorized: Any, unauthorized, *, grid_bits: int = 6) -> tuple[str, dict] | None:
    """The decoy plan (:mod:`chiplock.softlock.decoys`) for a pair, or ``None`` when decoys cannot separate it.

    ``float`` decoys need an authorized float format that holds ``grid_bits + 2`` significant bits exactly (FP32,
    FP16, BF16, E6M9...) and unauthorized formats that are integer, or float with at most ``grid_bits - 1``
    significant bits (E4M3, E5M2, the MX elements, scaled or not); against pruning, ``nm`` (N:M) or ``tiny``
    (magnitude pruning) decoys. An Int8-authorized model gets none: ``int8`` decoys (:func:`plant_decoys`) do
    not separate Int8 from an amax-scaled E4M3 (measured in docs/softlock.md).
    """
    a = _parts(parse_config(authorized))
    if any(getattr(p, "family", None) == "sparsity" for p in a):
        return None
    a_fmt = [p for p in a if getattr(p, "family", None) in ("float", "integer")]
    a_fmt = a_fmt[-1] if a_fmt else FP32()
    u_fmts, sparse = [], []
    for u in unauthorized:
        for p in _parts(parse_config(u)):
            (sparse if getattr(p, "family", None) == "sparsity" else u_fmts).append(p)
    pa = _significand_bits(a_fmt)
    if sparse:
        # Against pruning from a dense float model: decoy groups that pruning unbalances.
        if u_fmts or len(sparse) > 1 or pa is None or pa < grid_bits + 4:
            return None
        sp = sparse[0]
        if hasattr(sp, "m") and hasattr(sp, "n"):
            return ("decoys", {"mode": "nm", "copies": sp.m, "grid_bits": grid_bits})
        if getattr(a_fmt, "max_finite", float("inf")) < 2.0 ** 32:
            return None  # the shrunken copy runs 2**12 times larger than its carrier: FP16 would overflow
        return ("decoys", {"mode": "tiny", "grid_bits": grid_bits})
    if not u_fmts:
        return None
    if getattr(a_fmt, "family", None) == "integer":
        # Int8 resolves only ~3 bits more than E4M3, and only near a channel's maximum: integer decoys large
        # enough to swamp E4M3 leave the real weights too few codes (measured in docs/softlock.md). No plan.
        return None
    if pa is None or pa < grid_bits + 2:
        return None
    for u in u_fmts:
        pu = _significand_bits(u)
        if getattr(u, "family", None) != "integer" and (pu is None or pu > grid_bits - 1):
            return None
    return ("decoys", {"mode": "float", "grid_bits": grid_bits, "min_share": MIN_SHARE})


MECHANISMS = ("auto", "decoys", "levers", "none")


def plan_lock(authorized: Any, unauthorized, mechanism: str = "auto") -> list[tuple[str, dict]]:
    """What lock training plants first, by ``SoftLockConfig.levers``: ``decoys`` (decoy cancellation),
    ``levers`` (the scale/outlier/offset levers of :func:`plan_levers`), ``auto`` (decoys where they apply, the
    levers otherwise) or ``none``.

    Raises:
        UnsupportedConfig: ``decoys`` asked for a pair they cannot separate.
    """
    from chiplock.errors import UnsupportedConfig

    if mechanism == "none":
        return []
    if mechanism == "levers":
        return plan_levers(authorized, unauthorized)
    decoys = plan_decoys(authorized, unauthorized)
    if mechanism == "decoys":
        if decoys is None:
            raise UnsupportedConfig("decoys need a dense float authorized format with at least 8 significant "
                                    "bits against Int8, a float format with at most 5, or pruning; use "
                                    "--levers auto or levers for this pair")
        return [decoys]
    return [decoys] if decoys is not None else plan_levers(authorized, unauthorized)


def apply_levers(model: nn.Module, plans: list[tuple[str, dict]]) -> dict:
    """Apply :func:`plan_levers` output to ``model`` in place; returns the union of the freeze masks."""
    from chiplock.errors import UnsupportedConfig

    masks: dict = {}
    for name, kw in plans:
        if name != "decoys" and (not _conv_bn_pairs(model) or not hasattr(model, "fc")):
            raise UnsupportedConfig(f"lock lever {name!r} needs a chiplock ResNet; train with levers='none' "
                                    "(--levers none) for other architectures")
        fn = {"scale_layers": scale_layers, "outlier_channels": outlier_channels,
              "stream_outliers": stream_outliers, "offset_logits": offset_logits, "decoys": plant_decoys}[name]
        for p, m in fn(model, **kw).items():
            masks[p] = masks[p] | m if p in masks else m
    return masks
