"""Authorization-neuron passwords: rank neurons, derive a password from a 32-byte key, serialise it.

A *password* names, per locked layer, a few authorization neurons (output channels of a ``Conv2d``, output units of
a ``Linear``), a locking value for each and a scale; :func:`chiplock.neuronlock.runtime.apply_password` replaces
those neurons' activations by ``value * scale``. The neurons are drawn from the most active ones on a calibration
set (:func:`rank_neurons`, public statistics), and every secret choice comes from HKDF-SHA256 of the key
(:func:`derive_password`), so a device that re-derives the key re-derives the password and any other key gives a
different, equally plausible one.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from chiplock.errors import ContainerError, UnsupportedConfig

__all__ = ["HKDF_INFO", "KEY_BYTES", "LayerPassword", "NeuronStats", "Password", "PasswordSpec", "default_layers",
           "derive_password", "layer_seed", "rank_neurons"]

#: Length of the key a password is derived from (a chiplock content key).
KEY_BYTES = 32
#: HKDF ``info`` prefix; the layer name follows it, so each layer draws from its own stream.
HKDF_INFO = b"chiplock neuronlock v1\0"
#: Cap on a serialised password (a ResNet-50 with gamma 0.1 needs well under 1 MiB).
_MAX_JSON_BYTES = 64 << 20
_LAYER_TYPES = (nn.Conv2d, nn.Linear)


def _floats(name: str, values: Iterable[Any]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must hold finite numbers (no NaN or inf); recompute it on clean data")
    return out


def _ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    out = []
    for v in values:
        # operator.index accepts ints, numpy integers and 0-d integer tensors, and refuses floats.
        try:
            if isinstance(v, (bool, np.bool_)):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{name} must be a sequence of integers, got {type(v).__name__}") from None
    return tuple(out)


@dataclass(frozen=True)
class NeuronStats:
    """Public activation statistics of one layer's neurons over a calibration set.

    Args:
        layer: Module name, as in ``model.named_modules()``.
        importance: Per neuron, the mean absolute activation (a conv channel over the batch and every spatial
            position; a linear unit over the batch and any leading dimensions).
        mean: Per neuron, the mean activation over the same positions.
        std: Per neuron, the standard deviation (population) over the same positions.

    Raises:
        ValueError: Empty, unequal lengths, negative or non-finite entries.

    Example:
        >>> NeuronStats("fc", (1.0, 0.5), (0.2, -0.1), (1.1, 0.7))
    """

    layer: str
    importance: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError("NeuronStats.layer must be a non-empty module name (see model.named_modules())")
        for name in ("importance", "mean", "std"):
            object.__setattr__(self, name, _floats(f"NeuronStats({self.layer!r}).{name}", getattr(self, name)))
        n = len(self.importance)
        if n == 0 or len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"NeuronStats({self.layer!r}): importance, mean and std must have the same non-zero "
                             f"length (got {n}, {len(self.mean)}, {len(self.std)})")
        if min(self.importance) < 0 or min(self.std) < 0:
            raise ValueError(f"NeuronStats({self.layer!r}): importance and std must be >= 0")

    def __len__(self) -> int:
        return len(self.importance)

    def to_json(self) -> dict:
        """Return a JSON-ready dict (public data: it may be stored with the model)."""
        return {"layer": self.layer, "importance": list(self.importance), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NeuronStats:
        """Rebuild from :meth:`to_json`'s dict.

        Raises:
            ContainerError: Not a dict with exactly ``layer``, ``importance``, ``mean``, ``std``, or invalid values.
        """
        _keys(d, {"layer", "importance", "mean", "std"}, "neuron statistics")
        try:
            return cls(d["layer"], d["importance"], d["mean"], d["std"])
        except ValueError as e:
            raise ContainerError(f"malformed neuronlock statistics: {e}; recompute them with rank_neurons") from None


@dataclass(frozen=True, repr=False)
class LayerPassword:
    """The secret part of a password for one layer.

    Args:
        layer: Module name.
        neurons: Distinct, non-negative authorization neuron indices (output channels or units), ascending.
        values: Locking value per neuron (same order as ``neurons``).
        scale: Positive factor; a locked neuron's activation becomes ``value * scale``.

    Raises:
        ValueError: Empty, unequal lengths, duplicate or negative neurons, non-finite or non-positive scale.

    The ``repr`` names only the layer and the neuron count, so a password does not leak into logs.
    """

    layer: str
    neurons: tuple[int, ...]
    values: tuple[float, ...]
    scale: float

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError("LayerPassword.layer must be a non-empty module name")
        object.__setattr__(self, "neurons", _ints(f"LayerPassword({self.layer!r}).neurons", self.neurons))
        object.__setattr__(self, "values", _floats(f"LayerPassword({self.layer!r}).values", self.values))
        (scale,) = _floats(f"LayerPassword({self.layer!r}).scale", (self.scale,))
        object.__setattr__(self, "scale", scale)
        if not self.neurons or len(self.values) != len(self.neurons):
            raise ValueError(f"LayerPassword({self.layer!r}): neurons and values must have the same non-zero length "
                             f"(got {len(self.neurons)} and {len(self.values)})")
        if len(set(self.neurons)) != len(self.neurons) or min(self.neurons) < 0:
            raise ValueError(f"LayerPassword({self.layer!r}): neurons must be distinct non-negative indices")
        if self.scale <= 0:
            raise ValueError(f"LayerPassword({self.layer!r}): scale must be > 0, got {self.scale}")

    def __repr__(self) -> str:
        return f"LayerPassword(layer={self.layer!r}, {len(self.neurons)} neurons, <secret>)"

    def to_json(self) -> dict:
        """Return a JSON-ready dict (secret)."""
        return {"layer": self.layer, "neurons": list(self.neurons), "values": list(self.values), "scale": self.scale}


@dataclass(frozen=True, repr=False)
class Password:
    """A neuron-lock password: one :class:`LayerPassword` per locked layer. Secret: never store it with the model.

    Args:
        layers: Per-layer passwords, distinct layer names.
        version: Format version (1).

    Raises:
        ValueError: No layers, a duplicate layer, an entry that is not a :class:`LayerPassword`, unknown version.

    Example:
        >>> pw = derive_password(key, rank_neurons(model, x))
        >>> Password.from_json(pw.to_json()) == pw
        True
    """

    layers: tuple[LayerPassword, ...]
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("Password.layers must name at least one layer")
        if not all(isinstance(lp, LayerPassword) for lp in self.layers):
            raise ValueError("Password.layers must hold LayerPassword objects")
        names = [lp.layer for lp in self.layers]
        if len(set(names)) != len(names):
            twice = sorted(n for n in set(names) if names.count(n) > 1)
            raise ValueError(f"Password.layers names a layer twice: {twice}; give each layer once")
        if isinstance(self.version, bool) or self.version != 1:
            raise ValueError(f"Password.version {self.version!r} is not supported; this chiplock reads version 1")

    def __repr__(self) -> str:
        return f"Password({len(self.layers)} layers, {sum(len(lp.neurons) for lp in self.layers)} neurons, <secret>)"

    def layer(self, name: str) -> LayerPassword:
        """Return the password for layer ``name``.

        Raises:
            UnsupportedConfig: The password does not lock that layer.
        """
        for lp in self.layers:
            if lp.layer == name:
                return lp
        raise UnsupportedConfig(f"the password does not lock layer {name!r}; it locks "
                                f"{[lp.layer for lp in self.layers]}")

    def to_json(self) -> dict:
        """Return a JSON-ready dict (secret); :meth:`from_json` reads it back exactly (floats round-trip)."""
        return {"version": self.version, "layers": [lp.to_json() for lp in self.layers]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | str | bytes) -> Password:
        """Rebuild and validate a password from :meth:`to_json`'s dict (or its JSON text).

        Raises:
            ContainerError: Not JSON, missing or unknown keys, wrong types, or invalid values; the message says what.
        """
        if isinstance(d, (str, bytes, bytearray)):
            from chiplock._json import JSONLimitError, Limits, loads

            data = d.encode("utf-8") if isinstance(d, str) else bytes(d)
            try:
                d = loads(data, Limits(max_bytes=_MAX_JSON_BYTES))
            except JSONLimitError as e:
                raise ContainerError(f"the neuronlock password {e}; pass the text written by Password.to_json") \
                    from None
        _keys(d, {"version", "layers"}, "password")
        if not isinstance(d["layers"], list):
            raise ContainerError("malformed neuronlock password: 'layers' must be a list; re-derive the password "
                                 "with derive_password")
        try:
            layers = []
            for item in d["layers"]:
                _keys(item, {"layer", "neurons", "values", "scale"}, "password layer")
                if not isinstance(item["neurons"], list) or not isinstance(item["values"], list):
                    raise ValueError("'neurons' and 'values' must be lists")
                if isinstance(item["scale"], bool) or not isinstance(item["scale"], (int, float)):
                    raise ValueError("'scale' must be a number")
                if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in item["values"]):
                    raise ValueError("'values' must hold numbers")
                layers.append(LayerPassword(item["layer"], item["neurons"], item["values"], item["scale"]))
            return cls(tuple(layers), d["version"])
        except ValueError as e:
            raise ContainerError(f"malformed neuronlock password: {e}; re-derive the password with derive_password "
                                 "from the right key") from None


def _keys(d: Any, expected: set[str], what: str) -> None:
    if not isinstance(d, Mapping):
        raise ContainerError(f"malformed neuronlock {what}: expected a JSON object, got {type(d).__name__}; "
                             "write it with to_json")
    missing, extra = expected - set(d), set(d) - expected
    if missing or extra:
        raise ContainerError(f"malformed neuronlock {what}: missing keys {sorted(missing)}, unknown keys "
                             f"{sorted(map(str, extra))}; write it with to_json")


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"PasswordSpec.{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"PasswordSpec.{name} must be finite with low <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class PasswordSpec:
    """Public parameters of :func:`derive_password` (stored with the model; not secret).

    Args:
        gamma: Fraction of each layer's neurons that are authorization neurons, in (0, 1] (EdgePro: 0.1); a layer
            gets ``max(1, ceil(gamma * n))``.
        pool: Candidates are the top ``pool`` fraction of neurons by importance, in [gamma, 1]; the draw within
            the pool is weighted by importance.
        value_sigmas: ``(low, high)``, ``0 <= low``: a locking value is ``mean + sign * k * std`` with ``k``
            uniform in this range and the sign drawn.
        scale_range: ``(low, high)``, ``0 < low``: the layer's scale is uniform in this range.
        version: Derivation version (1).

    Raises:
        ValueError: A field out of range; the message names it.

    Example:
        >>> PasswordSpec(gamma=0.05, pool=0.25)
    """

    gamma: float = 0.1
    pool: float = 0.5
    value_sigmas: tuple[float, float] = (2.0, 4.0)
    scale_range: tuple[float, float] = (1.5, 3.0)
    version: int = field(default=1)

    def __post_init__(self) -> None:
        for name in ("gamma", "pool"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"PasswordSpec.{name} must be a number in (0, 1], got {v!r}")
        if self.pool < self.gamma:
            raise ValueError(f"PasswordSpec.pool ({self.pool}) must be >= gamma ({self.gamma}): the candidate pool "
                             "has to hold the authorization neurons")
        sig, sc = _pair("value_sigmas", self.value_sigmas), _pair("scale_range", self.scale_range)
        if sig[0] < 0:
            raise ValueError(f"PasswordSpec.value_sigmas must be >= 0, got {self.value_sigmas!r}")
        if sc[0] <= 0:
            raise ValueError(f"PasswordSpec.scale_range must be > 0, got {self.scale_range!r}")
        object.__setattr__(self, "value_sigmas", sig)
        object.__setattr__(self, "scale_range", sc)
        if isinstance(self.version, bool) or self.version != 1:
            raise ValueError(f"PasswordSpec.version {self.version!r} is not supported; use 1")

    def to_json(self) -> dict:
        """Return a JSON-ready dict (public)."""
        return {"gamma": self.gamma, "pool": self.pool, "value_sigmas": list(self.value_sigmas),
                "scale_range": list(self.scale_range), "version": self.version}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PasswordSpec:
        """Rebuild from :meth:`to_json`'s dict.

        Raises:
            ContainerError: Missing or unknown keys, or a value out of range.
        """
        _keys(d, {"gamma", "pool", "value_sigmas", "scale_range", "version"}, "password spec")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ContainerError(f"malformed neuronlock password spec: {e}") from None

    def count(self, n: int) -> int:
        """Authorization neurons for a layer of ``n`` neurons: ``max(1, ceil(gamma * n))``."""
        return min(n, max(1, math.ceil(self.gamma * n - 1e-9)))

    def pool_size(self, n: int) -> int:
        """Candidates for a layer of ``n`` neurons: ``max(count(n), ceil(pool * n))``."""
        return min(n, max(self.count(n), math.ceil(self.pool * n - 1e-9)))


def default_layers(model: nn.Module) -> list[str]:
    """Names of the layers a password locks by default: every ``Conv2d`` and ``Linear`` but the classifier.

    The classifier is the last ``nn.Linear`` in ``model.named_modules()`` order (the head, for the project's
    models); locking it would fix logits directly.

    Example:
        >>> default_layers(build_architecture("smallcnn", image_size=8, width=8))
        ['features.0', 'features.3', 'head.1']
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    last_linear = max((i for i, (_, m) in enumerate(named) if isinstance(m, nn.Linear)), default=None)
    return [n for i, (n, _) in enumerate(named) if i != last_linear]


