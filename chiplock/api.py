"""The safe verbs: lock, unlock (whole, streamed, into a model or a file), inspect.

Locking draws a random content key per group of tensors and encodes each tensor under it, one tensor at a time;
a *licence* carries the content keys to one device (:mod:`chiplock.license`). With a device profile the licence
goes inside the file (the single-file mode); without one the content keys go to a private keys file, and
``chiplock license issue`` makes a small licence per device later.
"""

from __future__ import annotations

import hmac
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import chiplock
from chiplock._digest import copy_and_digest, tree_root
from chiplock._dtypes import DTYPE_BY_NAME, DTYPE_NAMES
from chiplock._io import atomic_writer, check_output
from chiplock.config import DEFAULT_GROUP, LockConfig
from chiplock.container.plain import read_plain, write_safetensors
from chiplock.container.reader import Container, open_container
from chiplock.container.schema import Group, Metadata, TensorInfo, tensor_name_problem
from chiplock.container.writer import ContainerWriter, Planned
from chiplock.errors import (ChiplockError, ContainerError, InvalidTag, OutputError, ProfileError,
                             UnsupportedConfig)
from chiplock.keys.kdf import KdfParams, subkey
from chiplock.license import (ContentKeys, License, LowEntropyWarning, check_key_strength, issue_license,
                              open_license, sign, verify_signature)
from chiplock.profile import DeviceProfile
from chiplock.transforms import get_transform

Progress = Callable[[str, int, int], None]
_HEADER_LABEL = b"chiplock header mac v3\0"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------------------------------
# Sources of weights: a mapping, one file, or a sharded folder.

@dataclass
class _Source:
    """The tensors to lock, known by name, dtype and shape before any is read."""

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def _is_folder_source(weights: object) -> bool:
    if not isinstance(weights, (str, os.PathLike)):
        return False
    p = Path(weights)
    return p.is_dir() or p.name.endswith(".index.json")


