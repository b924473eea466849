"""Quantisation-side deployment steps: what an engineer does before running a model on a low-precision format.

Each step is a faithful, small version of a standard tool (the names follow the tools' literature):

* ``amax-tensor``, ``amax-channel``, ``mx-block``: deploy a float element format with data-derived scales
  (:class:`~chiplock.softlock.scaled.Scaled`) instead of a naive cast (TensorRT / Transformer Engine / OCP MX).
* ``int8-mse-clip``: per-channel weight clipping ranges that minimise the weight MSE (a standard calibration).
* ``fold-bn``, ``bn-reestimate``, ``rebalance-pow2``: BatchNorm folding, BatchNorm statistics re-estimated on the
  deployed configuration, and power-of-two rebalancing of conv/BN pairs (undoes scale levers exactly).
* ``cle``, ``cle-stream``, ``high-bias-absorb``, ``bias-correction``: data-free quantisation (Nagel et al. 2019,
  AIMET): cross-layer equalisation (inside residual blocks; ``cle-stream`` also across the residual stream and
  into the classifier), high-bias absorption and empirical bias correction.
* ``const-fold``: inputs constant over the calibration set folded into biases.
* ``gptq``: GPTQ/OBQ weight rounding with the calibration Hessian, onto the target's per-channel grid.
* ``dedupe`` (bespoke): merge input channels that are positive multiples of each other (decoy copies).

Steps that rewrite the model only use the layer layout of :mod:`chiplock_demo.models.resnet` (attribute pairs
``convN``/``bnN``, ``shortcut = Sequential(conv, bn)``, ``fc``); a step that finds nothing to do returns the model
unchanged. Steps that measure the quantised model (``bias-correction``, ``bn-reestimate``, ``gptq``) use the
configuration in force, so a step that changes the configuration comes first in a recipe.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import UnsupportedConfig
from chiplock.softlock.apply import strip_config, using_config
from chiplock.softlock.deploy.base import Calibration, register_recipe, register_step
from chiplock.softlock.int8 import Granularity, Int8
from chiplock.softlock.minifloat import MiniFloat
from chiplock.softlock.scaled import Scaled

MAX_CALIB = 256
_LAYERS = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------------------------------------- helpers

def _calib_x(calib: Calibration) -> torch.Tensor:
    x = calib.x if isinstance(calib, Calibration) else calib
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
        raise UnsupportedConfig("deployment step: the calibration set must be a non-empty tensor of inputs "
                                "(N, ...); pass e.g. Calibration(x_train[:256])")
    return x[:MAX_CALIB].float()


def _batches(calib: Calibration) -> Iterable[torch.Tensor]:
    x = _calib_x(calib)
    bs = getattr(calib, "batch_size", MAX_CALIB) or MAX_CALIB
    for i in range(0, len(x), bs):
        yield x[i:i + bs]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _LAYERS)]


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    return layer.bias.data


def _conv_bn_slots(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Module, str]]:
    """``(conv, parent, name)`` where ``parent.<name>`` is the BatchNorm normalising ``conv``'s output (the
    ``convN``/``bnN`` and ``shortcut = Sequential(conv, bn)`` layout of the chiplock ResNets)."""
    out = []
    for mod in model.modules():
        for i in range(1, 4):
            c, b = getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None)
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                out.append((c, mod, f"bn{i}"))
        sc = getattr(mod, "shortcut", None)
        if isinstance(sc, nn.Sequential) and len(sc) == 2 and isinstance(sc[0], nn.Conv2d) \
                and isinstance(sc[1], nn.BatchNorm2d):
            out.append((sc[0], sc, "1"))
    return out


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``bn(y) == a * y + c`` per channel in eval mode."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    g = bn.weight if bn.weight is not None else torch.ones_like(inv)
    b = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    return g * inv, b - bn.running_mean * g * inv


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, layers: list[nn.Module], calib: Calibration, fn: Callable, *,
             inputs: bool = True, stop_after: Optional[nn.Module] = None) -> None:
    """Run the calibration set; ``fn(index, layer, tensor)`` sees each listed layer's input (or output) per
    batch. With ``stop_after``, the forward pass stops once that layer has run (saves the rest of the network)."""
    hooks = []
    for i, layer in enumerate(layers):
        def hook(mod, args, out, i=i):
            fn(i, mod, args[0] if inputs else out)
            if mod is stop_after:
                raise _Stop
        hooks.append(layer.register_forward_hook(hook))
    try:
        for xb in _batches(calib):
            try:
                model(xb)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()


def _chan_view(t: torch.Tensor, mod: Optional[nn.Module] = None) -> torch.Tensor:
    """``(C, rest)``: the channels of an NCHW or (N, C) tensor as rows; a linear layer's output has its
    channels last (``(batch, tokens, features)`` in a transformer)."""
    if isinstance(mod, nn.Linear):
        return t.reshape(-1, t.shape[-1]).transpose(0, 1)
    return t.transpose(0, 1).reshape(t.shape[1], -1)


# ---------------------------------------------------------------------------------------------- config steps

def _is_minifloat(cfg: Any) -> bool:
    return isinstance(cfg, MiniFloat)


def _is_int(cfg: Any) -> bool:
    return isinstance(cfg, Int8)


def _is_fmt(cfg: Any) -> bool:
    return getattr(cfg, "family", None) in ("float", "integer")


def _amax(weights: str, **kw) -> Callable:
    def step(model, cfg, calib):
        return model, Scaled(element=cfg.name, weights=weights, **kw)
    return step


@torch.no_grad()
def int8_mse_clip(model: nn.Module, cfg: Int8, calib: Any = None, *, grid: int = 40) -> tuple[nn.Module, Int8]:
    """Clip each output channel of every conv/linear weight to the range (a fraction of its amax in
    ``[0.3, 1]``) that minimises the symmetric integer quantisation MSE; the Int8 config's amax then equals it."""
    qmax = (1 << (cfg.bits - 1)) - 1
    fracs = torch.linspace(0.3, 1.0, grid)
    for layer in _layers(model):
        w = layer.weight.data.reshape(layer.weight.shape[0], -1)
        amax = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny)
        best_err, best_c = None, amax
        for f in fracs:
            c = (amax * f)[:, None]
            s = c / qmax
            err = ((torch.clamp(torch.round(w / s), -qmax, qmax) * s - w) ** 2).sum(1)
            if best_err is None:
                best_err, best_c = err, c[:, 0].clone()
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_c = torch.where(better, c[:, 0], best_c)
        layer.weight.data = torch.maximum(torch.minimum(w, best_c[:, None]), -best_c[:, None]).reshape(
            layer.weight.shape)
    return model, cfg


