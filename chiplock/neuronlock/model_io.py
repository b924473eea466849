"""Save and load neuron-locked models as plain safetensors files (no pickle).

The file holds the locked model's ``state_dict`` and, under the ``__metadata__`` key ``chiplock.neuronlock``, a
JSON document with everything *public* about the lock: the architecture (so the model can be rebuilt), the locked
layers, their :class:`NeuronStats` and the :class:`PasswordSpec`. A device re-derives the password from its key and
these stats with :func:`chiplock.neuronlock.derive_password`. The password and the key are never written:
:func:`save_model` takes neither, and refuses free-form notes that look like one.

Example:
    >>> save_model(locked, "model.safetensors", arch={"name": "smallcnn", "num_classes": 10, "image_size": 28,
    ...            "width": 16}, stats=stats, spec=PasswordSpec())
    >>> model, info = load_model("model.safetensors")
    >>> pw = derive_password(key, info.stats, info.spec)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from chiplock import _json
from chiplock._io import atomic_write_bytes, check_input
from chiplock.errors import ContainerError, UnsupportedConfig
from chiplock.neuronlock.password import NeuronStats, Password, PasswordSpec
from chiplock.softlock.model_io import build_architecture

__all__ = ["META_KEY", "NeuronLockInfo", "load_model", "save_model"]

META_KEY = "chiplock.neuronlock"
FORMAT_VERSION = 1
_META_LIMITS = _json.Limits(max_bytes=64 << 20)
_ARCH_KEYS = ("name", "num_classes", "image_size", "width")
# Free-form notes may not carry keys like these: a password or key has no business in a public file.
_SECRET_WORDS = ("password", "secret", "key")


@dataclass(frozen=True)
class NeuronLockInfo:
    """The public description of a neuron-locked model, as stored in its file.

    Attributes:
        arch: ``{"name", "num_classes", "image_size", "width"}`` for
            :func:`chiplock.softlock.model_io.build_architecture`.
        stats: One :class:`NeuronStats` per locked layer (calibration statistics, in lock order).
        spec: The :class:`PasswordSpec` the password is derived with.
        extra: Free-form public notes (accuracies, training configuration).
        version: File-format version.
    """

    arch: dict[str, Any]
    stats: tuple[NeuronStats, ...]
    spec: PasswordSpec
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def layers(self) -> tuple[str, ...]:
        """The locked layers' module names."""
        return tuple(s.layer for s in self.stats)


def _bad(path: Any, why: str) -> ContainerError:
    return ContainerError(f"{path} is not a valid neuron-locked model ({why}); re-save it with "
                          "chiplock.neuronlock.model_io.save_model")


def _check_arch(arch: Any) -> dict[str, Any]:
    if not isinstance(arch, Mapping) or set(arch) != set(_ARCH_KEYS):
        raise UnsupportedConfig(f"arch={arch!r}: pass a dict with exactly the keys {', '.join(_ARCH_KEYS)}, e.g. "
                                '{"name": "smallcnn", "num_classes": 10, "image_size": 28, "width": 16}')
    if not isinstance(arch["name"], str) or not all(
            isinstance(arch[k], int) and not isinstance(arch[k], bool) and 0 < arch[k] <= 1 << 16
            for k in _ARCH_KEYS[1:]):
        raise UnsupportedConfig(f"arch={arch!r}: name is a string, num_classes/image_size/width positive integers")
    return {k: arch[k] for k in _ARCH_KEYS}


def _check_layers(model: nn.Module, stats: Sequence[NeuronStats]) -> None:
    modules = dict(model.named_modules())
    names = [s.layer for s in stats]
    if len(set(names)) != len(names):
        raise UnsupportedConfig(f"stats name a layer twice ({names}); pass one NeuronStats per locked layer")
    for s in stats:
        m = modules.get(s.layer)
        if m is None:
            raise UnsupportedConfig(f"stats name layer {s.layer!r}, which the model does not have; use names from "
                                    "model.named_modules()")
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        if width is not None and width != len(s.importance):
            raise UnsupportedConfig(f"stats for {s.layer!r} cover {len(s.importance)} neurons but the layer has "
                                    f"{width}; rank the neurons of this model again")