def _source(weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> _Source:
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise ContainerError(f"weights file {str(path)!r} not found; check the path")
        if path.suffix == ".safetensors":
            plain = read_plain(path)
            for e in plain.entries:
                if e.dtype not in DTYPE_BY_NAME:
                    raise UnsupportedConfig(f"tensor {e.name!r} has unsupported dtype {e.dtype}; convert it to one "
                                            f"of {', '.join(sorted(DTYPE_NAMES.values()))}")
            return _Source([(e.name, DTYPE_BY_NAME[e.dtype], e.shape) for e in plain.entries], plain.__iter__)
        if path.suffix not in _WEIGHT_SUFFIXES:
            raise UnsupportedConfig(f"unknown weights format {path.suffix!r}; use .safetensors, .pt or .bin")
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure of the user's file becomes one clear error.
            raise ContainerError(f"could not read weights from {str(path)!r} ({type(exc).__name__}); "
                                 "pass a safetensors file or a torch state dict saved with torch.save") from None
    if not isinstance(weights, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise UnsupportedConfig("weights must be a mapping of str -> torch.Tensor (a state dict); "
                                "for a model pass model.state_dict()")
    tensors = dict(weights)
    for name, t in tensors.items():
        if t.layout != torch.strided or t.is_meta:
            raise UnsupportedConfig(f"tensor {name!r} is not a dense tensor in memory ({t.layout}, device "
                                    f"{t.device}); convert it with .to_dense() / load its data before locking")
    return _Source([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], lambda: iter(tensors.items()))


def _plan(source: _Source, config: LockConfig) -> list[Planned]:
    """Check every name and dtype against the transforms and lay out the stored entries, before any write."""
    plan = []
    for name, dtype, shape in source.specs:
        problem = tensor_name_problem(name)
        if problem:
            raise UnsupportedConfig(f"tensor name {ascii(name)[:80]} {problem}; rename the tensor in the state dict "
                                    "before locking (and in the model that loads it)")
        if dtype not in DTYPE_NAMES:
            raise UnsupportedConfig(f"tensor {name!r} has unsupported dtype {dtype}; convert it to one of "
                                    f"{', '.join(sorted(DTYPE_NAMES.values()))}")
        label, tname = config.assign(name)
        tf = get_transform(tname)
        try:
            stored = tf.stored_dtype(DTYPE_NAMES[dtype])
        except UnsupportedConfig as exc:
            raise UnsupportedConfig(f"tensor {name!r}: {exc}") from None
        numel = math.prod(shape)
        plan.append(Planned(name, label, DTYPE_NAMES[dtype], tuple(shape), stored,
                            tf.params_reserve(DTYPE_NAMES[dtype], numel)))
    return plan


def load_weights(weights: Mapping[str, torch.Tensor] | str | os.PathLike, *,
                 transform: str | None = None) -> dict[str, torch.Tensor]:
    """Read a mapping of name -> tensor from a mapping, ``.safetensors``, or ``.pt``/``.bin`` state dict, with
    every name and dtype checked as :func:`lock` checks them (against ``transform`` when given).

    Raises:
        ContainerError: The file is missing or unreadable.
        UnsupportedConfig: Not a flat mapping of names to dense tensors of a supported dtype, an unfit name, or a
            dtype ``transform`` cannot store.
    """
    source = _source(weights)
    _plan(source, LockConfig(transform=transform or "aes"))
    return dict(source.tensors())


# ----------------------------------------------------------------------------------------------------------------
# Lock.

def _header_mac(key: bytes, label: str, meta: Metadata) -> str:
    """HMAC-SHA256 of the content's description under a group's content key.

    Only groups whose transform detects a wrong key get one (aes, shuffle): their licence wrap is authenticated
    anyway, so a keyed check reveals nothing new. A pre-aes group must not have one (it would be a key oracle).
    """
    return hmac.new(subkey(key, "header"), _HEADER_LABEL + label.encode() + b"\0" + meta.content_canonical(),
                    "sha256").hexdigest()


def _sealer(keys: ContentKeys, signing_key: Ed25519PrivateKey | None) -> Callable[[Metadata], None]:
    def seal(meta: Metadata) -> None:
        meta.groups = {k: Group(g.transform, _header_mac(keys.groups[k].key, k, meta)
                                if get_transform(g.transform).detects_wrong_key else None)
                       for k, g in meta.groups.items()}
        if signing_key is not None:
            meta.signature = sign(signing_key, meta.canonical())
    return seal


def _write_container(out_path: str | os.PathLike, source: _Source, plan: list[Planned], keys: ContentKeys, *,
                     license: License | None, shard: tuple[int, int] | None,
                     signing_key: Ed25519PrivateKey | None, progress: Progress | None) -> Metadata:
    used = {p.group for p in plan}
    meta = Metadata(content_id=keys.content_id.hex(),
                    groups={k: Group(g.transform, "" if get_transform(g.transform).detects_wrong_key else None)
                            for k, g in keys.groups.items() if k in used or not plan},
                    tensors={}, license=None if license is None else license.to_json(), shard=shard,
                    created_by=f"chiplock {chiplock.__version__}")
    with atomic_writer(out_path) as fh:
        writer = ContainerWriter(fh, meta, plan, signature_room=signing_key is not None)
        by_name = {p.name: p for p in plan}
        for i, (name, t) in enumerate(source.tensors()):
            p = by_name[name]
            tf = get_transform(keys.groups[p.group].transform)
            t = t.detach().cpu()
            if DTYPE_NAMES.get(t.dtype) != p.dtype or tuple(t.shape) != p.shape:
                raise ContainerError(f"tensor {name!r} changed while it was being read; nothing was written")
            key = subkey(keys.groups[p.group].key, f"tensor/{tf.name}", name)
            encode_to = getattr(tf, "encode_to", None)
            if encode_to is not None:  # Chunk by chunk to the file: the encoded tensor is never whole in memory.
                enc = encode_to(t, key, writer.sink(name))
                writer.added(name, enc.params, enc.digest)
            else:
                enc = tf.encode(t, key)
                writer.add(name, enc.data, enc.params, enc.digest)
            del t, enc
            if progress:
                progress("lock", i + 1, len(plan))
        return writer.finish(_sealer(keys, signing_key))


def lock(weights: Mapping[str, torch.Tensor] | str | os.PathLike, out_path: str | os.PathLike,
         profile: DeviceProfile | None = None, transform: str = "pre-aes", secret: bytes | None = None, *,
         config: LockConfig | None = None, kdf: KdfParams | None = None,
         signing_key: Ed25519PrivateKey | None = None, allow_weak_key: bool = False, force: bool = False,
         content_keys_path: str | os.PathLike | None = None, workers: int = 1,
         progress: Progress | None = None) -> dict[str, Any]:
    """Lock ``weights`` and write a container (or a folder of them) to ``out_path``.

    Each group of tensors (see :class:`~chiplock.config.LockConfig`) is encoded under its own random content key,
    one tensor at a time: memory holds the tensor in hand, not the model.

    * With ``profile`` (the single-file mode) the licence for that device goes inside the file.
    * Without it the content keys are written to ``content_keys_path`` (mode 0600; keep it as secret as the
      model) and :func:`chiplock.license.issue_license` / ``chiplock license issue`` makes one small licence per
      device, in microseconds each.

    Args:
        weights: A state dict; a ``.safetensors`` file (read one tensor at a time) or ``.pt``/``.bin`` state dict
            (loaded with ``weights_only=True``); or a Hugging Face folder of ``*.safetensors`` shards with
            ``model.safetensors.index.json`` (or that index file), which gives a folder of ``*.chiplock`` shards
            and ``model.chiplock.index.json`` sharing one set of content keys. The input is never modified.
        out_path: The container (or folder) to write; it gets its name only when complete
            (:func:`chiplock._io.atomic_writer`), so an interrupted lock leaves no partial output.
        profile: The device's :class:`~chiplock.DeviceProfile` (from :func:`chiplock.enroll`), or ``None``.
        transform: ``"pre-aes"`` (default), ``"aes"``, ``"shuffle"``: the transform of every tensor (shorthand for
            ``config=LockConfig(transform=...)``).
        secret: Optional vendor secret mixed into the device's licence (needed again to unlock).
        config: Per-group transforms and keys; overrides ``transform``.
        kdf: Argon2id parameters of the device key when ``profile`` carries none (default about 0.4 s, 64 MiB).
        signing_key: Optional Ed25519 private key; a device given the public key then refuses a tampered file.
        allow_weak_key: Lock even when the key rests on fewer than 64 estimated bits and no vendor secret, with
            a :class:`LowEntropyWarning`. Without it that is refused.
        force: Replace an existing ``out_path`` that is not a chiplock container.
        content_keys_path: Where to write the content keys when ``profile`` is ``None`` (required then).
        workers: Shards locked at once (folders only).
        progress: Optional ``progress(stage, done, total)`` callback.

    Returns:
        The public metadata, as :func:`inspect` returns it.

    Raises:
        UnsupportedConfig: Unknown transform, unsupported dtype or unfit tensor name.
        WeakKey: The key rests on too little entropy and there is no vendor secret (see ``allow_weak_key``).
        ContainerError: ``weights`` cannot be read.
        OutputError: ``out_path`` is the input, a folder, in a missing folder, or a file of another kind.

    Example:
        >>> profile = chiplock.enroll()  # doctest: +SKIP
        >>> chiplock.lock(model.state_dict(), "model.chiplock", profile, secret=vendor_secret)  # doctest: +SKIP
        >>> chiplock.lock("model.safetensors", "model.chiplock", content_keys_path="model.keys")  # doctest: +SKIP
    """
    if profile is not None and not isinstance(profile, DeviceProfile):
        raise TypeError("profile must be a DeviceProfile; get one with chiplock.enroll() or DeviceProfile.load()")
    if secret is not None and not isinstance(secret, bytes):
        raise TypeError("secret must be bytes, e.g. secret=b'...' or bytes.fromhex(...)")
    config = config or LockConfig(transform=transform)
    for tname in {config.transform, *(g.transform for g in config.groups)}:
        get_transform(tname)
    if profile is None:
        if content_keys_path is None:
            raise ValueError("without a profile the content keys must be kept: pass content_keys_path= (the "
                             "CLI writes OUT.keys), or pass profile= to embed a licence for one device")
        if secret is not None:
            raise ValueError("a vendor secret belongs to a device's licence: pass it when issuing licences")
    if content_keys_path is not None:
        check_keys_path(content_keys_path, out_path, weights, force=force)
    if profile is not None:
        check_key_strength(profile, secret, allow_weak_key, stacklevel=3)
    folder = _is_folder_source(weights)
    if folder:
        from chiplock.container.shards import check_output_dir, plan_source

        # The folder's index and the output folder are checked before any key work.
        weights = plan_source(weights)
        check_output_dir(weights.folder, out_path, force=force, plaintext=False)
    else:
        check_output(out_path, kind="container", force=force,
                     inputs=[weights] if isinstance(weights, (str, os.PathLike)) else [])
    # Only the groups some tensor joins get a key (and a wrap): an unused group must not make a licence mix kinds.
    source = None if folder else _source(weights)
    names = list(weights.weight_map) if folder else [n for n, _, _ in source.specs]
    transforms = {DEFAULT_GROUP: config.transform, **{g.label: g.transform for g in config.groups}}
    used = {config.assign(n)[0] for n in names} or {DEFAULT_GROUP}
    keys = ContentKeys.new({label: t for label, t in transforms.items() if label in used})
    lic = None
    if profile is not None:
        # The strength was checked (and warned about) above.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowEntropyWarning)
            lic = issue_license(keys, profile, secret=secret, allow_weak_key=True, kdf=kdf)
    if folder:
        from chiplock.container.shards import lock_dir

        def lock_one(src: Path, out: Path, index: int, count: int) -> dict[str, Any]:
            source = _source(src)
            # The metadata just written, not a second read of the shard.
            return _write_container(out, source, _plan(source, config), keys, license=lic, shard=(index, count),
                                    signing_key=signing_key, progress=None).public()

        lock_dir(weights, out_path, lock_one, force=force, workers=workers, progress=progress,
                 sign=None if signing_key is None else (lambda message: sign(signing_key, message)))
    else:
        _write_container(out_path, source, _plan(source, config), keys, license=lic, shard=None,
                         signing_key=signing_key, progress=progress)
    if content_keys_path is not None:
        keys.save(content_keys_path)
    return inspect(out_path)


def check_keys_path(keys_path: str | os.PathLike, out_path: str | os.PathLike, weights: object, *,
                     force: bool) -> None:
    """The content keys are the only way to issue licences for a model, and must never ship with it: refuse a
    keys path that is the output, inside the output or source folder, or an existing file (another model's keys
    are never replaced, even with ``force``)."""
    keys, out = Path(os.path.realpath(keys_path)), Path(os.path.realpath(out_path))
    src = Path(os.path.realpath(weights)) if isinstance(weights, (str, os.PathLike)) else None
    folders = [out] + ([src if src.is_dir() else src.parent] if src is not None and _is_folder_source(src) else [])
    if keys == out or (src is not None and keys == src) or any(f in keys.parents for f in folders):
        raise OutputError(f"the content keys path {str(keys_path)!r} is the output, the input or inside a model "
                          "folder, where the keys would be lost or shipped with the model; keep them apart "
                          "(e.g. OUT.keys next to the output)")
    check_output(keys_path, kind="file", inputs=[p for p in (weights, out_path) if isinstance(p, (str, os.PathLike))])
    if os.path.lexists(keys_path):
        try:
            ContentKeys.load(keys_path)
            holds_keys = True
        except ChiplockError:
            holds_keys = False
        if holds_keys:
            raise OutputError(f"{str(keys_path)!r} holds the content keys of another locked model (the only way to "
                              "issue licences for it); choose another path, or delete it yourself if that model "
                              "is gone")
        if not force:
            raise OutputError(f"{str(keys_path)!r} already exists; choose another path or pass force=True (--force) "
                              "to replace it")


# ----------------------------------------------------------------------------------------------------------------
# Unlock.

def _license_arg(license: License | str | os.PathLike | None) -> License | None:
    if license is None or isinstance(license, License):
        return license
    return License.load(license)


def _open_keys(cs: list[Container], *, profile: DeviceProfile | None, secret: bytes | None,
               license: License | None, verify_key: Any, max_kdf_memory_kib: int | None,
               groups: Iterable[str] | None) -> dict[str, bytes]:
    """Check the containers' public parts, open the licence once for all of them (one Argon2id run for a whole
    folder), and check each group's header MAC: the content key of every wanted group."""
    transforms: dict[str, str] = {}
    for c in cs:
        verify_signature(verify_key, c.meta.signature, c.meta.canonical(),
                         unsigned="the file is not signed but a vendor key was given; obtain a signed copy")
        for label, g in c.meta.groups.items():
            if transforms.setdefault(label, g.transform) != g.transform:
                raise ContainerError(f"the shards disagree on group {label!r}'s transform; re-download the folder")
    embedded = license is None
    if embedded:
        lic_json = cs[0].meta.license
        if lic_json is None:
            raise ProfileError("this file carries no licence; pass the device's licence (license=... / --license "
                               "FILE), issued with `chiplock license issue`")
        if any(c.meta.license != lic_json for c in cs):
            raise ContainerError("the shards carry different licences; re-download the folder")
        license = License.from_json(lic_json)
    if groups is None:
        wanted = list(transforms)
    else:
        if isinstance(groups, (str, bytes)) or not all(isinstance(g, str) for g in groups):
            raise TypeError("groups must be a list of group labels (or None for all), e.g. groups=['main']")
        wanted = list(dict.fromkeys(groups))
        unknown = [g for g in wanted if g not in transforms]
        if unknown:
            raise UnsupportedConfig(f"the file has no group(s) {', '.join(map(repr, unknown))}; it has "
                                    f"{', '.join(map(repr, transforms))}")
    keys = open_license(license, content_id=bytes.fromhex(cs[0].meta.content_id), transforms=transforms,
                        profile=profile, secret=secret, verify_key=None if embedded else verify_key,
                        max_kdf_memory_kib=max_kdf_memory_kib, groups=wanted)
    for c in cs:
        for label, g in c.meta.groups.items():
            # The right key (its wrap is authenticated), so the header's per-tensor parameters (nonces, shapes,
            # ...) can be authenticated too: a rewritten unsigned header must not decode to garbage silently.
            if label in keys and g.mac is not None and \
                    not hmac.compare_digest(g.mac, _header_mac(keys[label], label, c.meta)):
                raise InvalidTag() from None
    return keys


def _iter_container(c: Container, keys: Mapping[str, bytes],
                    progress: Progress | None) -> Iterator[tuple[str, torch.Tensor]]:
    todo = [e for e in c.entries if c.meta.tensors[e.name].group in keys]
    for i, entry in enumerate(todo):
        info = c.meta.tensors[entry.name]
        yield entry.name, _decode(c, entry, info, keys[info.group])
        if progress:
            progress("unlock", i + 1, len(todo))


def _decode(c: Container, entry: Any, info: TensorInfo, group_key: bytes) -> torch.Tensor:
    tf = get_transform(c.meta.groups[info.group].transform)
    dtype = DTYPE_BY_NAME.get(info.dtype)
    if dtype is None:
        raise UnsupportedConfig(f"tensor {entry.name!r} has dtype {info.dtype!r}, unknown to this chiplock; "
                                "upgrade chiplock")
    key = subkey(group_key, f"tensor/{tf.name}", entry.name)
    with c.stored(entry) as stored:
        # Transforms that verify while they decode (aes: GCM tags; pre-aes: leaf digests of a private copy) do it
        # in the same pass; the others decode a private copy verified as it was made, never the mapping itself
        # (the file could change between a check and a second read).
        if not tf.fused_digest:
            stored, root = copy_and_digest(stored)
            if root != info.digest:
                raise InvalidTag() from None
        leaves: list[bytes] = []
        fused = {"leaves": leaves} if tf.fused_digest else {}
        try:
            out = tf.decode(stored, dict(info.params), key, dtype, info.shape, **fused)
        except (KeyError, TypeError, ValueError):
            raise ContainerError(f"the public parameters of tensor {entry.name!r} are malformed; the file is "
                                 "damaged: obtain a fresh copy") from None
        if tf.fused_digest and tree_root(leaves) != info.digest:
            raise InvalidTag() from None
    return out


def decode_with_keys(path: str | os.PathLike, keys: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    """Decode every tensor of the groups in ``keys`` (label -> content key) with those keys (expert).

    Performs no key check: this is what an attacker who skips the licence (or guesses a content key) gets, and
    what the demo and the attack harness use to show wrong-key weights. Transforms that authenticate with the key
    (``aes``) decode without checking their tags; the others' stored bytes are still verified.
    """
    c = open_container(path)
    out = {}
    for e in c.entries:
        info = c.meta.tensors[e.name]
        if info.group not in keys:
            continue
        tf = get_transform(c.meta.groups[info.group].transform)
        unverified = getattr(tf, "decode_unverified", None)
        if unverified is None:
            out[e.name] = _decode(c, e, info, keys[info.group])
            continue
        with c.stored(e) as stored:
            out[e.name] = unverified(stored, dict(info.params), subkey(keys[info.group], f"tensor/{tf.name}", e.name),
                                     DTYPE_BY_NAME[info.dtype], info.shape)
    return out


def iter_unlock(path: str | os.PathLike, profile: DeviceProfile | None = None, secret: bytes | None = None, *,
                license: License | str | os.PathLike | None = None,
                verify_key: Ed25519PublicKey | bytes | None = None, max_kdf_memory_kib: int | None = None,
                device: torch.device | str | None = None, groups: Iterable[str] | None = None,
                progress: Progress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Unlock a container (or a folder of shards) one tensor at a time: ``(name, tensor)`` pairs in file order.

    Memory holds the tensor in hand (and what the caller keeps). Each tensor's stored bytes are verified before
    it is yielded; a file altered further on raises :class:`InvalidTag` when the iteration reaches it, after the
    earlier tensors were yielded (use :func:`unlock` for all-or-nothing). Arguments as :func:`unlock`.
    """
    cs = list(_containers(path, verify_key))
    keys = _open_keys(cs, profile=profile, secret=secret, license=_license_arg(license), verify_key=verify_key,
                      max_kdf_memory_kib=max_kdf_memory_kib, groups=groups)
    target = torch.device(device) if device is not None else None
    for c in cs:
        if target is None or target.type == "cpu":
            # Delegated, so no local of this frame keeps the last yielded tensor alive while the caller holds
            # the generator: memory is the tensor in hand, not two.
            yield from _iter_container(c, keys, progress)
        else:
            for name, t in _iter_container(c, keys, progress):
                yield name, _to_device(t, target)


def verify_folder(path: str | os.PathLike, verify_key: Ed25519PublicKey | bytes) -> None:
    """Check a locked folder's signed index against the vendor's key: the weight map and the digests of its side
    files (``config.json`` decides the architecture the weights load into). Each shard is signed on its own and
    checked when it is opened.

    Raises:
        InvalidTag: The index is unsigned or its signature does not verify.
        ContainerError: A side file was added, removed or changed, or the signature field is malformed.

    Example:
        >>> chiplock.api.verify_folder("locked/", vendor_public_key)  # doctest: +SKIP
    """
    from chiplock.container.schema import is_signature
    from chiplock.container.shards import check_manifest, locked_dir_shards

    def check(signature: Any, message: bytes) -> None:
        if signature is not None and not is_signature(signature):
            raise ContainerError("the locked folder's index signature is malformed; re-download the folder")
        verify_signature(verify_key, signature, message,
                         unsigned="the folder's index is not signed but a vendor key was given; obtain a signed copy")

    check_manifest(locked_dir_shards(path), check)


def _containers(path: str | os.PathLike, verify_key: Ed25519PublicKey | bytes | None = None) -> Iterator[Container]:
    if _is_folder_source(path):
        from chiplock.container.shards import locked_dir_shards

        if verify_key is not None:
            verify_folder(path, verify_key)
        locked = locked_dir_shards(path)
        content = None
        for i, shard in enumerate(locked.shards):
            c = open_container(shard)
            if content is not None and c.meta.content_id != content:
                raise ContainerError(f"shard {shard.name!r} belongs to another model than the other shards; "
                                     "re-download the folder")
            # The index is not signed, each shard's place is: a shard dropped from (or added to) the index, or
            # two shards swapped, is refused.
            if c.meta.shard != (i, len(locked.shards)):
                raise ContainerError(f"shard {shard.name!r} says it is part {_shard_text(c.meta.shard)} but the "
                                     f"folder's index lists it as part {i + 1} of {len(locked.shards)}; "
                                     "re-download the folder")
            content = c.meta.content_id
            yield c
    else:
        yield open_container(path)


def _shard_text(shard: tuple[int, int] | None) -> str:
    return "of no folder" if shard is None else f"{shard[0] + 1} of {shard[1]}"


def _to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None or device.type == "cpu":
        return t
    if device.type == "cuda":
        # A pinned staging copy lets the host-to-device transfer run at full PCIe speed.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def unlock(path: str | os.PathLike, profile: DeviceProfile | None = None, secret: bytes | None = None, *,
           license: License | str | os.PathLike | None = None, verify_key: Ed25519PublicKey | bytes | None = None,
           max_kdf_memory_kib: int | None = None, device: torch.device | str | None = None,
           groups: Iterable[str] | None = None, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Unlock a container (or a folder of shards) in memory and return its weights. Nothing is written to disk.

    Args:
        path: A container written by :func:`lock`, or a folder of shards with ``model.chiplock.index.json``.
        profile: Unlock as the device of this profile would. ``None`` (the normal case on a device) measures
            the device this runs on.
        secret: The vendor secret, if the licence was issued with one.
        license: The device's licence (a :class:`~chiplock.license.License` or its file) when the file carries
            none (content mode); default: the licence inside the file.
        verify_key: The vendor's Ed25519 public key; the file (and a separate licence) must then carry a valid
            signature by it.
        max_kdf_memory_kib: The most Argon2id memory (KiB) a licence may ask of this device; default
            ``$CHIPLOCK_MAX_KDF_MEMORY_KIB`` or 1 GiB.
        device: Put each tensor there as it is unlocked (``"cuda"``: through pinned memory).
        groups: Unlock only these groups (key labels); default all.
        progress: Optional ``progress(stage, done, total)`` callback.

    Returns:
        A dict of tensor name -> tensor, in file order.

    Raises:
        ContainerError: Not a chiplock file, truncated, or an unsupported version.
        InvalidTag: The stored bytes or header were altered, or the signature does not verify.
        InvalidKey: ``aes``/``shuffle`` groups only: this device (or secret) is not the licence's. ``pre-aes``
            never raises it: a wrong device gets plausible but useless weights.
        FingerprintError: A fingerprint source cannot measure this device.
        ProfileError: No licence, the profile lacks a source the licence needs, or the vendor secret is missing.

    Example:
        >>> weights = chiplock.unlock("model.chiplock")  # doctest: +SKIP
        >>> weights = chiplock.unlock("model.chiplock", license="device.lic")  # doctest: +SKIP
    """
    return dict(iter_unlock(path, profile, secret, license=license, verify_key=verify_key,
                            max_kdf_memory_kib=max_kdf_memory_kib, device=device, groups=groups, progress=progress))


def unlock_to_file(path: str | os.PathLike, out: str | os.PathLike, profile: DeviceProfile | None = None,
                   secret: bytes | None = None, *, license: License | str | os.PathLike | None = None,
                   verify_key: Ed25519PublicKey | bytes | None = None, max_kdf_memory_kib: int | None = None,
                   groups: Iterable[str] | None = None, force: bool = False,
                   progress: Progress | None = None) -> None:
    """Unlock ``path`` and write plaintext safetensors to ``out``, streaming: one tensor in memory at a time.

    A file gives one ``.safetensors`` file (mode 0600); a folder of shards gives a folder of ``X.safetensors``
    shards with ``model.safetensors.index.json`` and the side files (mode 0700). ``out`` appears only when
    complete and every byte verified: a tampered tensor anywhere leaves nothing behind.

    Args:
        path, profile, secret, license, verify_key, max_kdf_memory_kib, groups, progress: As :func:`unlock`.
        out: Where to write. Checked before any key work.
        force: Let ``out`` replace a file (or non-empty folder) that is not a safetensors model; a chiplock
            container or locked folder is never replaced.

    Raises:
        OutputError: ``out`` is the input, a container, or another kind of file (without ``force``). And as
            :func:`unlock`.

    Example:
        >>> chiplock.unlock_to_file("locked/", "plain/", license="device.lic")  # doctest: +SKIP
    """
    opts = dict(license=_license_arg(license), verify_key=verify_key, max_kdf_memory_kib=max_kdf_memory_kib,
                groups=groups)
    wanted = opts["groups"]

    def entries(c: Container) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(e.name, DTYPE_BY_NAME[c.meta.tensors[e.name].dtype], e.shape) for e in c.entries
                if wanted is None or c.meta.tensors[e.name].group in wanted]

    if not _is_folder_source(path):
        check_output(out, kind="weights", force=force, inputs=[path])
        c = open_container(path)
        keys = _open_keys([c], profile=profile, secret=secret, **opts)
        with atomic_writer(out, mode=0o600) as fh:
            write_safetensors(fh, entries(c), _iter_container(c, keys, progress))
        return
    from chiplock.container.shards import check_output_dir, locked_dir_shards, unlock_dir

    locked = locked_dir_shards(path)
    check_output_dir(locked.folder, out, force=force, plaintext=True)  # Before any key work.
    cs = list(_containers(path, verify_key))
    # The containers whose licence and MACs are checked here are the ones decoded, not a second read of the files.
    opened = {os.path.realpath(c.path): c for c in cs}
    keys = _open_keys(cs, profile=profile, secret=secret, **opts)
    if wanted is not None:
        names = {n for c in cs for n, t in c.meta.tensors.items() if t.group in keys}
        locked = replace(locked, weight_map={t: f for t, f in locked.weight_map.items() if t in names})

    def container(shard: Path) -> Container:
        c = opened.get(os.path.realpath(shard))
        if c is None:
            raise ContainerError(f"shard {shard.name!r} is not in the folder's index; re-download the folder")
        return c

    unlock_dir(locked, out, lambda shard: _iter_container(container(shard), keys, progress),
               lambda shard: entries(container(shard)), force=force)


def load_state_dict(model: torch.nn.Module, path: str | os.PathLike, profile: DeviceProfile | None = None,
                    secret: bytes | None = None, *, strict: bool = True, device: torch.device | str | None = None,
                    **kw: Any) -> tuple[list[str], list[str]]:
    """Unlock ``path`` straight into ``model``'s parameters and buffers, one tensor at a time.

    Parameters on the ``meta`` device (a model built without memory) are replaced by the unlocked tensors;
    others are copied into in place (keeping their device and dtype). ``device`` moves each tensor there first.
    Loading is not transactional: if a later tensor fails (altered file), the earlier ones are already in the
    model; discard it (or use :func:`unlock`, all or nothing, when memory allows).

    Returns:
        ``(missing, unexpected)`` tensor names, as :meth:`torch.nn.Module.load_state_dict` reports them.

    Raises:
        ContainerError: ``strict`` and names differ, or a shape differs (always). And as :func:`unlock`.

    Example:
        >>> chiplock.load_state_dict(model, "model.chiplock", device="cuda")  # doctest: +SKIP
    """
    slots: dict[str, tuple[torch.nn.Module, str, bool]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(prefix + pname, (mod, pname, True))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                slots.setdefault(prefix + bname, (mod, bname, False))
    seen, unexpected = set(), []
    for name, t in iter_unlock(path, profile, secret, device=device, **kw):
        slot = slots.get(name)
        if slot is None:
            unexpected.append(name)
            continue
        mod, attr, is_param = slot
        cur = getattr(mod, attr)
        if tuple(cur.shape) != tuple(t.shape):
            raise ContainerError(f"tensor {name!r} has shape {tuple(t.shape)} in the file but {tuple(cur.shape)} in "
                                 "the model; build the model with the file's configuration")
        with torch.no_grad():
            if cur.is_meta:
                new = t.to(cur.dtype) if cur.dtype != t.dtype else t
                setattr(mod, attr, torch.nn.Parameter(new, requires_grad=cur.requires_grad) if is_param else new)
            else:
                cur.copy_(t)
        seen.add(name)
        del t
    missing = [n for n in slots if n not in seen]
    if strict and (missing or unexpected):
        raise ContainerError(f"the file and the model disagree: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                             "pass strict=False to load what matches")
    return missing, unexpected


# ----------------------------------------------------------------------------------------------------------------
# Inspect.

def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Public metadata of a container (or a folder of shards): transforms, groups, licence, tensors.

    Reads only headers; needs no key and measures nothing.

    Raises:
        ContainerError: Not a chiplock file, truncated, or an unsupported version.
    """
    if _is_folder_source(path):
        from chiplock.container.shards import locked_dir_shards

        locked = locked_dir_shards(path)
        parts = [inspect(s) for s in locked.shards]
        out = dict(parts[0])
        out["tensors"] = {n: t for p in parts for n, t in p["tensors"].items()}
        groups = {k: g["transform"] for p in parts for k, g in p["groups"].items()}
        out["groups"] = {k: {"transform": t, "tensors": sum(p["groups"].get(k, {}).get("tensors", 0) for p in parts)}
                         for k, t in groups.items()}
        transforms = sorted(set(groups.values()))
        out["transform"] = transforms[0] if len(transforms) == 1 else transforms
        out["total_bytes"] = sum(p["total_bytes"] for p in parts)
        out["shards"] = [s.name for s in locked.shards]
        out["shard"] = None
        return out
    c = open_container(path)
    out = c.meta.public()
    out["total_bytes"] = c.size
    return out


__all__ = ["LowEntropyWarning", "check_keys_path", "decode_with_keys", "inspect", "iter_unlock", "load_state_dict", "load_weights",
           "lock", "unlock", "unlock_to_file", "verify_folder"]