# ---------------------------------------------------------------------------------------------- BN steps

@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the conv before it (the BN becomes ``nn.Identity``, the conv gets a bias)."""
    for conv, parent, name in _conv_bn_slots(model):
        a, c = _bn_affine(getattr(parent, name))
        b = conv.bias.data if conv.bias is not None else torch.zeros_like(a)
        conv.weight.data = conv.weight.data * a[:, None, None, None]
        conv.bias = nn.Parameter(a * b + c)
        setattr(parent, name, nn.Identity())
    return model


@torch.no_grad()
def bn_reestimate(model: nn.Module, cfg: Any, calib: Calibration) -> tuple[nn.Module, Any]:
    """Recompute every BatchNorm's running mean/variance (cumulative average) with the model running on ``cfg``
    over the calibration images."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model, cfg
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with using_config(model, cfg):
            for xb in _batches(calib):
                model(xb)
    finally:
        for bn, (mom, tr) in zip(bns, saved):
            bn.momentum = mom
            bn.train(tr)
    return strip_config(model).eval(), cfg


@torch.no_grad()
def rebalance_pow2(model: nn.Module) -> nn.Module:
    """Multiply each conv output channel feeding a BatchNorm by ``2**k`` so its max ``|w|`` is in ``[0.5, 1)``,
    and rescale the BatchNorm so the function is unchanged (powers of two: exact)."""
    for conv, parent, name in _conv_bn_slots(model):
        bn = getattr(parent, name)
        m = conv.weight.abs().amax(dim=(1, 2, 3))
        k = torch.where(m > 0, -(torch.floor(torch.log2(m.clamp(min=1e-38))) + 1), torch.zeros_like(m))
        a = torch.exp2(k)
        conv.weight.mul_(a[:, None, None, None])
        if conv.bias is not None:
            conv.bias.mul_(a)
        old = torch.sqrt(bn.running_var + bn.eps)
        bn.running_mean.mul_(a)
        bn.running_var.mul_(a * a)
        if bn.weight is None:
            raise UnsupportedConfig("rebalance-pow2 needs affine BatchNorms (affine=True)")
        bn.weight.mul_(torch.sqrt(bn.running_var + bn.eps) / (a * old))
    return model