def _layer_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(layers, str):
        raise UnsupportedConfig(f"layers must be a list of module names, not the string {layers!r}; "
                                f"e.g. layers=[{layers!r}]")
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in layers:
        m = modules.get(name) if isinstance(name, str) else None
        if m is None:
            raise UnsupportedConfig(f"the model has no layer {name!r}; choose from default_layers(model) = "
                                    f"{default_layers(model)}")
        if not isinstance(m, _LAYER_TYPES):
            raise UnsupportedConfig(f"layer {name!r} is a {type(m).__name__}; only Conv2d and Linear layers can "
                                    "hold authorization neurons")
        if name in out:
            raise UnsupportedConfig(f"layer {name!r} is listed twice; list each layer once")
        out[name] = m
    if not out:
        raise UnsupportedConfig("no layer to lock: the model has no Conv2d or Linear besides its classifier; "
                                "pass layers=[...] explicitly")
    return out


def _batches(calib_x: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(calib_x, torch.Tensor):
        if calib_x.shape[0] == 0:
            raise UnsupportedConfig("calib_x is empty; pass at least one calibration sample")
        yield from calib_x.split(batch_size)
        return
    try:
        it = iter(calib_x)
    except TypeError:
        raise UnsupportedConfig(f"calib_x must be a tensor or an iterable of batches, got "
                                f"{type(calib_x).__name__}") from None
    for b in it:
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, torch.Tensor):
            raise UnsupportedConfig(f"calib_x yielded a {type(x).__name__}; yield tensors or (x, y) tuples")
        yield x


