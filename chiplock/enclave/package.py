"""A partitioned model as one container: the host opens its part, only the executor's licence opens the rest.

A :class:`~chiplock.enclave.partition.Partition` becomes one chiplock container with two groups:

* ``main`` (the host's transform, ``pre-aes`` by default): the public tensors plus ``partition.host``, the
  partition's public spec as a uint8 tensor (JSON);
* ``enclave`` (``aes``: a wrong key is refused, not silently decoded): the secure tensors plus
  ``partition.enclave``, the same spec. The executor runs from its own, authenticated copy, so a host that rewrites
  its spec cannot make the executor run another program with the secure weights.

The vendor issues two licences per device (:func:`issue`): the host's opens only ``main``, the executor's only
``enclave``, each bound to its own device profile and (optionally) its own vendor secret. The executor's profile
can be the TPM source enrolled with a PCR policy (``chiplock enroll --sources tpm`` with ``pcrs=``), so its key is
a secret sealed to the TPM and the boot state; the host never sees the executor's key or its secret.
The tensor names and shapes of both parts are public (the container header), as the architecture is in every
partitioning scheme this implements.

Example:
    >>> p = split(model, "teeslice")                                          # doctest: +SKIP
    >>> package(p, "model.chiplock", content_keys_path="model.keys")          # doctest: +SKIP
    >>> host_lic, enclave_lic = issue(ContentKeys.load("model.keys"), host_profile=h, enclave_profile=e)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from chiplock import _json
from chiplock.api import iter_unlock, lock
from chiplock.config import DEFAULT_GROUP, GroupConfig, LockConfig
from chiplock.errors import EnclaveError, UnsupportedConfig
from chiplock.keys.kdf import KdfParams
from chiplock.license import ContentKeys, License, LowEntropyWarning, issue_license
from chiplock.profile import DeviceProfile

__all__ = ["ENCLAVE_GROUP", "ENCLAVE_SPEC", "HOST_GROUP", "HOST_SPEC", "MAX_SPEC_BYTES", "decode_spec",
           "encode_spec", "issue", "iter_secure", "load_host", "load_secure", "package"]

#: The group of the host's (public) part and the tensor holding its copy of the spec.
HOST_GROUP, HOST_SPEC = DEFAULT_GROUP, "partition.host"
#: The group only the executor's licence opens, and the tensor holding the executor's copy of the spec.
ENCLAVE_GROUP, ENCLAVE_SPEC = "enclave", "partition.enclave"
#: The enclave group's transform: authenticated, so a wrong executor key fails loudly instead of running garbage.
ENCLAVE_TRANSFORM = "aes"
#: The largest spec accepted (a spec lists ops and shapes, never weights).
MAX_SPEC_BYTES = 1 << 20
_SPEC_LIMITS = _json.Limits(max_bytes=MAX_SPEC_BYTES, max_depth=16, max_containers=50_000, max_items=200_000)


def encode_spec(spec: dict[str, Any]) -> torch.Tensor:
    """The spec as a uint8 tensor of its canonical JSON (what the container stores)."""
    try:
        raw = _json.canonical(spec)
    except (TypeError, ValueError) as e:
        raise UnsupportedConfig(f"the partition spec is not plain JSON ({e}); a spec holds names, shapes and "
                                "numbers only") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise UnsupportedConfig(f"the partition spec is {len(raw):,} bytes, over the {MAX_SPEC_BYTES:,}-byte cap; "
                                "a spec lists ops and shapes, never weights")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode_spec(t: torch.Tensor, *, what: str = "the partition spec") -> dict[str, Any]:
    """Parse a spec tensor (bounded JSON); EnclaveError if it is not one."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise EnclaveError(f"{what} is not a uint8 vector; the file was not written by chiplock.enclave.package")
    try:
        spec = _json.loads(t.numpy().tobytes(), _SPEC_LIMITS)
    except _json.JSONLimitError as e:
        raise EnclaveError(f"{what} {e}; obtain an intact copy of the model") from None
    if not isinstance(spec, dict):
        raise EnclaveError(f"{what} is not a JSON object; obtain an intact copy of the model")
    return spec


