"""The safe verbs: lock, unlock, inspect."""

from __future__ import annotations

import hmac
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import chiplock
from chiplock._io import atomic_writer, check_output
from chiplock.container.format import (FORMAT_NAME, FORMAT_VERSION, build_header, canonical,
                                       header_digest, map_tensors, read_header, tensor_name_problem, tree_digest,
                                       tree_root)
from chiplock.errors import ContainerError, InvalidKey, InvalidTag, ProfileError, UnsupportedConfig, WeakKey
from chiplock.fingerprint import get_source
from chiplock.keys.combine import MIN_ENTROPY_BITS, key_strength
from chiplock.keys.kdf import ARGON2_MAX_MEMORY_KIB, KdfParams, MasterKDF, assemble_material, subkey
from chiplock.profile import DeviceProfile
from chiplock.transforms import DTYPE_BY_NAME, DTYPE_NAMES, get_transform

Progress = Callable[[str, int, int], None]
_CHECK_LABEL = b"chiplock key check v1"
_HEADER_LABEL = b"chiplock header mac v1\0"
#: A vendor secret shorter than this does not count as one (it could be guessed alongside the fingerprint).
MIN_SECRET_BYTES = 16


class LowEntropyWarning(UserWarning):
    """The key rests on fewer than 64 estimated bits (or an unknown amount) and no vendor secret."""


