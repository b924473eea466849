"""Soft locking (expert layer): fine-tune a model so it works only in its authorized number format or sparsity.

Importing this package registers the built-in configurations: :class:`FP32`, :class:`MiniFloat` (with the
presets :func:`FP16`, :func:`BF16`, :func:`E4M3`, :func:`E5M2`), :class:`Int8`, :class:`NMSparsity` (2:4) and
:class:`MagnitudePruning`.
"""

from chiplock.softlock.registry import (FORMATS, Compose, Handler, config_from_dict, config_to_dict,
                                        example_names, get_handler, parse_config, register, registered_types)
from chiplock.softlock.fp32 import FP32
from chiplock.softlock.minifloat import BF16, E4M3, E5M2, FP16, MiniFloat, Overflow, Variant
from chiplock.softlock.int8 import Granularity, Int8
from chiplock.softlock.nm_sparsity import NMSparsity
from chiplock.softlock.magnitude import MagnitudePruning
from chiplock.softlock.scaled import Scaled
from chiplock.softlock.outliers import DenseAndSparse
from chiplock.softlock.apply import apply_config, set_config, strip_config, using_config

__all__ = [
    "BF16", "Compose", "DenseAndSparse", "E4M3", "E5M2", "FORMATS", "FP16", "FP32", "Granularity", "Handler", "Int8",
    "MagnitudePruning", "MiniFloat", "NMSparsity", "Overflow", "Scaled", "Variant", "apply_config", "config_from_dict",
    "config_to_dict", "example_names",
    "get_handler", "parse_config", "register", "registered_types", "set_config", "strip_config", "using_config",
]