def rank_neurons(model: nn.Module, calib_x: Any, layers: Sequence[str] | None = None, *,
                 batch_size: int = 256) -> list[NeuronStats]:
    """Measure each neuron's importance, mean and std over a calibration set, with forward hooks.

    Runs the model in eval mode without gradients (its training mode is restored after). A conv channel is
    averaged over the batch and every spatial position; a linear unit over the batch and any leading dimensions
    (tokens). Every neuron, channel 0 included, is ranked.

    Args:
        model: The model (its parameters' device is used for the inputs).
        calib_x: Inputs: a tensor (split into ``batch_size`` batches) or an iterable of batches / ``(x, y)``.
        layers: Module names; default :func:`default_layers`.
        batch_size: Batch size when ``calib_x`` is a tensor.

    Returns:
        One :class:`NeuronStats` per layer, in the order of ``layers``.

    Raises:
        UnsupportedConfig: A layer the model lacks or that is not Conv2d/Linear, a layer the forward pass never
            reached, empty calibration data.

    Example:
        >>> stats = rank_neurons(model, x_train[:512])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UnsupportedConfig(f"batch_size must be a positive integer, got {batch_size!r}")
    mods = _layer_modules(model, default_layers(model) if layers is None else
                          layers if isinstance(layers, str) else list(layers))
    sums: dict[str, list] = {}

    def make_hook(name: str, conv: bool):
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            a = out.detach().to(torch.float64)
            a = a.movedim(-3, -1) if conv else a
            a = a.reshape(-1, a.shape[-1])
            acc = sums.setdefault(name, [0, 0.0, 0.0, 0.0])
            acc[0] += a.shape[0]
            acc[1] = acc[1] + a.abs().sum(0)
            acc[2] = acc[2] + a.sum(0)
            acc[3] = acc[3] + (a * a).sum(0)
        return hook

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    handles = [m.register_forward_hook(make_hook(n, isinstance(m, nn.Conv2d))) for n, m in mods.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x in _batches(calib_x, batch_size):
                model(x.to(device))
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise UnsupportedConfig("calib_x yielded no batch; pass at least one calibration sample")
    out = []
    for name in mods:
        if name not in sums:
            raise UnsupportedConfig(f"layer {name!r} never ran in the forward pass; pick layers the model uses")
        n, s_abs, s, s2 = sums[name]
        mean = s / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt()
        out.append(NeuronStats(name, (s_abs / n).tolist(), mean.tolist(), std.tolist()))
    return out


def layer_seed(key: bytes, layer: str) -> int:
    """The 256-bit seed of ``layer``'s draw: HKDF-SHA256(key, info=HKDF_INFO + layer name), little-endian."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO + layer.encode("utf-8")).derive(key)
    return int.from_bytes(raw, "little")