def load_weights(weights: Mapping[str, torch.Tensor] | str | os.PathLike, *,
                 transform: str | None = None) -> dict[str, torch.Tensor]:
    """Read a mapping of name -> tensor from a mapping, ``.safetensors``, or ``.pt``/``.bin`` state dict.

    Every name and tensor is checked here, before anything is written: a name must be fit for a container
    (see :func:`chiplock.container.format.tensor_name_problem`), a tensor dense and of a supported dtype, and
    with ``transform`` (a transform name) of a dtype that transform can store.

    Raises:
        ContainerError: The file is missing or unreadable.
        UnsupportedConfig: The content is not a flat mapping of names to tensors of a supported dtype, a name
            is unfit (empty, ``__metadata__``, NUL, lone surrogate, too long), or ``transform`` cannot take a
            tensor's dtype.
    """
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise ContainerError(f"weights file {str(path)!r} not found; check the path")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                weights = load_file(str(path))
            elif path.suffix in (".pt", ".pth", ".bin"):
                weights = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise UnsupportedConfig(f"unknown weights format {path.suffix!r}; use .safetensors, .pt or .bin")
        except UnsupportedConfig:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure of the user's file becomes one clear error.
            raise ContainerError(f"could not read weights from {str(path)!r} ({type(exc).__name__}); "
                                 "pass a safetensors file or a torch state dict saved with torch.save") from None
    if not isinstance(weights, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise UnsupportedConfig("weights must be a mapping of str -> torch.Tensor (a state dict); "
                                "for a model pass model.state_dict()")
    tf = get_transform(transform) if transform is not None else None
    for name, t in weights.items():
        problem = tensor_name_problem(name)
        if problem:
            raise UnsupportedConfig(f"tensor name {ascii(name)[:80]} {problem}; rename the tensor in the state dict "
                                    "before locking (and in the model that loads it)")
        if t.layout != torch.strided or t.is_meta:
            raise UnsupportedConfig(f"tensor {name!r} is not a dense tensor in memory ({t.layout}, device "
                                    f"{t.device}); convert it with .to_dense() / load its data before locking")
        if t.dtype not in DTYPE_NAMES:
            raise UnsupportedConfig(f"tensor {name!r} has unsupported dtype {t.dtype}; convert it to one of "
                                    f"{', '.join(sorted(DTYPE_NAMES.values()))}")
        if tf is not None:
            try:
                tf.stored_dtype(DTYPE_NAMES[t.dtype])
            except UnsupportedConfig as exc:
                raise UnsupportedConfig(f"tensor {name!r}: {exc}") from None
    return dict(weights)


def _master_key(materials: dict[str, bytes], secret: bytes | None, kdf: KdfParams) -> bytes:
    return MasterKDF(params=kdf).derive(assemble_material(materials, secret))


def _key_check(master: bytes) -> str:
    return hmac.new(subkey(master, "check"), _CHECK_LABEL, "sha256").hexdigest()[:32]


def _header_mac(master: bytes, meta: dict[str, Any]) -> str:
    """HMAC-SHA256 of the canonical metadata under a key only the right device derives.

    Only transforms that already store a key check get it (aes, shuffle): for them a keyed check reveals nothing
    new. pre-aes must not have one (it would be a key oracle); its header is protected by signatures only.
    """
    return hmac.new(subkey(master, "header"), _HEADER_LABEL + canonical(meta), "sha256").hexdigest()


def _check_key_strength(profile: DeviceProfile, secret: bytes | None, allow_weak_key: bool) -> None:
    # A key below the policy is refused: with the structural tests, a fingerprint of a few bits is cracked by
    # enumerating configurations at Argon2id's cost each. The override still warns, with the figure.
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        # An empty or one-byte secret (an unset shell variable written to a file) is no secret: it must not
        # stand in for the entropy the fingerprint lacks.
        if not allow_weak_key:
            raise WeakKey(f"refusing to lock: the vendor secret has {len(secret)} bytes (< {MIN_SECRET_BYTES}); use "
                          f"at least {MIN_SECRET_BYTES} random bytes (e.g. `head -c 32 /dev/urandom > vendor.key`), "
                          "or pass allow_weak_key=True (--allow-weak-key)")
        warnings.warn(f"allow_weak_key=True: the vendor secret has only {len(secret)} bytes", LowEntropyWarning,
                      stacklevel=3)
        secret = None
    strength = key_strength(profile.enrollments, secret=secret, minimum=MIN_ENTROPY_BITS)
    if strength.sufficient:
        return
    if not allow_weak_key:
        raise WeakKey(f"refusing to lock: {strength.message()}; or pass allow_weak_key=True (--allow-weak-key) "
                      "if a key that an attacker can enumerate is acceptable")
    warnings.warn(f"allow_weak_key=True: locking with a weak key: {strength.message()}", LowEntropyWarning,
                  stacklevel=3)


def lock(weights: Mapping[str, torch.Tensor] | str | os.PathLike, out_path: str | os.PathLike,
         profile: DeviceProfile, transform: str = "pre-aes", secret: bytes | None = None, *,
         kdf: KdfParams | None = None, signing_key: Ed25519PrivateKey | None = None,
         allow_weak_key: bool = False, force: bool = False,
         progress: Progress | None = None) -> dict[str, Any]:
    """Lock ``weights`` to the device described by ``profile`` and write a container to ``out_path``.

    Args:
        weights: A state dict, or a path to ``.safetensors`` / ``.pt`` / ``.bin`` (loaded with
            ``weights_only=True``). The input is never modified.
        out_path: Where to write the container; it gets its name only when complete (see
            :func:`chiplock._io.atomic_writer`), so an interrupted lock leaves no partial output and an existing
            file is replaced only by a complete one.
        profile: The device's :class:`~chiplock.DeviceProfile` (from :func:`chiplock.enroll`).
        transform: ``"pre-aes"`` (default), ``"aes"`` or ``"shuffle"``.
        secret: Optional vendor secret mixed into the key (needed again to unlock).
        kdf: Argon2id parameters; default about 0.4 s and 64 MiB per derivation.
        signing_key: Optional Ed25519 private key; the device can then refuse a tampered file.
        allow_weak_key: Lock even when the key rests on fewer than 64 estimated bits (or an unknown amount) and
            no vendor secret, with a :class:`LowEntropyWarning` naming the figure. Without it that is refused.
        force: Replace an existing ``out_path`` that is not a chiplock container (a plaintext model, say).
            Without it that is refused, as is an ``out_path`` that is the input file.
        progress: Optional ``progress(stage, done, total)`` callback.

    Returns:
        The container's public metadata, as :func:`inspect` returns it.

    Raises:
        UnsupportedConfig: Unknown transform or unsupported dtype.
        WeakKey: The key rests on fewer than 64 estimated bits (or an unknown amount; ``precision`` alone has
            about 12.5) and there is no vendor secret; pass ``secret=``, add a unit-binding source or
            ``allow_weak_key=True``.
        ContainerError: ``weights`` is a path that cannot be read.
        OutputError: ``out_path`` is the input, a folder, in a missing folder, or a file of another kind
            (without ``force``); or it cannot be written.

    Example:
        >>> profile = chiplock.enroll()  # doctest: +SKIP
        >>> chiplock.lock(model.state_dict(), "model.chiplock", profile, secret=vendor_secret)  # doctest: +SKIP
    """
    if not isinstance(profile, DeviceProfile):
        raise TypeError("profile must be a DeviceProfile; get one with chiplock.enroll() or DeviceProfile.load()")
    if secret is not None and not isinstance(secret, bytes):
        raise TypeError("secret must be bytes, e.g. secret=b'...' or bytes.fromhex(...)")
    tf = get_transform(transform)
    _check_key_strength(profile, secret, allow_weak_key)
    # Refuse an output that would destroy the input or a plaintext model before any expensive work.
    check_output(out_path, kind="container", force=force,
                 inputs=[weights] if isinstance(weights, (str, os.PathLike)) else [])
    tensors = load_weights(weights, transform=tf.name)
    kdf = kdf or KdfParams()
    master = _master_key(profile.materials(), secret, kdf)
    meta: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "transform": tf.name,
        "created_by": f"chiplock {chiplock.__version__}", "kdf": kdf.to_json(),
        "sources": [{"source": e.source, "helper": e.helper} for e in profile.enrollments],
        "secret": secret is not None,
        "key_check": _key_check(master) if tf.detects_wrong_key else None,
        "tensors": {},
    }
    entries, blobs = [], []
    for i, (name, t) in enumerate(tensors.items()):
        enc = tf.encode(t.detach().cpu(), subkey(master, f"tensor/{tf.name}", name))
        stored_dtype = enc.stored_dtype or DTYPE_NAMES[t.dtype]
        data = enc.data.reshape(-1).view(np.uint8)
        meta["tensors"][name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "params": enc.params,
                                 "digest": tree_digest(data)}
        entries.append((name, stored_dtype, tuple(t.shape), data.nbytes))
        blobs.append(data)
        if progress:
            progress("lock", i + 1, len(tensors))
    if tf.detects_wrong_key:
        meta["header_mac"] = _header_mac(master, meta)
    meta["header_digest"] = header_digest(meta)
    if signing_key is not None:
        pub = signing_key.public_key().public_bytes_raw()
        meta["signature"] = {"alg": "ed25519", "public_key": pub.hex(),
                             "sig": signing_key.sign(canonical(meta)).hex()}
    with atomic_writer(out_path) as fh:
        fh.write(build_header(meta, entries))
        for data in blobs:
            fh.write(memoryview(data))
    return inspect(out_path)