# ---------------------------------------------------------------------------------------------- equalisation

def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "shortcut") and isinstance(getattr(m, "conv1", None),
                                                                                nn.Conv2d)]


def _last_conv(block: nn.Module) -> nn.Conv2d:
    return block.conv3 if isinstance(getattr(block, "conv3", None), nn.Conv2d) else block.conv2


def _block_groups(model: nn.Module) -> list[tuple[list, list]]:
    """``([producers], [consumers])`` for each conv -> ReLU -> conv inside a residual block."""
    groups = []
    for blk in _blocks(model):
        convs = [getattr(blk, f"conv{i}") for i in range(1, 4) if isinstance(getattr(blk, f"conv{i}", None),
                                                                              nn.Conv2d)]
        for a, b in zip(convs, convs[1:]):
            groups.append(([a], [b]))
    return groups


def _stream_groups(model: nn.Module) -> list[tuple[list, list]]:
    """``([producers], [consumers])`` for each segment of the residual stream of a chiplock ResNet: every conv
    that writes the stream channels (stem, last conv of each block, projection shortcuts) and every layer that
    reads them (first conv of each block, projection shortcuts, the classifier after average pooling). The ops in
    between (add, ReLU, average pooling) commute with a positive per-channel scale."""
    if not all(hasattr(model, a) for a in ("conv1", "layer1", "layer4", "fc")) or not isinstance(model.fc,
                                                                                               nn.Linear):
        return []
    groups: list[tuple[list, list]] = []
    prod, cons = [model.conv1], []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            sc = blk.shortcut
            proj = isinstance(sc, nn.Sequential) and len(sc) > 0 and isinstance(sc[0], nn.Conv2d)
            cons.append(blk.conv1)
            if proj:
                cons.append(sc[0])
                groups.append((prod, cons))
                prod, cons = [sc[0], _last_conv(blk)], []
            else:
                prod.append(_last_conv(blk))
    cons.append(model.fc)
    groups.append((prod, cons))
    return groups


