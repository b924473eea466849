"""Configuration of the hard lock: which transform and key each tensor gets (as torchao's ``quantize_(model,
config)`` takes one config object).

Example:
    >>> cfg = LockConfig(transform="pre-aes",
    ...                  groups=(GroupConfig("head", transform="aes", patterns=("lm_head.*",)),))
    >>> cfg.assign("lm_head.weight"), cfg.assign("layers.0.weight")
    (('head', 'aes'), ('main', 'pre-aes'))
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from chiplock.container.schema import label_problem

#: The group of every tensor no pattern claims.
DEFAULT_GROUP = "main"


@dataclass(frozen=True)
class GroupConfig:
    """A group of tensors locked under their own random content key.

    Args:
        label: The key label (1-64 characters of ``[A-Za-z0-9_.-]``); a licence opens groups by label.
        transform: ``"pre-aes"``, ``"aes"``, ``"shuffle"`` or any registered transform.
        patterns: ``fnmatch`` patterns on tensor names; a tensor joins the first group one of whose patterns
            matches it.
    """

    label: str
    transform: str = "pre-aes"
    patterns: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        problem = label_problem(self.label)
        if problem:
            raise ValueError(f"GroupConfig: {problem}")
        if isinstance(self.patterns, str) or not all(isinstance(p, str) and p for p in self.patterns):
            raise ValueError("GroupConfig.patterns must be a tuple of non-empty strings, e.g. ('lm_head.*',)")
        if not self.patterns:
            raise ValueError("GroupConfig.patterns is empty; pass at least one pattern, e.g. ('*',)")


@dataclass(frozen=True)
class LockConfig:
    """How :func:`chiplock.lock` locks each tensor.

    Args:
        transform: The transform of the default group ``"main"`` (tensors no group claims).
        groups: Extra groups, each with its own key, transform and name patterns (first match wins).
        version: Config format version.
    """

    transform: str = "pre-aes"
    groups: tuple[GroupConfig, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"LockConfig version {self.version} is not supported (this chiplock knows 1)")
        if not isinstance(self.transform, str):
            raise ValueError("LockConfig.transform must be a transform name such as 'pre-aes'")
        # Types first: a stray dict or string in groups must get this message, not an AttributeError.
        if isinstance(self.groups, str) or not all(isinstance(g, GroupConfig) for g in self.groups):
            raise ValueError("LockConfig.groups must hold GroupConfig objects")
        labels = [g.label for g in self.groups]
        if len(set(labels)) != len(labels):
            raise ValueError("LockConfig.groups has a label twice; give each group its own label")
        for g in self.groups:
            if g.label == DEFAULT_GROUP and g.transform != self.transform:
                raise ValueError(f"group {DEFAULT_GROUP!r} is the default group, whose transform is "
                                 f"LockConfig.transform ({self.transform!r}); give the group another label")

    def assign(self, name: str) -> tuple[str, str]:
        """The (group label, transform) of tensor ``name``."""
        for g in self.groups:
            if any(fnmatch.fnmatchcase(name, p) for p in g.patterns):
                return g.label, g.transform
        return DEFAULT_GROUP, self.transform