def _derive_layer(key: bytes, st: NeuronStats, spec: PasswordSpec) -> LayerPassword:
    rng = np.random.default_rng(layer_seed(key, st.layer))
    imp = np.asarray(st.importance, dtype=np.float64)
    n = imp.size
    k, p = spec.count(n), spec.pool_size(n)
    # A stable sort on -importance breaks ties by index, so the pool is a pure function of the public stats.
    pool = np.argsort(-imp, kind="stable")[:p]
    w = imp[pool]
    if np.count_nonzero(w) < k:
        # Dead neurons (importance 0) could not be drawn without replacement; give every candidate some weight.
        w = w + (w.max() * 1e-3 if w.max() > 0 else 1.0)
    chosen = rng.choice(pool, size=k, replace=False, p=w / w.sum())
    signs = rng.choice(np.array([-1.0, 1.0]), size=k)
    sig = rng.uniform(*spec.value_sigmas, size=k)
    scale = float(rng.uniform(*spec.scale_range))
    std = np.asarray(st.std, dtype=np.float64)
    # A constant neuron (std 0) would get its natural value back; floor its spread at a tenth of the layer's
    # median spread so the locking value always departs from the natural one.
    floor = 0.1 * float(np.median(std)) or 1e-3
    mean = np.asarray(st.mean, dtype=np.float64)
    values = mean[chosen] + signs * sig * np.maximum(std[chosen], floor)
    order = np.argsort(chosen)
    return LayerPassword(st.layer, tuple(int(i) for i in chosen[order]), tuple(float(v) for v in values[order]),
                         scale)


