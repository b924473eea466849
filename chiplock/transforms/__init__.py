"""Parameter transforms (expert layer): ``aes``, ``shuffle`` and ``pre-aes``, selectable by name."""

from chiplock.transforms.base import (DTYPE_BY_NAME, DTYPE_NAMES, Encoded, Transform, available_transforms,
                                      get_transform, register_transform)
from chiplock.transforms import aes as _aes, pre_aes as _pre_aes, shuffle as _shuffle  # noqa: F401

__all__ = ["DTYPE_BY_NAME", "DTYPE_NAMES", "Encoded", "Transform", "available_transforms", "get_transform",
           "register_transform"]
