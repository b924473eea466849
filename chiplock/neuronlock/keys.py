"""Bind a neuron lock's password to chiplock's key hierarchy (content key -> licence -> device).

A neuron-locked model's *password key* is the content key of one group labelled ``neuronlock`` whose transform is
``pre-aes``, the silent kind: its licence wraps the key with AES-256-CTR, not GCM (see :mod:`chiplock.license`).
So a device opens its licence, gets the 32-byte key and re-derives the password with
:func:`chiplock.neuronlock.derive_password`; a wrong device (or a wrong vendor secret) unwraps a random key
instead, derives a wrong but plausible password and gets no error, exactly like a ``pre-aes`` container. Nothing
in the licence or the model lets anyone test a device-key guess: there is no tag to check, only the accuracy of
the model on labelled data, which costs a full Argon2id run plus an evaluation per guess.

The vendor keeps the :class:`~chiplock.license.ContentKeys` (``keys.save(path)``, mode 0600) and issues one
licence per device with :func:`issue`, as ``chiplock license issue`` does for containers.

Example:
    >>> keys = new_keys()                                        # vendor, once per model
    >>> lic = issue(keys, profile, secret=vendor_secret)          # doctest: +SKIP
    >>> key = password_key(lic, secret=vendor_secret)             # doctest: +SKIP  (on the device)
"""

from __future__ import annotations

from typing import Any

from chiplock.errors import KeyFileError
from chiplock.keys.kdf import KdfParams
from chiplock.license import ContentKeys, License, issue_license, open_license
from chiplock.profile import DeviceProfile

__all__ = ["LABEL", "TRANSFORM", "check_keys", "issue", "new_keys", "password_key", "password_key_from_keys"]

#: The group label of a neuron lock's password key in its content keys and licences.
LABEL = "neuronlock"
#: Its transform: silent (``pre-aes``), so the licence wraps it with AES-CTR and a wrong device gets no error.
TRANSFORM = "pre-aes"
_TRANSFORMS = {LABEL: TRANSFORM}
_KEYS_HINT = "pass the keys file `chiplock neuronlock train` wrote for this model (MODEL.keys)"


def new_keys() -> ContentKeys:
    """Draw the content keys of a new neuron-locked model: a content id and one random ``neuronlock`` key.

    Returns:
        :class:`~chiplock.license.ContentKeys` with the single group ``neuronlock`` (transform ``pre-aes``).
        Save them with ``keys.save(path)`` (mode 0600): they unlock the model on any machine.

    Example:
        >>> keys = new_keys()
        >>> list(keys.groups), keys.silent("neuronlock")
        (['neuronlock'], True)
    """
    return ContentKeys.new(_TRANSFORMS)


def check_keys(keys: Any) -> ContentKeys:
    """Check that ``keys`` are a neuron lock's content keys (a ``neuronlock`` group of the silent kind).

    Returns:
        ``keys``, unchanged.

    Raises:
        TypeError: ``keys`` is not a :class:`~chiplock.license.ContentKeys`.
        KeyFileError: No ``neuronlock`` group, or one whose transform detects a wrong key (its licences would
            use an authenticated wrap, an offline oracle for device-key guesses).
    """
    if not isinstance(keys, ContentKeys):
        raise TypeError("keys must be ContentKeys; load them with ContentKeys.load('model.keys') or draw them "
                        "with chiplock.neuronlock.keys.new_keys()")
    if LABEL not in keys.groups:
        raise KeyFileError(f"these content keys hold no {LABEL!r} group (they hold {', '.join(keys.groups)}), so "
                           f"they are not a neuron-locked model's; {_KEYS_HINT}")
    if not keys.silent(LABEL):
        raise KeyFileError(f"the {LABEL!r} group uses transform {keys.groups[LABEL].transform!r}, which detects a "
                           f"wrong key; a neuron lock's key must be silent ({TRANSFORM}); {_KEYS_HINT}")
    return keys


def password_key_from_keys(keys: ContentKeys) -> bytes:
    """The password key on the vendor's side, straight from the content keys (no device involved).

    Args:
        keys: The model's content keys (see :func:`new_keys`).

    Returns:
        The 32-byte key to pass to :func:`chiplock.neuronlock.derive_password`.

    Raises:
        TypeError, KeyFileError: See :func:`check_keys`.

    Example:
        >>> len(password_key_from_keys(new_keys()))
        32
    """
    return check_keys(keys).groups[LABEL].key


def issue(keys: ContentKeys, profile: DeviceProfile, *, secret: bytes | None = None, signing_key: Any = None,
          allow_weak_key: bool = False, kdf: KdfParams | None = None) -> License:
    """Issue one device's licence for a neuron-locked model: its ``neuronlock`` key wrapped with AES-CTR.

    A thin layer over :func:`chiplock.license.issue_license` (``groups=["neuronlock"]``); see it for the
    arguments. The licence is public; it opens nothing without the device (and the secret, if one is given).

    Returns:
        The :class:`~chiplock.license.License`; ``lic.save(path)`` writes it.

    Raises:
        TypeError, KeyFileError: ``keys`` are not a neuron lock's (see :func:`check_keys`).
        WeakKey: The device key rests on fewer than 64 estimated bits and no vendor secret (see
            :func:`chiplock.license.check_key_strength`), unless ``allow_weak_key``.

    Example:
        >>> issue(keys, DeviceProfile.load("dev.json"), secret=vendor_secret).save("dev.lic")  # doctest: +SKIP
    """
    return issue_license(check_keys(keys), profile, secret=secret, groups=[LABEL], signing_key=signing_key,
                         allow_weak_key=allow_weak_key, kdf=kdf)


def password_key(license: License, *, content_id: bytes | None = None, profile: DeviceProfile | None = None,
                 secret: bytes | None = None, verify_key: Any = None,
                 max_kdf_memory_kib: int | None = None) -> bytes:
    """The password key on a device: open its licence (:func:`chiplock.license.open_license`).

    Args:
        license: The device's licence, from :func:`issue` (``License.load(path)``).
        content_id: The model's content id (16 bytes), to refuse a licence of another model; ``None`` skips
            that check (a wrong model's licence then simply gives a wrong password).
        profile: Open as this profile's device would; ``None`` (the normal case) measures this device, as
            :func:`chiplock.unlock` does.
        secret: The vendor secret, if the licence was issued with one.
        verify_key: The vendor's Ed25519 public key; the licence must then carry a valid signature by it.
        max_kdf_memory_kib: The most Argon2id memory the licence may ask of this device.

    Returns:
        32 bytes. On a wrong device (or with a wrong secret) a random-looking key, by design: no error.

    Raises:
        TypeError: ``license`` is not a :class:`~chiplock.license.License`.
        ContainerError: The licence is for another model (``content_id``), wraps the key with GCM (altered),
            asks more Argon2id memory than allowed, or carries malformed helper data.
        ProfileError: The licence holds no ``neuronlock`` key, or the secret is missing or unexpected.
        InvalidTag: ``verify_key`` was given and the signature is missing or does not verify.
        FingerprintError: This device cannot be measured.

    Example:
        >>> key = password_key(License.load("dev.lic"), secret=vendor_secret)  # doctest: +SKIP
    """
    if not isinstance(license, License):
        raise TypeError("license must be a License; read one with License.load(path)")
    if content_id is None:
        content_id = license.content_id
    keys = open_license(license, content_id=content_id, transforms=_TRANSFORMS, profile=profile, secret=secret,
                        verify_key=verify_key, max_kdf_memory_kib=max_kdf_memory_kib, groups=[LABEL])
    return keys[LABEL]