def _folded(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def equalize(model: nn.Module, groups: list[tuple[list, list]], *, iters: int = 4) -> nn.Module:
    """Cross-layer equalisation (Nagel et al. 2019): for each channel ``i`` shared by producers and consumers,
    ``s_i = sqrt(r1_i / r2_i)`` with ``r1`` the producers' output-channel ranges and ``r2`` the consumers'
    input-channel ranges; producers are divided by ``s`` (weights and bias), consumers multiplied. Needs folded
    BatchNorms (a ReLU, add or average pool between producers and consumers)."""
    tiny = 1e-30
    for _ in range(iters):
        for prods, conss in groups:
            r1 = torch.stack([p.weight.reshape(p.weight.shape[0], -1).abs().amax(1) for p in prods]).amax(0)
            r2 = torch.stack([c.weight.transpose(0, 1).reshape(c.weight.shape[1], -1).abs().amax(1)
                              for c in conss]).amax(0)
            ok = (r1 > tiny) & (r2 > tiny)
            s = torch.where(ok, torch.sqrt(r1.clamp(min=tiny) / r2.clamp(min=tiny)), torch.ones_like(r1))
            for p in prods:
                p.weight.div_(s.reshape(-1, *([1] * (p.weight.dim() - 1))))
                if p.bias is not None:
                    p.bias.div_(s)
            for c in conss:
                c.weight.mul_(s.reshape(1, -1, *([1] * (c.weight.dim() - 2))))
    return model


def _cle(stream: bool) -> Callable:
    def step(model, cfg, calib):
        fold_bn(model)
        groups = _block_groups(model) + (_stream_groups(model) if stream else [])
        return equalize(model, groups), cfg
    return step


@torch.no_grad()
def high_bias_absorb(model: nn.Module, calib: Calibration) -> nn.Module:
    """DFQ's bias absorption, with the calibration minimum in place of ``beta - 3 gamma``: when a ReLU channel's
    pre-activation is at least ``c > 0`` on every calibration input, move ``c`` out of the producer's bias and
    into the consumers' bias (``relu(h) = relu(h - c) + c``). Done where it is exact for constant shifts: the
    final residual stream into the classifier (average pool, then linear) and block-internal unpadded consumers."""
    fold_bn(model)
    cases = []
    groups = _stream_groups(model)
    if groups:
        prods, _ = groups[-1]
        cases.append((prods, [model.fc], model.layer4[-1]))
    for blk in _blocks(model):
        convs = [getattr(blk, f"conv{i}") for i in range(1, 4) if isinstance(getattr(blk, f"conv{i}", None),
                                                                              nn.Conv2d)]
        for a, b in zip(convs, convs[1:]):
            if all(p == 0 for p in _pads(b)):  # Padding zeros would not carry the shift.
                cases.append(([a], [b], a))
    for prods, conss, site in cases:
        if isinstance(site, nn.Conv2d):
            mins: list = []
            _capture(model, [site], calib, lambda i, m, t: mins.append(_chan_view(t).amin(1)), inputs=False)
            lo, last = torch.stack(mins).amin(0), site
        else:
            lo, last = _stream_min(model, site, calib), _last_conv(site)
        c = lo.clamp(min=0)
        if not (c > 0).any():
            continue
        _ensure_bias(last).sub_(c)
        for cons in conss:
            w = cons.weight
            shift = w.sum(dim=(2, 3)) @ c if w.dim() == 4 else w @ c
            _ensure_bias(cons).add_(shift)
    return model


@torch.no_grad()
def _stream_min(model: nn.Module, blk: nn.Module, calib: Calibration) -> torch.Tensor:
    """Per-channel minimum over the calibration set of a block's residual sum (the input of its last ReLU)."""
    calls: list = []
    mins: list = []
    h = blk.relu.register_forward_pre_hook(lambda mod, args: calls.append(args[0]))
    try:
        for xb in _batches(calib):
            calls.clear()
            model(xb)
            mins.append(_chan_view(calls[-1]).amin(1))  # The block's last ReLU call is the one on the sum.
    finally:
        h.remove()
    return torch.stack(mins).amin(0)


# ---------------------------------------------------------------------------------------------- bias correction

@torch.no_grad()
def bias_correction(model: nn.Module, cfg: Any, calib: Calibration) -> tuple[nn.Module, Any]:
    """Empirical bias correction (Nagel et al. 2019): for each conv/linear layer in order, add
    ``E[y_float] - E[y_quantised]`` per output channel (earlier layers already corrected), measured with the
    model on ``cfg`` over the calibration set.

    The quantised model runs once, on the whole calibration set as one batch: each layer's correction is
    applied to its bias and to its output as soon as the layer has run, so later layers see corrected inputs.
    """
    strip_config(model)
    layers = _layers(model)
    ref: list = [0.0] * len(layers)
    count: list = [0] * len(layers)

    def acc(i, mod, t):
        v = _chan_view(t, mod)
        ref[i] = ref[i] + v.double().sum(1)
        count[i] += v.shape[1]
    _capture(model, layers, calib, acc, inputs=False)

    def correct(i, mod, out):
        delta = (ref[i] / max(count[i], 1) - _chan_view(out, mod).double().mean(1)).float()
        if not torch.isfinite(delta).all():
            return out
        _ensure_bias(mod).add_(delta)
        if isinstance(mod, nn.Linear):
            return out + delta
        return out + delta.reshape(1, -1, *([1] * (out.dim() - 2)))
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: correct(i, mod, out))
             for i, layer in enumerate(layers)]
    try:
        with using_config(model, cfg):
            model(_calib_x(calib))
    finally:
        for h in hooks:
            h.remove()
    return strip_config(model), cfg


# ---------------------------------------------------------------------------------------------- input statistics

@torch.no_grad()
def _input_stats(model: nn.Module, calib: Calibration, *, gram: bool = False) -> list[dict]:
    """Per conv/linear layer: per-channel min, max, sum, count of its input over the calibration set (fp32 model),
    and the channel Gram matrix (float64) when ``gram``."""
    layers = _layers(model)
    stats: list[dict] = [{} for _ in layers]

    def fn(i, mod, t):
        v = _chan_view(t, mod)
        s = stats[i]
        mn, mx, sm = v.amin(1), v.amax(1), v.double().sum(1)
        if not s:
            s.update(min=mn, max=mx, sum=sm, n=v.shape[1])
        else:
            s.update(min=torch.minimum(s["min"], mn), max=torch.maximum(s["max"], mx), sum=s["sum"] + sm,
                     n=s["n"] + v.shape[1])
        if gram:
            g = v.double() @ v.double().T
            s["gram"] = g if "gram" not in s else s["gram"] + g
    strip_config(model)
    _capture(model, layers, calib, fn)
    return list(zip(layers, stats))


