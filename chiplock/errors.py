"""Exceptions raised by chiplock.

Every failure the user can act on derives from :class:`ChiplockError`; its message says what to do.
Authentication failures (:class:`InvalidTag`) carry no detail on purpose.
"""

from __future__ import annotations


class ChiplockError(Exception):
    """Root of every chiplock error."""


class FingerprintError(ChiplockError):
    """A hardware fingerprint could not be measured or reproduced on this device."""


class InvalidKey(ChiplockError):
    """The key derived on this device does not open the file (wrong hardware or wrong secret).

    Only transforms that can tell raise it (``aes``, ``shuffle``). ``pre-aes`` never does, by design.
    """


class InvalidTag(ChiplockError):
    """The container's bytes were altered after it was written, or its signature does not verify."""

    def __init__(self, message: str = "the file was altered after it was locked (integrity check failed); "
                 "obtain an intact copy from the vendor") -> None:
        super().__init__(message)


class ContainerError(ChiplockError):
    """The file is not a chiplock container, is truncated, or has an unsupported version."""


class UnsupportedConfig(ChiplockError):
    """A dtype, transform, source or option is not supported."""


class ProfileError(ChiplockError):
    """A device profile is missing, unreadable or does not match the container."""


class WeakKey(ChiplockError):
    """The key would rest on too little estimated entropy (< 64 bits) and no vendor secret.

    Pass a vendor secret, add a unit-binding source (``sram``, ``tpm``), or override with ``allow_weak_key=True``
    (``--allow-weak-key``) knowing that an attacker can enumerate the fingerprint.
    """


class AlreadyFinalized(ChiplockError):
    """A one-shot object (a key derivation) was used twice."""


class FileAccessError(ChiplockError):
    """A file or folder cannot be read or written: missing, permission denied, path too long or under a file,
    disk full. The message names the path and what to do."""


class OutputError(FileAccessError):
    """An output path is refused or cannot be written.

    Refused: the output is the input, a folder, under a file, in a missing folder (chiplock never creates
    folders), or a file of another kind (a plaintext model where a container goes, without ``force``; a container
    where plaintext weights go, ever).
    """


class KeyFileError(ChiplockError):
    """A signing or verification key file is missing, unreadable, of the wrong kind (public where private is
    expected or the reverse), or not an Ed25519 key."""


class EnclaveError(ChiplockError):
    """The secure-world executor refused a request or could not start: a malformed or oversized message, a
    tensor of the wrong dtype or shape, a secure part over its memory budget, an executor that died or cannot be
    hardened where hardening was required. The message says which and what to do."""
