"""Stages as chiplock locked parts: one container whose groups are the stages (``stage0``, ``stage1``, ...),
each under its own content key, so a rank's licence (issued for its group alone) opens its own stage and no other.

The vendor locks the whole model once (:func:`lock_stages`) and issues one licence per rank
(:func:`issue_stage_license`); a rank opens its stage straight into the modules it materialised
(:func:`load_stage`) and locks its trained stage on its own (:func:`save_stage`), never holding another's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch

import chiplock
from chiplock.config import GroupConfig, LockConfig
from chiplock.errors import ContainerError, UnsupportedConfig
from chiplock.license import ContentKeys, License, issue_license
from chiplock.profile import DeviceProfile
from chiplock.split.units import Layout, Units

#: Names of the files a split folder holds.
MODEL_FILE, LAYOUT_FILE = "model.chiplock", "split.json"


def stage_config(layout: Layout, *, transform: str = "pre-aes") -> LockConfig:
    """The lock config whose groups are the stages: group ``stageI`` holds the tensors of stage ``I``'s units.

    Example:
        >>> stage_config(make_layout(ArchSpec("mlp"), 2)).assign("head.0.weight")
        ('stage1', 'pre-aes')
    """
    groups = tuple(GroupConfig(label, transform, tuple(f"{unit}.*" for unit in units))
                   for label, units in zip(layout.labels, layout.stages))
    return LockConfig(transform=transform, groups=groups)


def _state(weights: Units | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    return {n: t.detach().contiguous() for n, t in state.items()}


def lock_stages(weights: Units | Mapping[str, torch.Tensor], layout: Layout, out_path: str | os.PathLike, *,
                content_keys_path: str | os.PathLike, transform: str = "pre-aes", **lock_kw: Any) -> dict[str, Any]:
    """Lock a whole chain once, one group (and content key) per stage.

    Args:
        weights: The chain (:class:`~chiplock.split.units.Units`) or its state dict.
        layout: How it is split.
        out_path: The container to write.
        content_keys_path: Where the content keys go (mode 0600; the vendor's secret).
        transform: The transform of every stage.
        **lock_kw: Passed to :func:`chiplock.lock` (``signing_key``, ``force``, ...).

    Returns:
        The public metadata (:func:`chiplock.inspect`).

    Raises:
        UnsupportedConfig: A tensor belongs to no stage (the layout does not match the weights).

    Example:
        >>> lock_stages(units, layout, "split/model.chiplock", content_keys_path="split.keys")  # doctest: +SKIP
    """
    state = _state(weights)
    config = stage_config(layout, transform=transform)
    stray = [n for n in state if config.assign(n)[0] not in layout.labels]
    if stray:
        raise UnsupportedConfig(f"tensors {', '.join(stray[:3])} belong to no stage of the layout; build the weights "
                                "from the layout's architecture (chiplock.split.build_units)")
    return chiplock.lock(state, out_path, config=config, content_keys_path=content_keys_path, **lock_kw)


def issue_stage_license(keys: ContentKeys, profile: DeviceProfile, stage: int, **kw: Any) -> License:
    """A licence that opens stage ``stage`` alone, for the device of the rank that runs it.

    Args:
        keys: The content keys :func:`lock_stages` wrote.
        profile: The rank's device profile.
        stage: The stage index.
        **kw: Passed to :func:`chiplock.issue_license` (``secret``, ``signing_key``, ``allow_weak_key``).
    """
    return issue_license(keys, profile, groups=[f"stage{stage}"], **kw)


def load_stage(stage_module: Units, path: str | os.PathLike, stage: int, *, license: License | str | os.PathLike,
               profile: DeviceProfile | None = None, secret: bytes | None = None, **unlock_kw: Any) -> None:
    """Open stage ``stage`` of a locked container into ``stage_module``, one tensor at a time.

    Only the stage's own group is unwrapped and decoded: the other stages' bytes are never read.

    Args:
        stage_module: The rank's materialised stage (:func:`chiplock.split.units.build_stage`).
        path: The container (from :func:`lock_stages` or :func:`save_stage`).
        stage: The stage index (group ``stage{stage}``).
        license: The rank's licence.
        profile: The device profile to unlock as (``None``: measure this device).
        secret: The vendor secret, if the licence was issued with one.
        **unlock_kw: Passed to :func:`chiplock.iter_unlock` (``verify_key``, ``max_kdf_memory_kib``).

    Raises:
        ContainerError: The stage's tensors in the file are not those of ``stage_module``.
        InvalidKey, UnsupportedConfig: As :func:`chiplock.iter_unlock` (wrong device; no such group).
    """
    want = stage_module.state_dict()
    got: dict[str, torch.Tensor] = {}
    for name, tensor in chiplock.iter_unlock(path, profile, secret, license=license, groups=[f"stage{stage}"],
                                             **unlock_kw):
        if name not in want or want[name].shape != tensor.shape or want[name].dtype != tensor.dtype:
            raise ContainerError(f"tensor {name!r} of stage {stage} in {os.fspath(path)!r} does not fit this "
                                 "stage's architecture; use the split.json written with the file")
        got[name] = tensor
    missing = sorted(set(want) - set(got))
    if missing:
        raise ContainerError(f"stage {stage} in {os.fspath(path)!r} lacks {', '.join(missing[:3])}; use the "
                             "split.json written with the file")
    stage_module.load_state_dict(got, strict=True)


def save_stage(stage_module: Units, path: str | os.PathLike, stage: int, *,
               content_keys_path: str | os.PathLike | None = None, profile: DeviceProfile | None = None,
               transform: str = "pre-aes", **lock_kw: Any) -> dict[str, Any]:
    """Lock one stage on its own (group ``stage{stage}``): what a rank writes after training.

    Args:
        stage_module: The stage (plain weights: unfold boundary maps first).
        path: The container to write.
        stage: The stage index.
        content_keys_path: Where this stage's content keys go (mode 0600), to issue licences later; or
        profile: embed the licence for one device instead (the single-file mode).
        transform: The transform.
        **lock_kw: Passed to :func:`chiplock.lock`.
    """
    config = LockConfig(transform=transform, groups=(GroupConfig(f"stage{stage}", transform, ("*",)),))
    return chiplock.lock(_state(stage_module), path, profile, config=config, content_keys_path=content_keys_path,
                         **lock_kw)


def digest(t: torch.Tensor) -> str:
    """A short SHA-256 of a tensor's bytes (for reports: which weights a rank holds)."""
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def lock_split(units: Units, layout: Layout, out_dir: str | os.PathLike, *, keys_path: str | os.PathLike,
               profiles: list[DeviceProfile] = (), transform: str = "pre-aes", **issue_kw: Any) -> list[Path]:
    """The vendor's step: write ``out_dir/model.chiplock`` and ``out_dir/split.json``, the content keys to
    ``keys_path``, and ``out_dir/stageI.lic`` for each stage (profile ``I``, or the one profile for every stage).

    Returns:
        The licence paths.

    Raises:
        ValueError: ``profiles`` holds neither one profile nor one per stage.
    """
    out = Path(out_dir)
    n = len(layout.stages)
    if len(profiles) not in (0, 1, n):
        raise ValueError(f"pass one profile (every rank on this device) or {n} (one per stage), not {len(profiles)}")
    lock_stages(units, layout, out / MODEL_FILE, content_keys_path=keys_path, transform=transform)
    from chiplock._io import atomic_write_bytes

    atomic_write_bytes(out / LAYOUT_FILE, layout.to_json().encode())
    keys = ContentKeys.load(keys_path)
    paths = []
    for i in range(n if profiles else 0):
        lic = issue_stage_license(keys, profiles[i if len(profiles) == n else 0], i, **issue_kw)
        lic.save(out / f"stage{i}.lic")
        paths.append(out / f"stage{i}.lic")
    return paths


__all__ = ["LAYOUT_FILE", "MODEL_FILE", "digest", "issue_stage_license", "load_stage", "lock_split", "lock_stages",
           "save_stage", "stage_config"]