@torch.no_grad()
def const_fold(model: nn.Module, calib: Calibration, *, rtol: float = 1e-3) -> nn.Module:
    """Fold input channels that are constant over the calibration set into the reading layer's bias and zero
    their weights.

    A channel counts as constant when ``max - min <= rtol * max(|min|, |max|)`` over every example and position;
    its mean is folded. A padded convolution sees zeros at the border instead of the constant, so a non-zero
    constant is folded only into linear layers and unpadded convolutions (a zero constant just loses its weights).

    Args:
        model: Plain layers (modified in place).
        calib: :class:`Calibration` or a tensor of inputs.
        rtol: Relative spread below which a channel is constant (0: exactly constant).

    Returns:
        ``model``.
    """
    if not isinstance(calib, Calibration):
        calib = Calibration(calib)
    for layer, s in _input_stats(model, calib):
        if not s:
            continue
        mean = (s["sum"] / s["n"]).float()
        const = (s["max"] - s["min"]) <= rtol * torch.maximum(s["min"].abs(), s["max"].abs())
        zero = const & (s["max"] == 0) & (s["min"] == 0)
        padded = isinstance(layer, nn.Conv2d) and any(p != 0 for p in _pads(layer))
        fold = const & ~zero & torch.tensor(not padded)
        w = layer.weight
        if fold.any():
            v = torch.where(fold, mean, torch.zeros_like(mean))
            shift = w.sum(dim=(2, 3)) @ v if w.dim() == 4 else w @ v
            _ensure_bias(layer).add_(shift)
        kill = fold | zero
        if kill.any():
            w[:, kill] = 0
    return model


def _pads(conv: nn.Conv2d) -> tuple:
    return conv.padding if isinstance(conv.padding, tuple) else (conv.padding,)


@torch.no_grad()
def dedupe(model: nn.Module, calib: Calibration, *, tol: float = 1e-8) -> nn.Module:
    """Merge input channels that are positive multiples of each other over the calibration set (``x_j = a x_k``,
    ``a > 0``, at every example and position): their weight columns are summed into one (``W_k += a W_j``) and
    the others zeroed. Exact for convolutions too (zero padding scales with the channel)."""
    for layer, s in _input_stats(model, calib, gram=True):
        if not s:
            continue
        g = s["gram"]
        d = torch.diagonal(g)
        live = d > 0
        cos = g / torch.sqrt(torch.outer(d, d)).clamp(min=1e-300)
        w = layer.weight
        done = torch.zeros(len(d), dtype=torch.bool)
        for k in range(len(d)):
            if done[k] or not live[k]:
                continue
            same = (cos[k] >= 1 - tol) & live & ~done
            same[k] = False
            for j in torch.nonzero(same).flatten().tolist():
                a = float(torch.sqrt(d[j] / d[k]))
                w[:, k] += a * w[:, j]
                w[:, j] = 0
                done[j] = True
            done[k] = True
    return model


# ---------------------------------------------------------------------------------------------- GPTQ

def _gptq_grid(cfg: Any) -> tuple[Any, Callable, float, bool]:
    """``(config to run on, element rounding r(x) on the unit grid, qmax, per_channel)``."""
    if isinstance(cfg, Int8):
        qmax = float((1 << (cfg.bits - 1)) - 1)
        return cfg, torch.round, qmax, cfg.granularity == Granularity.PER_CHANNEL
    if isinstance(cfg, MiniFloat):
        cfg = Scaled(element=cfg.name, weights="channel")
    fmt = cfg.format
    return cfg, fmt.round, fmt.max_finite, True