def derive_password(key: bytes, stats: Sequence[NeuronStats], spec: PasswordSpec = PasswordSpec()) -> Password:
    """Derive the password for ``key`` from the public statistics and spec. Deterministic.

    Per layer, HKDF-SHA256(key, info=``HKDF_INFO`` + layer name) seeds ``numpy.random.default_rng``; it draws
    ``spec.count(n)`` distinct neurons without replacement from the top ``spec.pool_size(n)`` by importance
    (weights proportional to importance), a sign and a ``k`` in ``value_sigmas`` per neuron (value =
    ``mean + sign * k * std``), and the layer's scale in ``scale_range``. A wrong key yields a different, equally
    plausible password and no error.

    Args:
        key: 32 bytes (a chiplock content key; see :mod:`chiplock.neuronlock.keys`).
        stats: From :func:`rank_neurons`, distinct layers.
        spec: Public derivation parameters.

    Returns:
        The :class:`Password`, layers in the order of ``stats``.

    Raises:
        UnsupportedConfig: The key is not 32 bytes, ``stats`` is empty or names a layer twice, ``spec`` is not a
            :class:`PasswordSpec`.

    Example:
        >>> pw = derive_password(os.urandom(32), rank_neurons(model, x[:512]), PasswordSpec(gamma=0.1))
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise UnsupportedConfig(f"key must be {KEY_BYTES} bytes, got {type(key).__name__}; pass a chiplock content "
                                "key (chiplock.neuronlock.keys) or os.urandom(32)")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise UnsupportedConfig(f"key must be {KEY_BYTES} bytes, got {len(key)}; pass a chiplock content key "
                                "(chiplock.neuronlock.keys) or os.urandom(32)")
    if not isinstance(spec, PasswordSpec):
        raise UnsupportedConfig(f"spec must be a PasswordSpec, got {type(spec).__name__}")
    stats = list(stats)
    if not stats or not all(isinstance(s, NeuronStats) for s in stats):
        raise UnsupportedConfig("stats must be a non-empty list of NeuronStats; compute it with rank_neurons")
    names = [s.layer for s in stats]
    if len(set(names)) != len(names):
        raise UnsupportedConfig("stats names a layer twice; pass one NeuronStats per layer")
    return Password(tuple(_derive_layer(key, s, spec) for s in stats), version=1)