def _check_extra(obj: Any, where: str = "extra") -> None:
    if isinstance(obj, (Password, bytes, bytearray, memoryview)):
        raise UnsupportedConfig(f"{where} holds a {type(obj).__name__}; a neuron-locked model file never stores the "
                                "password or key (the device re-derives them)")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UnsupportedConfig(f"{where} has a non-string key {k!r}; use string keys (JSON)")
            if any(w in k.lower() for w in _SECRET_WORDS):
                raise UnsupportedConfig(f"{where} has the key {k!r}; a neuron-locked model file never stores the "
                                        "password or key: drop it or rename a public field")
            _check_extra(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_extra(v, f"{where}[{i}]")


def save_model(model: nn.Module, path: str | os.PathLike, *, arch: Mapping[str, Any],
               stats: Sequence[NeuronStats], spec: PasswordSpec,
               extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write a neuron-locked model and its public lock description to a safetensors file, atomically.

    Args:
        model: The lock-trained model (no hook installed: the file holds the weights alone).
        path: The output file (replaced only once the new file is complete).
        arch: ``{"name", "num_classes", "image_size", "width"}``, as for
            :func:`chiplock.softlock.model_io.build_architecture`; ``model`` must have that architecture.
        stats: The :class:`NeuronStats` of the locked layers (what the password was derived from).
        spec: The :class:`PasswordSpec` the password was derived with.
        extra: Optional public notes, JSON-serialisable; keys containing ``password``, ``secret`` or ``key``
            and bytes values are refused.

    Raises:
        UnsupportedConfig: ``arch``, ``stats``, ``spec`` or ``extra`` is malformed or does not fit ``model``, or
            the architecture name is unknown.
        FileAccessError: The file cannot be written.

    Example:
        >>> save_model(locked, "m.safetensors", arch=arch, stats=stats, spec=cfg.spec, extra={"acc": 0.98})
    """
    from safetensors.torch import save

    arch = _check_arch(arch)
    stats = tuple(stats)
    if not stats or not all(isinstance(s, NeuronStats) for s in stats):
        raise UnsupportedConfig("save_model: stats must be a non-empty sequence of NeuronStats (from rank_neurons)")
    if not isinstance(spec, PasswordSpec):
        raise UnsupportedConfig(f"save_model: spec must be a PasswordSpec, not {type(spec).__name__}")
    extra = dict(extra or {})
    _check_extra(extra)
    reference = build_architecture(arch["name"], num_classes=arch["num_classes"], image_size=arch["image_size"],
                                   width=arch["width"])
    state = model.state_dict()
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != ref_shapes:
        raise UnsupportedConfig(f"save_model: the model's weights do not match arch={arch}; pass the arch it was built "
                                "with")
    _check_layers(model, stats)
    doc = {"version": FORMAT_VERSION, "arch": arch, "layers": [s.layer for s in stats],
           "stats": [s.to_json() for s in stats], "spec": spec.to_json(), "extra": extra}
    try:
        text = json.dumps(doc, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedConfig(f"save_model: stats, spec and extra must be finite JSON values ({exc})") from None
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: text}))


def _parse(doc: Any, path: Any) -> NeuronLockInfo:
    if not isinstance(doc, dict) or set(doc) != {"version", "arch", "layers", "stats", "spec", "extra"}:
        raise _bad(path, "the metadata has the wrong fields")
    if doc["version"] != FORMAT_VERSION:
        raise ContainerError(f"{path} has neuron-lock format version {doc['version']!r}; this chiplock reads "
                             f"version {FORMAT_VERSION}: upgrade chiplock")
    try:
        arch = _check_arch(doc["arch"])
    except UnsupportedConfig as exc:
        raise _bad(path, str(exc)) from None
    if not isinstance(doc["stats"], list) or not doc["stats"]:
        raise _bad(path, "stats must be a non-empty list")
    try:
        stats = tuple(NeuronStats.from_json(s) for s in doc["stats"])
        spec = PasswordSpec.from_json(doc["spec"])
    except ContainerError as exc:
        raise _bad(path, str(exc)) from None
    if doc["layers"] != [s.layer for s in stats]:
        raise _bad(path, "layers do not match the stats")
    if not isinstance(doc["extra"], dict):
        raise _bad(path, "extra is not an object")
    return NeuronLockInfo(arch=arch, stats=stats, spec=spec, extra=doc["extra"])


def load_model(path: str | os.PathLike) -> tuple[nn.Module, NeuronLockInfo]:
    """Rebuild a model written by :func:`save_model`, without any password applied.

    Returns:
        ``(model in eval mode, NeuronLockInfo)``. Apply the password re-derived from the device's key with
        ``apply_password(model, derive_password(key, info.stats, info.spec))``.

    Raises:
        FileAccessError: The file is missing or unreadable.
        UnsupportedConfig: The file has no neuron-lock metadata, or names an unknown architecture.
        ContainerError: The metadata or the weights are malformed, or of a newer format version.

    Example:
        >>> model, info = load_model("m.safetensors")
    """
    from safetensors import safe_open

    check_input(path, "model file", "pass the .safetensors file written by save_model")
    try:
        # One open for the metadata and the tensors (what safetensors.torch.load_file does inside).
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise _bad(path, f"not a readable safetensors file: {exc}") from None
    if META_KEY not in meta:
        raise UnsupportedConfig(f"{path} has no {META_KEY!r} metadata; was it written by chiplock neuronlock? "
                                "(a soft-locked model loads with chiplock.softlock.model_io.load_model)")
    try:
        doc = _json.loads(meta[META_KEY].encode("utf-8"), _META_LIMITS)
    except _json.JSONLimitError as exc:
        raise _bad(path, f"the metadata {exc}") from None
    info = _parse(doc, path)
    a = info.arch
    model = build_architecture(a["name"], num_classes=a["num_classes"], image_size=a["image_size"],
                               width=a["width"])
    try:
        model.load_state_dict(tensors)
        _check_layers(model, info.stats)
    except (RuntimeError, UnsupportedConfig) as exc:
        raise _bad(path, f"the weights do not fit arch {a}: {str(exc).splitlines()[0]}") from None
    return model.eval(), info