@torch.no_grad()
def gptq_layer(w: torch.Tensor, h: torch.Tensor, rnd: Callable, qmax: float, per_channel: bool, *,
               damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023) on ``w`` (rows = output channels, columns = inputs) with Hessian ``h``:
    columns are rounded in order onto the symmetric grid ``s * rnd(x / s)`` clamped to ``qmax`` (``s`` from
    each row's amax, or the tensor's), and each rounding error is spread onto the remaining columns through the
    inverse Hessian. The element that sets a row's amax is pinned to ``+-qmax * s`` so the deployed format
    recomputes the same scale."""
    w = w.clone().float()
    rows, cols = w.shape
    amax = w.abs().amax(1) if per_channel else w.abs().amax().expand(rows)
    s = (amax / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    arg = w.abs().argmax(1) if per_channel else torch.full((rows,), -1)
    if not per_channel:
        flat = int(w.abs().argmax())
        arg[flat // cols] = flat % cols
    sign = torch.sign(w[torch.arange(rows), arg.clamp(min=0)])
    h = h.clone().double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    mean = torch.diagonal(h).mean()
    while True:
        # A tiny damping can leave an exactly singular Hessian (copied channels) not positive-definite; as a
        # deployer would, raise it tenfold until the factorisation works.
        try:
            hd = h + damp * mean * torch.eye(cols, dtype=h.dtype)
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True).float()
            break
        except torch.linalg.LinAlgError:
            if damp >= 1.0:
                raise
            damp *= 10.0
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = torch.clamp(rnd(col / s), -qmax, qmax) * s
            pin = arg == i1 + i
            qc = torch.where(pin, sign * qmax * s, qc)
            q[:, i1 + i] = qc
            e = (col - qc) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


@torch.no_grad()
def gptq(model: nn.Module, cfg: Any, calib: Calibration, *, max_rows: int = 4096,
         seed: int = 0, damp: float = 0.01) -> tuple[nn.Module, Any]:
    """GPTQ every conv/linear layer in order (inputs from the model whose earlier layers are already rounded),
    onto the target's per-channel grid; returns the configuration the rounded weights are meant for.

    A chiplock ResNet is processed unit by unit (stem, each block, head), as GPTQ processes transformer blocks:
    the calibration activations entering a unit are kept, so each layer costs one pass through its unit only.
    Other models run the whole network up to each layer.
    """
    cfg, rnd, qmax, per_channel = _gptq_grid(cfg)
    strip_config(model)
    gen = torch.Generator().manual_seed(seed)
    x_in = _calib_x(calib)
    units = _resnet_units(model, x_in)
    if units is None:
        units = [(model, _layers(model))]

    def quantize(layer: nn.Module, rows: torch.Tensor) -> None:
        if len(rows) > max_rows:
            rows = rows[torch.randperm(len(rows), generator=gen)[:max_rows]]
        h = (rows.T @ rows).double() * (2.0 / len(rows))
        w = layer.weight.data
        layer.weight.data = gptq_layer(w.reshape(w.shape[0], -1), h, rnd, qmax, per_channel,
                                       damp=damp).reshape(w.shape)

    for unit, layers in units:
        for layer in layers:
            xs: list = []
            _capture(unit, [layer], x_in, lambda i, mod, t: xs.append(_rows(mod, t, max_rows, gen)),
                     stop_after=layer)
            quantize(layer, torch.cat(xs))
        if len(units) > 1:
            x_in = unit(x_in)
    return model, cfg


class _Head(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pool, self.fc = model.pool, model.fc

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class _Stem(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = model.conv1, model.bn1, model.relu

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


def _resnet_units(model: nn.Module, x: torch.Tensor) -> Optional[list]:
    """``[(unit, layers)]`` that chain to ``model``'s forward (a chiplock ResNet), checked on a few inputs;
    ``None`` when the layout differs."""
    names = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4", "pool", "fc")
    if not all(hasattr(model, a) for a in names):
        return None
    units = [_Stem(model)] + [blk for st in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in st]
    units.append(_Head(model))
    probe = x[:4]
    y = probe
    for u in units:
        y = u(y)
    if y.shape != model(probe).shape or not torch.allclose(y, model(probe), rtol=1e-4, atol=1e-5):
        return None
    return [(u, _layers(u)) for u in units]


def _rows(layer: nn.Module, x: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    """The layer's input as GEMM rows (im2col for a convolution), from enough images for ``2 * max_rows`` rows."""
    if isinstance(layer, nn.Conv2d):
        pos = F.unfold(x[:1], layer.kernel_size, layer.dilation, layer.padding, layer.stride).shape[-1]
        n = min(len(x), max(1, math.ceil(2 * max_rows / pos)))
        x = x[torch.randperm(len(x), generator=gen)[:n]]
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, D, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------- registration

def _model_only(fn: Callable) -> Callable:
    return lambda model, cfg, calib: (fn(model), cfg)


def _with_calib(fn: Callable) -> Callable:
    return lambda model, cfg, calib: (fn(model, calib), cfg)


def _always(cfg: Any) -> bool:
    return True