def _verify_signature(meta: dict[str, Any], verify_key: Ed25519PublicKey | bytes | None) -> None:
    sig = meta.get("signature")
    if verify_key is None:
        return
    if isinstance(verify_key, bytes):
        verify_key = Ed25519PublicKey.from_public_bytes(verify_key)
    if not sig or sig.get("alg") != "ed25519":
        raise InvalidTag("the file is not signed but a vendor key was given; obtain a signed copy") from None
    try:
        verify_key.verify(bytes.fromhex(sig["sig"]), canonical(meta))
    except (InvalidSignature, ValueError, TypeError):
        raise InvalidTag() from None


def _device_materials(meta: dict[str, Any], profile: DeviceProfile | None) -> dict[str, bytes]:
    needed = [s["source"] for s in meta["sources"]]
    if profile is not None:
        have = profile.materials()
        missing = [n for n in needed if n not in have]
        if missing:
            raise ProfileError(f"the device profile lacks source(s) {', '.join(missing)} that this file needs; "
                               f"enroll the device with --source {' --source '.join(needed)}")
        return {n: have[n] for n in needed}
    out = {}
    for s in meta["sources"]:
        try:
            out[s["source"]] = get_source(s["source"]).reproduce(s["helper"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, SystemError,
                MemoryError):
            # The helper is public and unauthenticated (unless signed): a source that trips over a crafted one
            # must give one clear error, not a traceback. Each source also bounds what a helper may ask.
            raise ContainerError(f"the file's public helper data for fingerprint source {s['source']!r} is "
                                 "malformed; the file is damaged: obtain a fresh copy") from None
    return out


def unlock(path: str | os.PathLike, profile: DeviceProfile | None = None, secret: bytes | None = None, *,
           verify_key: Ed25519PublicKey | bytes | None = None, max_kdf_memory_kib: int | None = None,
           progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Unlock a container in memory and return its weights. Nothing is written to disk.

    Args:
        path: A container written by :func:`lock`.
        profile: Unlock as the device of this profile would. ``None`` (the normal case on a device) measures
            the device this runs on.
        secret: The vendor secret, if the file was locked with one.
        verify_key: The vendor's Ed25519 public key; the file must then carry a valid signature by it.
        max_kdf_memory_kib: The most Argon2id memory (KiB) the file may ask of this device; default
            ``$CHIPLOCK_MAX_KDF_MEMORY_KIB`` or 1 GiB. A file asking more is refused before any key work.
        progress: Optional ``progress(stage, done, total)`` callback.

    Returns:
        A dict of tensor name -> tensor, in the order they were locked.

    Raises:
        ContainerError: Not a chiplock file, truncated, or an unsupported version.
        InvalidTag: The stored bytes or header were altered, or the signature does not verify.
        InvalidKey: ``aes``/``shuffle`` only: this device (or secret) is not the one the file was locked for.
            ``pre-aes`` never raises it: a wrong device gets plausible but useless weights.
        FingerprintError: A fingerprint source cannot measure this device.
        ProfileError: The profile lacks a source the file needs, or the vendor secret is missing.

    Example:
        >>> weights = chiplock.unlock("model.chiplock")  # doctest: +SKIP
        >>> model.load_state_dict(weights)  # doctest: +SKIP
    """
    meta, stored = map_tensors(path, max_kdf_memory_kib=max_kdf_memory_kib)
    _verify_signature(meta, verify_key)
    if meta.get("secret") and secret is None:
        raise ProfileError("this file was locked with a vendor secret; pass it (secret=... / --secret-file)")
    if not meta.get("secret") and secret is not None:
        raise ProfileError("this file was locked without a vendor secret; do not pass one")
    tf = get_transform(meta["transform"])
    # Transforms that hash while they decode (aes) are verified tensor by tensor below, in the same pass;
    # the others are verified here, before any key work.
    if not tf.fused_digest:
        for i, st in enumerate(stored):
            if tree_digest(st.data) != meta["tensors"][st.name]["digest"]:
                raise InvalidTag() from None
            if progress:
                progress("verify", i + 1, len(stored))
    master = derive_file_key(meta, profile, secret, max_kdf_memory_kib=max_kdf_memory_kib)
    if tf.detects_wrong_key:
        if not hmac.compare_digest(str(meta.get("key_check")).encode(), _key_check(master).encode()):
            raise InvalidKey("this file was locked for another device (or another vendor secret); it cannot be "
                             "unlocked here: ask the vendor for a file locked to this device")
        # The right key, so the header's per-tensor parameters (nonces, shapes, ...) can be authenticated: a
        # rewritten unsigned header (new nonce + recomputed header digest) must not decode to garbage silently.
        if not hmac.compare_digest(str(meta.get("header_mac")).encode(), _header_mac(master, meta).encode()):
            raise InvalidTag() from None
    return decode_tensors(meta, stored, master, progress=progress)


def derive_file_key(meta: dict[str, Any], profile: DeviceProfile | None, secret: bytes | None, *,
                    max_kdf_memory_kib: int | None = None) -> bytes:
    """The master key a device (``profile``, or this machine when ``None``) derives for a container (expert)."""
    kdf = KdfParams.from_json(meta["kdf"], max_memory_kib=max_kdf_memory_kib)
    return _master_key(_device_materials(meta, profile), secret, kdf)


def decode_tensors(meta: dict[str, Any], stored: list, master: bytes, *,
                   progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Undo the transform of every mapped tensor with ``master`` (expert; performs no key check).

    Transforms that hash while they decode (aes) verify each tensor's digest here.
    """
    tf = get_transform(meta["transform"])
    out: dict[str, torch.Tensor] = {}
    for i, st in enumerate(stored):
        info = meta["tensors"][st.name]
        dtype = DTYPE_BY_NAME.get(info["dtype"])
        if dtype is None:
            raise UnsupportedConfig(f"tensor {st.name!r} has dtype {info['dtype']!r}, unknown to this chiplock; "
                                    "upgrade chiplock")
        key = subkey(master, f"tensor/{tf.name}", st.name)
        leaves: list[bytes] = []
        fused = {"leaves": leaves} if tf.fused_digest else {}
        try:
            out[st.name] = tf.decode(st.data, info["params"], key, dtype, tuple(info["shape"]), **fused)
        except (KeyError, TypeError, ValueError):
            raise ContainerError(f"the public parameters of tensor {st.name!r} are malformed; the file is "
                                 "damaged: obtain a fresh copy") from None
        if tf.fused_digest and tree_root(leaves) != info["digest"]:
            raise InvalidTag() from None
        if progress:
            progress("unlock", i + 1, len(stored))
    return out


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Public metadata of a container: format, transform, sources, KDF, tensors' names, dtypes and shapes.

    Reads only the header; needs no key and measures nothing.

    Raises:
        ContainerError: Not a chiplock file, truncated, or an unsupported version.
    """
    # inspect does no key work, so it shows a file whatever KDF cost it asks (unlock refuses one over the cap).
    meta, _, _ = read_header(path, max_kdf_memory_kib=ARGON2_MAX_MEMORY_KIB)
    return {
        "format": meta["format"], "version": meta["version"], "transform": meta["transform"],
        "created_by": meta.get("created_by"),
        "sources": [s["source"] for s in meta["sources"]],
        "helpers": {s["source"]: s["helper"] for s in meta["sources"]},
        "secret_required": bool(meta.get("secret")),
        "kdf": {k: v for k, v in meta["kdf"].items() if k != "salt"},
        "signed": bool(meta.get("signature")),
        "signer_public_key": (meta.get("signature") or {}).get("public_key"),
        "tensors": {n: {"dtype": t["dtype"], "shape": t["shape"]} for n, t in meta["tensors"].items()},
        "total_bytes": os.path.getsize(path),
        "wrong_key": _WRONG_KEY_NOTE["detected" if get_transform(meta["transform"]).detects_wrong_key
                                     else "silent"],
    }


#: What a wrong key does with each kind of transform, stated where users look (inspect, the CLI).
_WRONG_KEY_NOTE = {
    "detected": "a wrong device or secret is refused (key check); the header is authenticated with the file key",
    "silent": ("a wrong device gets plausible but useless weights and the file has no key check; but structural "
               "statistics of the weights tell wrong-key weights from real ones in milliseconds (docs/attacks.md), "
               "so a key guess costs one Argon2id run and the lock is as strong as the key's entropy"),
}
