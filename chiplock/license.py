"""Licences: random content keys, wrapped per device under a key only that device derives.

The key hierarchy (docs/FORMAT.md, design of issue 9):

* **Content keys** (:class:`ContentKeys`): one random 32-byte key per *group* of tensors, drawn when a model is
  locked. They never depend on a device; the vendor keeps them in a 0600 keys file.
* **Device key** (:class:`~chiplock.profile.DeviceKey`): Argon2id over the device's fingerprint material, stored
  in its profile at enrollment, so issuing a licence costs microseconds; a device derives it again to open one.
* **Licence** (:class:`License`): for one device, KEK = HKDF-SHA256(device key || vendor secret, licence salt)
  wraps each group's content key, with AES-256-GCM for groups whose transform detects a wrong key (``aes``,
  ``shuffle``: a wrong device gets :class:`~chiplock.errors.InvalidKey`) and with AES-256-CTR for silent groups
  (``pre-aes``: a wrong device unwraps a random key and gets plausible wrong weights, and the licence alone lets
  no one test a device-key guess). A licence never mixes the two kinds: an authenticated wrap under the same KEK
  would be that oracle for the silent groups.

What a licence does not hide (measured in tests/attacks/test_core_v2_redteam.py, docs/FORMAT.md): anyone who
knows a content key (every licensed device of that model, with the shared vendor secret) can test guesses of
another device's key against that device's licence, one Argon2id run per guess; so can anyone holding an
``aes``/``shuffle`` licence of the same device. Against them a licence is exactly as strong as the device key's
entropy, which :func:`check_key_strength` requires to be 64 bits (or a vendor secret they do not know: issue
each device its own secret to keep licences independent).

A licence is public (mode 0644 is fine): it opens nothing without the device. The keys file and the profile are
secret.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import InvalidTag as _AEADInvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chiplock import _json
from chiplock._io import atomic_write_bytes, read_capped
from chiplock._json import is_hex
from chiplock._json import show as _show
from chiplock.container.schema import MAX_GROUPS, is_signature, label_problem
from chiplock.errors import (ContainerError, FileAccessError, InvalidKey, InvalidTag, KeyFileError,
                             ProfileError, UnsupportedConfig, WeakKey)
from chiplock.fingerprint import get_source
from chiplock.keys.combine import MIN_ENTROPY_BITS, key_strength
from chiplock.keys.kdf import ARGON2_MAX_MEMORY_KIB, KEY_LEN, KdfParams
from chiplock.profile import DeviceKey, DeviceProfile
from chiplock.transforms import get_transform

__all__ = ["ContentKeys", "GroupKey", "License", "LowEntropyWarning", "MIN_SECRET_BYTES", "Wrap",
           "check_key_strength", "device_key", "issue_license", "open_license", "sign", "verify_signature"]

#: A vendor secret shorter than this does not count as one (it could be guessed alongside the fingerprint).
MIN_SECRET_BYTES = 16
#: Caps on what a licence or keys file may hold (groups: as many as a container has, ``MAX_GROUPS``).
MAX_SOURCES = 16
MAX_LICENSE_BYTES = 16 << 20
MAX_KEYS_BYTES = 1 << 20
CONTENT_ID_BYTES = 16
SALT_BYTES = 16
LICENSE_VERSION = 1
KEYS_VERSION = 1
LICENSE_LIMITS = _json.Limits(max_bytes=MAX_LICENSE_BYTES, max_depth=64, max_containers=200_000,
                              max_items=2_000_000)
KEYS_LIMITS = _json.Limits(max_bytes=MAX_KEYS_BYTES, max_depth=8, max_containers=1_000, max_items=10_000)
#: The two wrap algorithms: authenticated for groups that detect a wrong key, unauthenticated for silent ones.
GCM, CTR = "aes-256-gcm", "aes-256-ctr"
_NONCE_BYTES = {GCM: 12, CTR: 16}
_WRAPPED_BYTES = {GCM: KEY_LEN + 16, CTR: KEY_LEN}
_KEK_INFO = b"chiplock license kek v1"
_AAD_PREFIX = b"chiplock license v1\0"
_SIG_PREFIX = b"chiplock license signature v1\0"
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LICENSE_FIELDS = frozenset({"chiplock_license", "content_id", "sources", "kdf", "secret", "salt", "wraps"})
_KEYS_FIELDS = frozenset({"chiplock_content_keys", "content_id", "groups"})


def _read_json_file(path: str | os.PathLike, what: str, cap: int, limits: _json.Limits,
                    errors: tuple[type[Exception], type[Exception]], *, not_found: str, damaged: str) -> Any:
    """Parse a small JSON file with caps; ``errors`` = (class for a missing or unreadable file, class for bad
    JSON), ``not_found`` and ``damaged`` say what to do."""
    where = repr(os.fspath(path))
    try:
        raw = read_capped(path, cap)
    except FileNotFoundError:
        raise errors[0](f"{what} {where} not found; {not_found}") from None
    except OSError as exc:
        raise errors[0](f"{what} {where} is unreadable ({exc.strerror or type(exc).__name__}); check the path and "
                        "its permissions") from None
    try:
        return _json.loads(raw, limits)
    except _json.JSONLimitError as exc:
        raise errors[1](f"{what} {where} is unreadable (it {exc}); {damaged}") from None


class LowEntropyWarning(UserWarning):
    """The key rests on fewer than 64 estimated bits (or an unknown amount) and no vendor secret."""


def _check_label(label: Any, what: str = "group label") -> None:
    if label_problem(label):
        raise ValueError(f"{what} {_show(label)} must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'")


def _is_silent(transform: str) -> bool:
    return not get_transform(transform).detects_wrong_key


def _alg_for(transform: str) -> str:
    return CTR if _is_silent(transform) else GCM


# --------------------------------------------------------------------------------------------------------------
# Content keys


@dataclass(frozen=True)
class GroupKey:
    """The content key of one group of tensors.

    Attributes:
        transform: The transform the group's tensors are locked with (``"pre-aes"``, ``"aes"``, ``"shuffle"``).
        key: 32 random bytes (kept out of ``repr``).

    Raises:
        TypeError: ``transform`` is not a string or ``key`` is not bytes.
        ValueError: ``key`` is not 32 bytes.
    """

    transform: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.transform, str):
            raise TypeError(f"transform must be a transform name (str), got {type(self.transform).__name__}")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LEN:
            raise ValueError(f"a content key must be {KEY_LEN} bytes; draw one with ContentKeys.new(...)")


@dataclass(frozen=True)
class ContentKeys:
    """The random content keys of one locked model: a content id and one key per group.

    They are the vendor's secret for that model: whoever holds them decrypts it on any machine. Keep the keys
    file (:meth:`save`, mode 0600) private and backed up; without it no new licence can be issued.

    Attributes:
        content_id: 16 random bytes naming the locked model (public; every licence for it carries it).
        groups: Group label -> :class:`GroupKey`. Labels are 1-64 characters of ``[A-Za-z0-9_.-]``.

    Raises:
        TypeError: A field of the wrong type.
        ValueError: A content id that is not 16 bytes, no groups or more than 64, or a bad label.

    Example:
        >>> keys = ContentKeys.new({"main": "pre-aes", "secure": "aes"})
        >>> keys.silent("main"), keys.silent("secure")
        (True, False)
    """

    content_id: bytes
    groups: Mapping[str, GroupKey]

    def __post_init__(self) -> None:
        if not isinstance(self.content_id, bytes) or len(self.content_id) != CONTENT_ID_BYTES:
            raise ValueError(f"content_id must be {CONTENT_ID_BYTES} bytes")
        if not isinstance(self.groups, Mapping) or not 1 <= len(self.groups) <= MAX_GROUPS:
            raise ValueError(f"groups must be a mapping of 1 to {MAX_GROUPS} labels -> GroupKey")
        for label, gk in self.groups.items():
            _check_label(label)
            if not isinstance(gk, GroupKey):
                raise TypeError(f"groups[{label!r}] must be a GroupKey, got {type(gk).__name__}")
        # A private copy: the caller's mapping cannot change the keys afterwards.
        object.__setattr__(self, "groups", dict(self.groups))

    @classmethod
    def new(cls, groups: Mapping[str, str]) -> ContentKeys:
        """Draw a fresh content id and one random key per group (``os.urandom``).

        Args:
            groups: Group label -> transform name, e.g. ``{"main": "pre-aes"}``.

        Returns:
            The new :class:`ContentKeys`.

        Raises:
            UnsupportedConfig: An unknown transform name.
            ValueError: No groups, more than 64, or a bad label.

        Example:
            >>> keys = ContentKeys.new({"main": "pre-aes"})
            >>> len(keys.groups["main"].key)
            32
        """
        if not isinstance(groups, Mapping):
            raise TypeError("groups must be a mapping of label -> transform name, e.g. {'main': 'pre-aes'}")
        for transform in groups.values():
            get_transform(transform)
        return cls(content_id=os.urandom(CONTENT_ID_BYTES),
                   groups={label: GroupKey(get_transform(t).name, os.urandom(KEY_LEN)) for label, t in groups.items()})

    def silent(self, label: str) -> bool:
        """Whether group ``label``'s transform cannot detect a wrong key (``pre-aes``), so its wrap is AES-CTR.

        Raises:
            ValueError: No group has that label.
        """
        if label not in self.groups:
            raise ValueError(f"no group {_show(label)} in these content keys; they hold {', '.join(self.groups)}")
        return _is_silent(self.groups[label].transform)

    @property
    def transforms(self) -> dict[str, str]:
        """Group label -> transform name (public: the container stores it)."""
        return {label: gk.transform for label, gk in self.groups.items()}

    def to_json(self) -> dict[str, Any]:
        return {"chiplock_content_keys": KEYS_VERSION, "content_id": self.content_id.hex(),
                "groups": {label: {"transform": gk.transform, "key": gk.key.hex()}
                           for label, gk in self.groups.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the keys file atomically with mode 0600 (it decrypts the model anywhere: keep it private).

        An existing file at ``path`` is replaced; the caller refuses to overwrite another model's keys.

        Raises:
            OutputError: ``path`` cannot be written.

        Example:
            >>> ContentKeys.new({"main": "pre-aes"}).save("model.chiplock.keys")  # doctest: +SKIP
        """
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=2).encode(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContentKeys:
        """Read a keys file written by :meth:`save`, with size caps and every field type-checked.

        Returns:
            The :class:`ContentKeys`.

        Raises:
            KeyFileError: The file is missing, unreadable, over 1 MiB, not JSON, not a keys file, of another
                version, names an unknown transform, or has a field of the wrong type (the message says which).

        Example:
            >>> keys = ContentKeys.load("model.chiplock.keys")  # doctest: +SKIP
        """
        data = _read_json_file(path, "content keys file", MAX_KEYS_BYTES, KEYS_LIMITS, (KeyFileError, KeyFileError),
                               not_found="pass the keys file that `chiplock lock` wrote for this model (by default "
                               "<model>.keys)", damaged="restore it from your backup")
        return cls.from_json(data, where=repr(os.fspath(path)))

    @classmethod
    def from_json(cls, data: Any, *, where: str = "") -> ContentKeys:
        """Content keys from their JSON form (see :meth:`load`).

        Raises:
            KeyFileError: Not a keys object, another version, or a field of the wrong type.
        """
        def bad(why: str) -> NoReturn:
            name = f"content keys file {where}" if where else "the content keys"
            raise KeyFileError(f"{name} is malformed ({why}); restore the keys file `chiplock lock` wrote from "
                               "your backup")

        if not isinstance(data, dict) or "chiplock_content_keys" not in data:
            bad("not a chiplock content keys file")
        version = data["chiplock_content_keys"]
        if not (_json.is_int(version) and version == KEYS_VERSION):
            raise KeyFileError(f"content keys version {_show(version)} is not supported (expects {KEYS_VERSION}); "
                               "upgrade chiplock")
        if set(data) != _KEYS_FIELDS:
            bad("missing or unknown fields")
        if not is_hex(data["content_id"], CONTENT_ID_BYTES):
            bad("content_id is not 16 bytes of lowercase hex")
        groups = data["groups"]
        if not (isinstance(groups, dict) and 1 <= len(groups) <= MAX_GROUPS):
            bad(f"groups is not an object of 1 to {MAX_GROUPS} groups")
        out = {}
        for label, g in groups.items():
            if label_problem(label):
                bad(f"group label {_show(label)} is not 1 to 64 characters of [A-Za-z0-9_.-]")
            if not (isinstance(g, dict) and set(g) == {"transform", "key"} and isinstance(g["transform"], str)
                    and is_hex(g["key"], KEY_LEN)):
                bad(f"group {label} is not {{transform, key (32 bytes of lowercase hex)}}")
            try:
                get_transform(g["transform"])
            except UnsupportedConfig:
                raise KeyFileError(f"group {label} uses transform {_show(g['transform'])}, unknown to this "
                                   "chiplock; upgrade chiplock") from None
            out[label] = GroupKey(g["transform"], bytes.fromhex(g["key"]))
        return cls(content_id=bytes.fromhex(data["content_id"]), groups=out)


# --------------------------------------------------------------------------------------------------------------
# Device key and key-strength policy


def device_key(profile: DeviceProfile, kdf: KdfParams | None = None) -> DeviceKey:
    """The device key of ``profile``: its stored one when it matches, else Argon2id over its material.

    Args:
        profile: The device's :class:`~chiplock.DeviceProfile`.
        kdf: Argon2id parameters. ``None``: the profile's stored key, or a fresh derivation with the default
            :class:`~chiplock.keys.KdfParams` for a profile enrolled without one. Given: the stored key when it
            was derived with exactly these parameters, else a derivation with them.

    Returns:
        A :class:`~chiplock.profile.DeviceKey` (parameters + 32-byte key).

    Raises:
        TypeError: ``profile`` is not a DeviceProfile or ``kdf`` not a KdfParams.

    Example:
        >>> dk = device_key(chiplock.enroll())  # doctest: +SKIP
    """
    if not isinstance(profile, DeviceProfile):
        raise TypeError("profile must be a DeviceProfile; get one with chiplock.enroll() or DeviceProfile.load()")
    if kdf is not None and not isinstance(kdf, KdfParams):
        raise TypeError(f"kdf must be a KdfParams or None, got {type(kdf).__name__}")
    stored = profile.device_key
    if stored is not None and (kdf is None or kdf == stored.kdf):
        return stored
    return DeviceKey.derive(profile.materials(), kdf or KdfParams())


def check_key_strength(profile: DeviceProfile, secret: bytes | None, allow_weak_key: bool, *,
                       stacklevel: int = 3) -> None:
    """Refuse a key that an attacker could enumerate: too little fingerprint entropy and no real vendor secret.

    With the structural tests, a fingerprint of a few bits is cracked by enumerating configurations at
    Argon2id's cost each, so a key below 64 estimated bits is refused. The override still warns, with the figure.

    Args:
        profile: The device's profile (its sources' entropy estimates count).
        secret: The vendor secret, or ``None``. Fewer than :data:`MIN_SECRET_BYTES` bytes do not count as one.
        allow_weak_key: Accept a weak key, with a :class:`LowEntropyWarning`.
        stacklevel: Passed to :func:`warnings.warn` (3 points at the caller of the function calling this).

    Raises:
        WeakKey: The key is weak and ``allow_weak_key`` is false.

    Example:
        >>> check_key_strength(profile, os.urandom(32), False)  # doctest: +SKIP
    """
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        # An empty or one-byte secret (an unset shell variable written to a file) is no secret: it must not
        # stand in for the entropy the fingerprint lacks.
        if not allow_weak_key:
            raise WeakKey(f"refusing to lock: the vendor secret has {len(secret)} bytes (< {MIN_SECRET_BYTES}); use "
                          f"at least {MIN_SECRET_BYTES} random bytes (e.g. `head -c 32 /dev/urandom > vendor.key`), "
                          "or pass allow_weak_key=True (--allow-weak-key)")
        warnings.warn(f"allow_weak_key=True: the vendor secret has only {len(secret)} bytes", LowEntropyWarning,
                      stacklevel=stacklevel)
        secret = None
    strength = key_strength(profile.enrollments, secret=secret, minimum=MIN_ENTROPY_BITS)
    if strength.sufficient:
        return
    if not allow_weak_key:
        raise WeakKey(f"refusing to lock: {strength.message()}; or pass allow_weak_key=True (--allow-weak-key) "
                      "if a key that an attacker can enumerate is acceptable")
    warnings.warn(f"allow_weak_key=True: locking with a weak key: {strength.message()}", LowEntropyWarning,
                  stacklevel=stacklevel)


# --------------------------------------------------------------------------------------------------------------
# Licences


@dataclass(frozen=True)
class Wrap:
    """One group's content key, wrapped under the licence's KEK.

    Attributes:
        alg: ``"aes-256-gcm"`` (12-byte nonce; ciphertext + 16-byte tag) or ``"aes-256-ctr"`` (16-byte nonce).
        nonce: Random, fresh per wrap.
        wrapped: The wrapped 32-byte key (48 bytes with GCM's tag).
    """

    alg: str
    nonce: bytes
    wrapped: bytes

    def __post_init__(self) -> None:
        if self.alg not in (GCM, CTR):
            raise ValueError(f"alg must be {GCM!r} or {CTR!r}, got {_show(self.alg)}")
        if not (isinstance(self.nonce, bytes) and len(self.nonce) == _NONCE_BYTES[self.alg]
                and isinstance(self.wrapped, bytes) and len(self.wrapped) == _WRAPPED_BYTES[self.alg]):
            raise ValueError(f"a {self.alg} wrap has a {_NONCE_BYTES[self.alg]}-byte nonce and "
                             f"{_WRAPPED_BYTES[self.alg]} wrapped bytes")

    def to_json(self) -> dict[str, str]:
        return {"alg": self.alg, "nonce": self.nonce.hex(), "wrapped": self.wrapped.hex()}


def _damaged(why: str) -> ContainerError:
    return ContainerError(f"the licence is malformed ({why}); it is damaged: ask the vendor for a fresh copy")


@dataclass(frozen=True)
class License:
    """A licence: one device's wraps of a model's content keys, plus what that device needs to unwrap them.

    JSON form (:meth:`to_json`)::

        {"chiplock_license": 1, "content_id": hex16, "sources": [{"source": name, "helper": {...}}],
         "kdf": <KdfParams.to_json(), with the device's salt>, "secret": bool, "salt": hex16,
         "wraps": {label: {"alg": "aes-256-gcm" | "aes-256-ctr", "nonce": hex, "wrapped": hex}},
         "signature"?: {"alg": "ed25519", "public_key": hex32, "sig": hex64}}

    Everything in it is public. Build one with :func:`issue_license`, open it with :func:`open_license`.

    Attributes:
        content_id: The model this licence opens (16 bytes).
        sources: ``{"source": name, "helper": {...}}`` per fingerprint source, as the device reproduces them.
        kdf: The device key's Argon2id parameters (with its salt).
        secret: Whether a vendor secret is mixed into the KEK.
        salt: 16 random bytes, the KEK's HKDF salt.
        wraps: Group label -> :class:`Wrap`; all of one algorithm.
        signature: ``None``, or the vendor's Ed25519 signature over everything else.

    Raises:
        ValueError: Fields that do not fit together (no wraps, mixed algorithms, more than 64 groups).
    """

    content_id: bytes
    sources: tuple[Mapping[str, Any], ...]
    kdf: KdfParams
    secret: bool
    salt: bytes
    wraps: Mapping[str, Wrap]
    signature: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.content_id, bytes) and len(self.content_id) == CONTENT_ID_BYTES
                and isinstance(self.salt, bytes) and len(self.salt) == SALT_BYTES):
            raise ValueError(f"content_id and salt must be {CONTENT_ID_BYTES} bytes each")
        if not isinstance(self.kdf, KdfParams) or not isinstance(self.secret, bool):
            raise TypeError("kdf must be a KdfParams and secret a bool")
        if not isinstance(self.wraps, Mapping) or not 1 <= len(self.wraps) <= MAX_GROUPS:
            raise ValueError(f"a licence holds 1 to {MAX_GROUPS} wraps")
        if len({w.alg for w in self.wraps.values()}) != 1:
            raise ValueError("a licence never mixes aes-256-gcm and aes-256-ctr wraps")
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "wraps", dict(self.wraps))

    @property
    def groups(self) -> tuple[str, ...]:
        """The group labels this licence opens."""
        return tuple(self.wraps)

    @property
    def silent(self) -> bool:
        """Whether the wraps are unauthenticated (AES-CTR: groups whose transform cannot tell a wrong key)."""
        return next(iter(self.wraps.values())).alg == CTR

    def _public(self) -> dict[str, Any]:
        return _public(self.content_id, self.sources, self.kdf, self.secret, self.salt)

    def _unsigned(self) -> dict[str, Any]:
        return {"chiplock_license": LICENSE_VERSION, **self._public(),
                "wraps": {label: w.to_json() for label, w in self.wraps.items()}}

    def to_json(self) -> dict[str, Any]:
        """The licence as a JSON object (see the class docstring); :meth:`from_json` reads it back."""
        out = self._unsigned()
        if self.signature is not None:
            out["signature"] = dict(self.signature)
        return out

    @classmethod
    def from_json(cls, data: Any) -> License:
        """A licence from its JSON form, every field type-checked and capped.

        The KDF cost is only checked against Argon2id's own limits here; :func:`open_license` applies the
        device's cap before any work.

        Raises:
            ContainerError: Not a licence, another version, or a missing, extra, mistyped or oversized field
                (at most 64 groups, 16 sources); the message names it.
        """
        if not isinstance(data, dict) or "chiplock_license" not in data:
            raise ContainerError("this is not a chiplock licence; get one with `chiplock license issue`")
        version = data["chiplock_license"]
        if not (_json.is_int(version) and version == LICENSE_VERSION):
            raise ContainerError(f"licence version {_show(version)} is not supported by this chiplock (expects "
                                 f"{LICENSE_VERSION}); upgrade chiplock")
        if not _LICENSE_FIELDS <= set(data) or set(data) - _LICENSE_FIELDS - {"signature"}:
            raise _damaged("missing or unknown fields")
        if not is_hex(data["content_id"], CONTENT_ID_BYTES):
            raise _damaged("content_id is not 16 bytes of lowercase hex")
        if not is_hex(data["salt"], SALT_BYTES):
            raise _damaged("salt is not 16 bytes of lowercase hex")
        if not isinstance(data["secret"], bool):
            raise _damaged("secret is not true or false")
        sources = _check_sources(data["sources"])
        kdf = KdfParams.from_json(data["kdf"], max_memory_kib=ARGON2_MAX_MEMORY_KIB)
        wraps = data["wraps"]
        if not (isinstance(wraps, dict) and 1 <= len(wraps) <= MAX_GROUPS):
            raise _damaged(f"wraps is not an object of 1 to {MAX_GROUPS} groups")
        out = {}
        for label, w in wraps.items():
            if label_problem(label):
                raise _damaged(f"group label {_show(label)} is not 1 to 64 characters of [A-Za-z0-9_.-]")
            alg = w.get("alg") if isinstance(w, dict) else None
            if not (isinstance(w, dict) and set(w) == {"alg", "nonce", "wrapped"} and alg in (GCM, CTR)
                    and is_hex(w["nonce"], _NONCE_BYTES[alg]) and is_hex(w["wrapped"], _WRAPPED_BYTES[alg])):
                raise _damaged(f"the wrap of group {label} is not {{alg: aes-256-gcm|aes-256-ctr, nonce, wrapped}} "
                               "of the right lengths in lowercase hex")
            out[label] = Wrap(alg, bytes.fromhex(w["nonce"]), bytes.fromhex(w["wrapped"]))
        if len({w.alg for w in out.values()}) != 1:
            raise _damaged("it mixes aes-256-gcm and aes-256-ctr wraps")
        sig = data.get("signature")
        if sig is not None and not is_signature(sig):
            raise _damaged("the signature is not ed25519 with a 32-byte public key and a 64-byte signature in "
                           "lowercase hex")
        return cls(content_id=bytes.fromhex(data["content_id"]), sources=sources, kdf=kdf, secret=data["secret"],
                   salt=bytes.fromhex(data["salt"]), wraps=out, signature=dict(sig) if sig is not None else None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the licence as JSON, atomically (mode 0644: a licence is public).

        Raises:
            OutputError: ``path`` cannot be written.

        Example:
            >>> issue_license(keys, profile, secret=vendor_secret).save("device-17.lic")  # doctest: +SKIP
        """
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1).encode(), mode=0o644)

    @classmethod
    def load(cls, path: str | os.PathLike) -> License:
        """Read a licence file (at most 16 MiB, parsed with caps, every field checked).

        Raises:
            FileAccessError: The file is missing or unreadable.
            ContainerError: Over the size cap, not JSON, not a licence, another version or a malformed field.

        Example:
            >>> lic = License.load("device-17.lic")  # doctest: +SKIP
        """
        data = _read_json_file(path, "licence file", MAX_LICENSE_BYTES, LICENSE_LIMITS,
                               (FileAccessError, ContainerError),
                               not_found="ask the vendor for a licence for this device (`chiplock license issue`)",
                               damaged="ask the vendor for a fresh copy")
        return cls.from_json(data)


def _check_sources(sources: Any) -> tuple[dict[str, Any], ...]:
    if not (isinstance(sources, list) and 1 <= len(sources) <= MAX_SOURCES):
        raise _damaged(f"sources is not a list of 1 to {MAX_SOURCES} entries")
    names: set[str] = set()
    for s in sources:
        if not (isinstance(s, dict) and set(s) == {"source", "helper"} and isinstance(s["source"], str)
                and _SOURCE_NAME.fullmatch(s["source"]) and isinstance(s["helper"], dict)):
            raise _damaged("a fingerprint source entry is not {source, helper}")
        if s["source"] in names:
            raise _damaged(f"fingerprint source {s['source']!r} is listed twice")
        names.add(s["source"])
        # The helper is the source's own format (each source checks it when reproducing); here only its shape.
        problem = _json.check_tree(s["helper"], max_depth=LICENSE_LIMITS.max_depth, max_str=MAX_LICENSE_BYTES)
        if problem:
            raise _damaged(f"the helper data of source {s['source']!r} is unfit: {problem}")
    return tuple({"source": s["source"], "helper": s["helper"]} for s in sources)


def _public(content_id: bytes, sources: Iterable[Mapping[str, Any]], kdf: KdfParams, secret: bool,
            salt: bytes) -> dict[str, Any]:
    # The fields every wrap's AAD covers: the model, the device's sources and KDF salt, the secret flag, the salt.
    return {"content_id": content_id.hex(),
            "sources": [{"source": s["source"], "helper": s["helper"]} for s in sources],
            "kdf": kdf.to_json(), "secret": secret, "salt": salt.hex()}


def _aad(content_id: bytes, label: str, public: bytes) -> bytes:
    # Labels cannot hold "{", so label + canonical JSON is unambiguous: a wrap cannot move to another file,
    # group or device's licence (the public fields name the device's sources and KDF salt).
    return _AAD_PREFIX + content_id + label.encode() + public


def _kek(dk: bytes, secret: bytes | None, salt: bytes) -> bytes:
    # The device key has a fixed length, so dk || secret is unambiguous.
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=_KEK_INFO).derive(dk + (secret or b""))


def _ctr(kek: bytes, nonce: bytes, data: bytes) -> bytes:
    c = Cipher(algorithms.AES(kek), modes.CTR(nonce)).encryptor()
    return c.update(data) + c.finalize()


def _signed_bytes(lic: License) -> bytes:
    return _SIG_PREFIX + _json.canonical(lic._unsigned())


def issue_license(keys: ContentKeys, profile: DeviceProfile, *, secret: bytes | None = None,
                  groups: Iterable[str] | None = None, signing_key: Ed25519PrivateKey | None = None,
                  allow_weak_key: bool = False, kdf: KdfParams | None = None) -> License:
    """Wrap a model's content keys for one device.

    With a profile that carries its device key (:func:`chiplock.enroll` stores one) this runs no Argon2id: a
    licence costs microseconds. A profile without one derives it first (one Argon2id run).

    Args:
        keys: The model's :class:`ContentKeys` (``ContentKeys.load("model.chiplock.keys")``).
        profile: The device's :class:`~chiplock.DeviceProfile`.
        secret: Optional vendor secret mixed into the KEK (the device must pass it again).
        groups: Labels to wrap; ``None`` wraps every group. All of them must be of one kind: every transform
            silent (``pre-aes``) or every one detecting a wrong key (``aes``, ``shuffle``).
        signing_key: Optional Ed25519 private key; the device can then refuse an altered licence.
        allow_weak_key: Issue even when the key rests on fewer than 64 estimated bits and no vendor secret
            (warns with :class:`LowEntropyWarning`).
        kdf: Argon2id parameters of the device key; ``None`` uses the profile's stored key (see :func:`device_key`).

    Returns:
        The :class:`License`; ``lic.save(path)`` writes it.

    Raises:
        WeakKey: The key is weak (see :func:`check_key_strength`) and ``allow_weak_key`` is false.
        UnsupportedConfig: An unknown group label, or groups mixing silent and detecting transforms: an
            authenticated wrap would let anyone test device-key guesses offline against the KEK that also
            protects the silent groups. Issue two licences (``groups=``) instead.

    Example:
        >>> keys = ContentKeys.load("model.chiplock.keys")  # doctest: +SKIP
        >>> issue_license(keys, DeviceProfile.load("dev.json"), secret=vendor_secret).save("dev.lic")  # doctest: +SKIP
    """
    if not isinstance(keys, ContentKeys):
        raise TypeError("keys must be ContentKeys; load them with ContentKeys.load('model.chiplock.keys')")
    if not isinstance(profile, DeviceProfile):
        raise TypeError("profile must be a DeviceProfile; get one with chiplock.enroll() or DeviceProfile.load()")
    if secret is not None and not isinstance(secret, bytes):
        raise TypeError("secret must be bytes, e.g. secret=b'...' or bytes.fromhex(...)")
    if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
        raise TypeError("signing_key must be an Ed25519PrivateKey")
    labels = list(keys.groups) if groups is None else list(dict.fromkeys(_labels(groups)))
    unknown = [label for label in labels if label not in keys.groups]
    if unknown or not labels:
        raise UnsupportedConfig(f"unknown group(s) {', '.join(map(repr, unknown)) or '(none given)'}; these content "
                                f"keys hold {', '.join(keys.groups)}")
    kinds = {label: keys.silent(label) for label in labels}
    if len(set(kinds.values())) > 1:
        silent = [label for label, s in kinds.items() if s]
        loud = [label for label, s in kinds.items() if not s]
        raise UnsupportedConfig(
            f"one licence cannot hold both silent groups ({', '.join(silent)}: their transform cannot tell a wrong "
            f"key) and groups that detect a wrong key ({', '.join(loud)}): the authenticated wraps would let anyone "
            "test device-key guesses offline, breaking the silent groups. Issue the kinds to different devices, or "
            f"as two licences (groups=[{', '.join(map(repr, silent))}] and groups=[{', '.join(map(repr, loud))}]) "
            "knowing that one device's authenticated licence confirms guesses of the key its silent one uses too "
            "(both then rest on the device key's entropy alone)")
    check_key_strength(profile, secret, allow_weak_key)
    dk = device_key(profile, kdf)
    salt = os.urandom(SALT_BYTES)
    sources = tuple({"source": e.source, "helper": e.helper} for e in profile.enrollments)
    public = _json.canonical(_public(keys.content_id, sources, dk.kdf, secret is not None, salt))
    kek = _kek(dk.key, secret, salt)
    gcm = AESGCM(kek)
    wraps = {}
    for label in labels:
        ck = keys.groups[label].key
        if kinds[label]:
            nonce = os.urandom(_NONCE_BYTES[CTR])
            wraps[label] = Wrap(CTR, nonce, _ctr(kek, nonce, ck))
        else:
            nonce = os.urandom(_NONCE_BYTES[GCM])
            wraps[label] = Wrap(GCM, nonce, gcm.encrypt(nonce, ck, _aad(keys.content_id, label, public)))
    lic = License(content_id=keys.content_id, sources=sources, kdf=dk.kdf, secret=secret is not None, salt=salt,
                  wraps=wraps)
    if signing_key is None:
        return lic
    return replace(lic, signature=sign(signing_key, _signed_bytes(lic)))


def _labels(groups: Any) -> list[str]:
    if isinstance(groups, (str, bytes)):
        raise TypeError("groups must be a list of group labels (or None for all), e.g. groups=['main']")
    out = list(groups)
    for label in out:
        if not isinstance(label, str):
            raise TypeError(f"groups must hold group labels (str), got {type(label).__name__}")
    return out


def sign(signing_key: Ed25519PrivateKey, message: bytes) -> dict[str, str]:
    """The signature field (of a container or a licence) over ``message``.

    Args:
        signing_key: The vendor's Ed25519 private key.
        message: The canonical bytes the signature covers.

    Returns:
        ``{"alg": "ed25519", "public_key": hex, "sig": hex}``, the shape :func:`verify_signature` checks.

    Example:
        >>> field = sign(Ed25519PrivateKey.generate(), b"header")
        >>> sorted(field), field["alg"]
        (['alg', 'public_key', 'sig'], 'ed25519')
    """
    return {"alg": "ed25519", "public_key": signing_key.public_key().public_bytes_raw().hex(),
            "sig": signing_key.sign(message).hex()}


def verify_signature(verify_key: Ed25519PublicKey | bytes | None, signature: Mapping[str, str] | None,
                     message: bytes, *, unsigned: str) -> None:
    """Check a signature field over ``message`` against the vendor's key; do nothing without a key.

    Args:
        verify_key: The vendor's Ed25519 public key (or its 32 raw bytes), or ``None`` to skip the check.
        signature: The parsed signature field (its shape already checked, see
            :func:`chiplock.container.schema.is_signature`), or ``None`` when the document is unsigned.
        message: The canonical bytes the signature must cover.
        unsigned: The :class:`InvalidTag` message when a key is given but the document is unsigned.

    Raises:
        KeyFileError: ``verify_key`` is bytes but not an Ed25519 public key.
        TypeError: ``verify_key`` is of another type.
        InvalidTag: The document is unsigned (message ``unsigned``), or the signature does not verify (no detail).

    Example:
        >>> key = Ed25519PrivateKey.generate()
        >>> verify_signature(key.public_key(), sign(key, b"m"), b"m", unsigned="not signed")
    """
    if verify_key is None:
        return
    if isinstance(verify_key, bytes):
        try:
            verify_key = Ed25519PublicKey.from_public_bytes(verify_key)
        except ValueError:
            raise KeyFileError("verify_key is not a 32-byte Ed25519 public key; pass the vendor's public key") \
                from None
    if not isinstance(verify_key, Ed25519PublicKey):
        raise TypeError("verify_key must be an Ed25519PublicKey or its 32 raw bytes")
    if not signature:
        raise InvalidTag(unsigned) from None
    try:
        verify_key.verify(bytes.fromhex(signature["sig"]), message)
    except (InvalidSignature, ValueError, TypeError, KeyError):
        raise InvalidTag() from None


def _device_materials(sources: tuple[Mapping[str, Any], ...], profile: DeviceProfile | None) -> dict[str, bytes]:
    needed = [s["source"] for s in sources]
    if profile is not None:
        have = profile.materials()
        missing = [n for n in needed if n not in have]
        if missing:
            raise ProfileError(f"the device profile lacks source(s) {', '.join(missing)} that this licence needs; "
                               f"enroll the device with --source {' --source '.join(needed)}")
        return {n: have[n] for n in needed}
    out = {}
    for s in sources:
        try:
            out[s["source"]] = get_source(s["source"]).reproduce(s["helper"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, SystemError,
                MemoryError):
            # The helper is public and unauthenticated (unless signed): a source that trips over a crafted one
            # must give one clear error, not a traceback. Each source also bounds what a helper may ask.
            raise ContainerError(f"the licence's public helper data for fingerprint source {s['source']!r} is "
                                 "malformed; the licence is damaged: ask the vendor for a fresh copy") from None
    return out


def _open_device_key(lic: License, profile: DeviceProfile | None, kdf: KdfParams) -> bytes:
    if profile is not None:
        stored = profile.device_key
        # The stored key stands in for Argon2id only when it was derived from exactly these sources and params.
        if stored is not None and stored.kdf == kdf and set(profile.sources) == {s["source"] for s in lic.sources}:
            return stored.key
    return DeviceKey.derive(_device_materials(lic.sources, profile), kdf).key


def open_license(lic: License, *, content_id: bytes, transforms: Mapping[str, str],
                 profile: DeviceProfile | None = None, secret: bytes | None = None,
                 verify_key: Ed25519PublicKey | bytes | None = None, max_kdf_memory_kib: int | None = None,
                 groups: Iterable[str] | None = None) -> dict[str, bytes]:
    """Unwrap a licence's content keys on this device (or as the device of ``profile`` would).

    Every public check (model, signature, secret flag, wrap kinds, KDF cost) runs before any key work.

    Args:
        lic: The :class:`License`.
        content_id: The content id of the model file being opened (from its header).
        transforms: The file's group label -> transform name. A group's wrap must be AES-GCM exactly when its
            transform detects a wrong key, so an edited licence cannot turn an ``aes`` group into a silent one.
        profile: Open as the device of this profile would (its stored device key is used when it matches the
            licence, else its material). ``None`` (the normal case) measures this device.
        secret: The vendor secret, if the licence was issued with one.
        verify_key: The vendor's Ed25519 public key; the licence must then carry a valid signature by it.
        max_kdf_memory_kib: The most Argon2id memory (KiB) the licence may ask of this device; default
            ``$CHIPLOCK_MAX_KDF_MEMORY_KIB`` or 1 GiB.
        groups: Labels to unwrap; ``None`` unwraps every group of the licence.

    Returns:
        Group label -> 32-byte content key. For silent groups (AES-CTR) a wrong device gets random keys, by
        design: nothing tells it apart from the right one.

    Raises:
        ContainerError: The licence is for another model file (``content_id`` differs). This is a mismatch of
            two public files, not a key failure, so it is not :class:`InvalidKey` (which silent groups must never
            raise); also a group the file does not have, a wrap kind that disagrees with the file's transform,
            a KDF cost over the device's cap, or malformed helper data.
        InvalidTag: ``verify_key`` was given and the licence is unsigned or its signature does not verify.
        ProfileError: The secret is missing or was not expected; a requested group is not in the licence; the
            profile lacks a source the licence needs.
        InvalidKey: AES-GCM groups only: this device (or secret) is not the one the licence was issued for, or
            the licence was altered.
        FingerprintError: A fingerprint source cannot measure this device.

    Example:
        >>> cks = open_license(License.load("dev.lic"), content_id=cid, transforms={"main": "aes"})  # doctest: +SKIP
    """
    if not isinstance(lic, License):
        raise TypeError("lic must be a License; read one with License.load(path)")
    if not isinstance(content_id, bytes):
        raise TypeError("content_id must be bytes (the model file's content id)")
    if profile is not None and not isinstance(profile, DeviceProfile):
        raise TypeError("profile must be a DeviceProfile or None")
    if secret is not None and not isinstance(secret, bytes):
        raise TypeError("secret must be bytes, e.g. secret=b'...' or bytes.fromhex(...)")
    if not hmac.compare_digest(lic.content_id, content_id):
        raise ContainerError("this licence is for another model file (its content id differs); pass the licence "
                             "issued for this model")
    verify_signature(verify_key, lic.signature, _signed_bytes(lic),
                     unsigned="the licence is not signed but a vendor key was given; obtain a signed licence")
    if lic.secret and secret is None:
        raise ProfileError("this licence was issued with a vendor secret; pass it (secret=... / --secret-file)")
    if not lic.secret and secret is not None:
        raise ProfileError("this licence was issued without a vendor secret; do not pass one")
    labels = list(lic.wraps) if groups is None else list(dict.fromkeys(_labels(groups)))
    for label in labels:
        if label not in lic.wraps:
            raise ProfileError(f"this licence does not hold group {_show(label)} (it holds "
                               f"{', '.join(lic.wraps)}); ask the vendor for a licence that includes it")
        if label not in transforms:
            raise ContainerError(f"the licence holds group {_show(label)}, which this model file does not have; "
                                 "pass the licence issued for this model")
        if lic.wraps[label].alg != _alg_for(transforms[label]):
            raise ContainerError(f"the licence wraps group {label} with {lic.wraps[label].alg}, but the file's "
                                 f"transform {transforms[label]} needs {_alg_for(transforms[label])}; the licence "
                                 "was altered: ask the vendor for a fresh copy")
    # The device's own cap on Argon2id cost, checked before any work.
    kdf = KdfParams.from_json(lic.kdf.to_json(), max_memory_kib=max_kdf_memory_kib)
    kek = _kek(_open_device_key(lic, profile, kdf), secret, lic.salt)
    public = _json.canonical(lic._public())
    out = {}
    for label in labels:
        w = lic.wraps[label]
        if w.alg == CTR:
            out[label] = _ctr(kek, w.nonce, w.wrapped)
            continue
        try:
            out[label] = AESGCM(kek).decrypt(w.nonce, w.wrapped, _aad(lic.content_id, label, public))
        except _AEADInvalidTag:
            raise InvalidKey("this licence is for another device (or another vendor secret), or it was altered; "
                             "it cannot be opened here: ask the vendor for a licence issued to this device") from None
    return out