def _has_bn(model: nn.Module) -> bool:
    """The BatchNorm/conv tools have nothing to act on in a model without BatchNorm."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _gptq_applies(cfg: Any) -> bool:
    return (isinstance(cfg, Int8) and cfg.symmetric) or isinstance(cfg, MiniFloat) or (
        isinstance(cfg, Scaled) and cfg.weights == "channel")


register_step("amax-tensor", _amax("tensor"), _is_minifloat,
              doc="float element format with one amax weight scale per tensor, dynamic per-example activations")
register_step("amax-channel", _amax("channel"), _is_minifloat,
              doc="float element format with per-channel amax weight scales, dynamic per-example activations")
register_step("mx-block", _amax("block", activations="block", block=32, scale="e8m0"), _is_minifloat,
              doc="OCP microscaling: 32-blocks with power-of-two (e8m0) scales")
register_step("int8-mse-clip", int8_mse_clip, lambda c: isinstance(c, Int8) and c.symmetric,
              doc="per-channel weight clipping at the MSE-optimal range")
register_step("fold-bn", _model_only(fold_bn), _always, fits=_has_bn, doc="fold BatchNorm into the preceding conv")
register_step("bn-reestimate", bn_reestimate, _always,
              fits=_has_bn, doc="re-estimate BatchNorm statistics on the deployed configuration")
register_step("rebalance-pow2", _model_only(rebalance_pow2), lambda c: getattr(c, "family", None) == "float",
              fits=_has_bn, doc="power-of-two rescale of each conv/BN pair so max|w| is in [0.5, 1)")
register_step("cle", _cle(False), _is_fmt, fits=_has_bn,
              doc="fold BN, cross-layer equalisation inside residual blocks")
register_step("cle-stream", _cle(True), _is_fmt, fits=_has_bn,
              doc="fold BN, cross-layer equalisation inside blocks and across the residual stream and classifier")
register_step("high-bias-absorb", _with_calib(high_bias_absorb), _is_fmt,
              fits=_has_bn, doc="fold BN, absorb always-positive ReLU offsets into the next layer's bias (DFQ)")
register_step("bias-correction", bias_correction, _always,
              doc="empirical per-channel bias correction on the deployed configuration")
register_step("const-fold", _with_calib(const_fold), _always,
              doc="fold inputs constant over the calibration set into biases")
register_step("gptq", gptq, _gptq_applies, doc="GPTQ weight rounding onto the per-channel grid")
register_step("gptq-lowdamp", functools.partial(gptq, damp=1e-5), _gptq_applies,
              doc="GPTQ with damping 1e-5 (its one hyperparameter tuned: near-exact error feedback)")
def _dense_and_sparse(fraction: float) -> Callable:
    def step(model, cfg, calib):
        from chiplock.softlock.outliers import DenseAndSparse

        return model, DenseAndSparse(cfg.name, fraction)
    return step


register_step("outliers-1pct", _dense_and_sparse(0.01), _is_fmt,
              doc="dense-and-sparse (SpQR/SqueezeLLM): the top 1 % of each layer's weights kept in FP16")
register_step("outliers-5pct", _dense_and_sparse(0.05), _is_fmt,
              doc="dense-and-sparse with a generous 5 % outlier budget")
register_step("dedupe", _with_calib(dedupe), _always, standard=False,
              doc="merge input channels that are positive multiples of each other (decoy copies)")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Pre-norm decoder layers laid out as Llama's (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``)."""
    return [m for m in model.modules() if all(hasattr(m, a) for a in
                                               ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))]


@torch.no_grad()
def transformer_equalise(model: nn.Module) -> nn.Module:
    """The transformer deployer's standard pre-quantisation rewrite, data-free and exact.

    Each RMSNorm gain is folded into the linear layers it feeds (as QuaRot/SpinQuant do before quantising, and
    SmoothQuant's migration does with data), and each value->output pair (``v_proj``/``o_proj`` when heads are
    not grouped, ``up_proj``/``down_proj``) is equalised per channel by ``s = sqrt(r1 / r2)`` (cross-layer
    equalisation: attention is linear in V within a head, and the gated product is linear in ``up``). A final
    norm feeding a ``head`` linear layer (``model.body.norm``, as :mod:`chiplock_demo.models.gpt`) is folded too.
    """
    def fold(norm, linears):
        for lin in linears:
            lin.weight.mul_(norm.weight[None, :])
        norm.weight.fill_(1.0)

    def cle(first, second):
        r1 = first.weight.abs().amax(1)
        r2 = second.weight.abs().amax(0)
        s = torch.sqrt(r1 / r2.clamp(min=1e-12)).clamp(min=1e-12)
        first.weight.div_(s[:, None])
        if first.bias is not None:
            first.bias.div_(s)
        second.weight.mul_(s[None, :])

    for layer in _decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        if attn.v_proj.out_features == attn.o_proj.in_features:
            cle(attn.v_proj, attn.o_proj)
        cle(mlp.up_proj, mlp.down_proj)
    norm, head = getattr(getattr(model, "body", None), "norm", None), getattr(model, "head", None)
    if isinstance(head, nn.Linear) and getattr(norm, "weight", None) is not None:
        fold(norm, (head,))
    return model