def _pattern(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def package(partition: Any, out_path: str | os.PathLike, *, content_keys_path: str | os.PathLike,
            host_transform: str = "pre-aes", force: bool = False,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Lock a partition into one container: group ``main`` for the host, ``enclave`` for the executor.

    Args:
        partition: A :class:`~chiplock.enclave.partition.Partition` (``spec``, ``public``, ``secure``).
        out_path: The container to write (atomically; an existing container is replaced only with ``force``).
        content_keys_path: Where the content keys go (mode 0600); :func:`issue` makes licences from them.
        host_transform: The host part's transform (``pre-aes``, ``aes`` or ``shuffle``).
        force: Replace an existing file that is not a chiplock container.
        progress: Optional ``progress(stage, done, total)``.

    Returns:
        The container's public metadata (:func:`chiplock.inspect`).

    Raises:
        UnsupportedConfig: A tensor name used by both parts, or one of the reserved spec names.
        OutputError, WeakKey, ...: As :func:`chiplock.lock`.
    """
    spec, public, secure = partition.spec, dict(partition.public), dict(partition.secure)
    reserved = {HOST_SPEC, ENCLAVE_SPEC}
    clash = sorted((set(public) & set(secure)) | ((set(public) | set(secure)) & reserved))
    if clash:
        raise UnsupportedConfig(f"tensor name(s) {', '.join(map(repr, clash[:5]))} appear in both parts or are "
                                "reserved; rename them in the partition")
    spec_t = encode_spec(spec)
    weights = {**public, HOST_SPEC: spec_t}
    groups: tuple[GroupConfig, ...] = ()
    if secure:
        weights.update(secure)
        weights[ENCLAVE_SPEC] = spec_t.clone()
        groups = (GroupConfig(ENCLAVE_GROUP, ENCLAVE_TRANSFORM,
                              patterns=tuple(_pattern(n) for n in (*secure, ENCLAVE_SPEC))),)
    return lock(weights, out_path, config=LockConfig(transform=host_transform, groups=groups),
                content_keys_path=content_keys_path, force=force, progress=progress)


def issue(keys: ContentKeys, *, host_profile: DeviceProfile | None, enclave_profile: DeviceProfile | None,
          host_secret: bytes | None = None, enclave_secret: bytes | None = None, kdf: KdfParams | None = None,
          allow_weak_key: bool = False) -> tuple[License | None, License | None]:
    """The two licences of one device: the host's (group ``main``) and the executor's (group ``enclave``).

    Either profile may be ``None`` to skip that licence (e.g. re-issuing only the executor's). Arguments as
    :func:`chiplock.license.issue_license`; the executor's profile and secret should be ones the host cannot
    read (a TPM source sealed with a PCR policy, a secret file owned by the executor's user).

    Raises:
        UnsupportedConfig: The keys hold no ``enclave`` group but an executor licence was asked for.
        WeakKey: A profile rests on fewer than 64 estimated bits and has no secret (unless ``allow_weak_key``).
    """
    host = enclave = None
    with warnings.catch_warnings():
        if allow_weak_key:
            warnings.simplefilter("ignore", LowEntropyWarning)
        if host_profile is not None:
            host = issue_license(keys, host_profile, secret=host_secret, groups=[HOST_GROUP], kdf=kdf,
                                 allow_weak_key=allow_weak_key)
        if enclave_profile is not None:
            if ENCLAVE_GROUP not in keys.groups:
                raise UnsupportedConfig("this model has no secure part (all-out partition): there is no executor "
                                        "licence to issue")
            enclave = issue_license(keys, enclave_profile, secret=enclave_secret, groups=[ENCLAVE_GROUP], kdf=kdf,
                                    allow_weak_key=allow_weak_key)
    return host, enclave


def load_host(path: str | os.PathLike, license: License | str | os.PathLike, *, profile: DeviceProfile | None = None,
              secret: bytes | None = None, verify_key: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Open the host's part: ``(spec, public tensors)``. Measures this device unless ``profile`` is given.

    Raises:
        EnclaveError: The file holds no host spec (not a partitioned model) or a malformed one.
        InvalidKey, ProfileError, ...: As :func:`chiplock.unlock` (a ``pre-aes`` host part on a wrong device
            gives wrong weights silently, by design).
    """
    public = dict(iter_unlock(path, profile, secret, license=license, verify_key=verify_key, groups=[HOST_GROUP]))
    if HOST_SPEC not in public:
        raise EnclaveError(f"{os.fspath(path)} is not a partitioned model (no {HOST_SPEC!r} tensor); package it "
                           "with `chiplock enclave package` / chiplock.enclave.package.package")
    return decode_spec(public.pop(HOST_SPEC), what="the host's partition spec"), public


def iter_secure(path: str | os.PathLike, license: License | str | os.PathLike, *,
                profile: DeviceProfile | None = None, secret: bytes | None = None,
                verify_key: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Open the executor's part one tensor at a time (the spec tensor included, under :data:`ENCLAVE_SPEC`).

    Each tensor is authenticated (``aes``) before it is yielded; memory holds the tensor in hand.
    """
    try:
        yield from iter_unlock(path, profile, secret, license=license, verify_key=verify_key, groups=[ENCLAVE_GROUP])
    except UnsupportedConfig:
        raise EnclaveError(f"{os.fspath(path)} has no secure part (no {ENCLAVE_GROUP!r} group): it runs entirely "
                           "on the host, no executor is needed") from None


def load_secure(path: str | os.PathLike, license: License | str | os.PathLike, *,
                profile: DeviceProfile | None = None, secret: bytes | None = None,
                verify_key: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Open the executor's part: ``(spec, secure tensors)`` (the executor's own, authenticated spec).

    Raises:
        EnclaveError: No secure part, or no or a malformed spec in it.
        InvalidKey: This device (or secret) is not the executor licence's.
    """
    secure = dict(iter_secure(path, license, profile=profile, secret=secret, verify_key=verify_key))
    if ENCLAVE_SPEC not in secure:
        raise EnclaveError(f"the secure part of {os.fspath(path)} holds no spec; package it with "
                           "chiplock.enclave.package.package")
    return decode_spec(secure.pop(ENCLAVE_SPEC), what="the executor's partition spec"), secure
