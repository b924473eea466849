"""chiplock: lock machine-learning models to the hardware they are licensed for.

The safe verbs live here; :mod:`chiplock.keys`, :mod:`chiplock.transforms` and :mod:`chiplock.fingerprint`
are public expert layers.
"""

from chiplock.errors import (AlreadyFinalized, ChiplockError, ContainerError, FileAccessError, FingerprintError,
                             InvalidKey, InvalidTag, KeyFileError, OutputError, ProfileError, UnsupportedConfig,
                             WeakKey)
from chiplock.profile import DeviceProfile, enroll
from chiplock.config import GroupConfig, LockConfig
from chiplock.license import ContentKeys, License, LowEntropyWarning, issue_license
from chiplock.api import inspect, iter_unlock, load_state_dict, lock, unlock, unlock_to_file

__version__ = "0.1.0"

__all__ = [
    "AlreadyFinalized", "ChiplockError", "ContainerError", "DeviceProfile", "FingerprintError", "InvalidKey",
    "InvalidTag", "LowEntropyWarning", "ProfileError", "UnsupportedConfig", "WeakKey", "enroll", "inspect",
    "lock", "unlock", "FileAccessError", "KeyFileError", "OutputError", "GroupConfig", "LockConfig", "ContentKeys",
    "License", "issue_license", "iter_unlock", "load_state_dict", "unlock_to_file",
]