register_step("transformer-equalise", _model_only(transformer_equalise), _is_fmt,
              fits=lambda m: bool(_decoder_layers(m)),
              doc="fold RMSNorm gains into the next linears, equalise v/o and up/down per channel")

_RECIPES = [
    # Float element formats: scales, then the data-free / calibration tools on top.
    ("amax-tensor",), ("amax-channel",), ("mx-block",), ("rebalance-pow2",), ("rebalance-pow2", "amax-channel"),
    ("rebalance-pow2", "bn-reestimate"), ("rebalance-pow2", "bias-correction"), ("amax-channel", "bn-reestimate"),
    ("mx-block", "bn-reestimate"), ("amax-channel", "bias-correction"), ("gptq", "bn-reestimate"),
    ("fold-bn", "amax-channel"), ("fold-bn", "cle", "amax-channel"), ("fold-bn", "cle-stream", "amax-channel"),
    ("fold-bn", "cle", "amax-channel", "bias-correction"), ("fold-bn", "cle-stream", "mx-block", "bias-correction"),
    ("fold-bn", "cle-stream", "amax-tensor", "bias-correction"),
    ("const-fold", "high-bias-absorb", "cle-stream", "amax-channel", "bias-correction"),
    # Integer formats.
    ("fold-bn",), ("bn-reestimate",), ("cle",), ("cle-stream",), ("cle", "bias-correction"),
    ("cle-stream", "bias-correction"), ("int8-mse-clip",), ("int8-mse-clip", "bn-reestimate"),
    ("cle-stream", "int8-mse-clip", "bias-correction"), ("int8-mse-clip", "bias-correction"),
    ("const-fold", "high-bias-absorb", "cle-stream", "int8-mse-clip", "bias-correction"),
    ("high-bias-absorb", "cle-stream", "bias-correction"), ("const-fold", "high-bias-absorb", "cle-stream"),
    ("const-fold", "high-bias-absorb", "cle-stream", "gptq"), ("gptq-lowdamp", "bn-reestimate"),
    # Transformers (the step fits only Llama-style decoder layers).
    ("transformer-equalise",), ("transformer-equalise", "amax-channel"), ("transformer-equalise", "gptq"),
    ("transformer-equalise", "gptq-lowdamp"), ("transformer-equalise", "bias-correction"), ("transformer-equalise", "int8-mse-clip", "bias-correction"),
    ("dedupe", "transformer-equalise", "bias-correction"),
    # Dense-and-sparse outlier handling (after a scale step for floats, so the dense part is amax-scaled).
    ("outliers-1pct",), ("outliers-5pct",), ("outliers-1pct", "bn-reestimate"), ("outliers-5pct", "bn-reestimate"),
    ("transformer-equalise", "outliers-5pct"),
    ("amax-channel", "outliers-1pct", "bn-reestimate"), ("amax-channel", "outliers-5pct", "bn-reestimate"),
    # Bespoke: undo decoy copies first.
    ("dedupe", "amax-channel"), ("dedupe", "amax-channel", "bn-reestimate"),
    ("dedupe", "fold-bn", "cle", "amax-channel", "bias-correction"),
    ("dedupe", "cle-stream", "bias-correction"),
    ("dedupe", "const-fold", "high-bias-absorb", "cle-stream", "bias-correction"),
]
for _chain in _RECIPES:
    register_recipe(*_chain)

__all__ = ["bias_correction", "bn_reestimate", "const_fold", "dedupe", "equalize", "fold_bn", "gptq", "gptq_layer",
           "high_bias_absorb", "int8_mse_clip", "rebalance_pow2", "transformer_equalise"]
