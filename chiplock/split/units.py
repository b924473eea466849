"""A model as a chain of named *units*, the *streams* between them, and its division into pipeline stages.

A stage is a run of consecutive units; its tensors keep the names they have in the whole chain
(``layer2_0.conv1.weight``), so the stages' state dicts are disjoint and their union is the model's. A *stream*
is a channel space that flows across unit boundaries (a ResNet stage's residual stream, an MLP's hidden layer):
every tensor that writes it or reads it linearly is listed with the dimension that indexes its channels, so
:mod:`chiplock.split.boundary` can fold a channel map into the writers and its inverse into the readers.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from chiplock.errors import UnsupportedConfig

#: Architectures :func:`build_units` knows.
ARCHS = ("mlp", "resnet18")


@dataclass(frozen=True)
class StreamEntry:
    """One tensor touched by a stream's channel map.

    Args:
        name: The tensor's name in the chain's state dict.
        dim: The dimension that indexes the stream's channels.
        power: How the channel scale enters: ``1`` for a writer's affine output (scaled), ``0`` for a tensor
            that is only permuted (a convolution followed by batch norm, running statistics), ``-1`` for a
            reader's input weights (scaled by the inverse).
    """

    name: str
    dim: int
    power: int


@dataclass(frozen=True)
class Stream:
    """A channel space between units.

    Args:
        name: A label, unique in the chain.
        width: Channels.
        after: Indices of the units whose output lies in this stream (the boundaries it crosses).
        entries: The tensors a channel map of this stream changes.
    """

    name: str
    width: int
    after: tuple[int, ...]
    entries: tuple[StreamEntry, ...]


class Units(nn.Module):
    """A chain of named modules applied in order; a stage is a ``Units`` holding some of them.

    Example:
        >>> Units([("a", nn.Linear(4, 3)), ("b", nn.ReLU())])(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, units: Iterable[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, module in units:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


@dataclass(frozen=True)
class ArchSpec:
    """Which architecture to build (JSON-serialisable, so every rank builds the same one).

    Args:
        name: ``mlp`` (flatten, ``depth`` hidden layers of ``width`` with ReLU, a linear head) or ``resnet18``
            (:mod:`chiplock_demo.models`, small-image stem, first-stage channels ``width``).
        width: Hidden units (mlp) or first-stage channels (resnet18).
        depth: Hidden layers (mlp only).
        num_classes: Output classes.
        image_size: Input side (images are ``1 x image_size x image_size``).
        version: Schema version.
    """

    name: str = "mlp"
    width: int = 64
    depth: int = 3
    num_classes: int = 10
    image_size: int = 28
    version: int = 1

    def __post_init__(self) -> None:
        if self.name not in ARCHS:
            raise ValueError(f"ArchSpec.name {self.name!r} is unknown; use one of {', '.join(ARCHS)}")
        if self.width < 1 or self.depth < 1 or self.num_classes < 2 or self.image_size < 1:
            raise ValueError("ArchSpec: width, depth and image_size must be positive and num_classes at least 2")
        if self.version != 1:
            raise ValueError(f"ArchSpec version {self.version} is not supported (this chiplock knows 1)")


def _bn(prefix: str, power: int = 1) -> list[StreamEntry]:
    """A batch norm writing a stream: its affine output is scaled, its running statistics only permuted."""
    return [StreamEntry(f"{prefix}.weight", 0, power), StreamEntry(f"{prefix}.bias", 0, power),
            StreamEntry(f"{prefix}.running_mean", 0, 0), StreamEntry(f"{prefix}.running_var", 0, 0)]


def _mlp(spec: ArchSpec) -> tuple[list[tuple[str, nn.Module]], list[Stream]]:
    units: list[tuple[str, nn.Module]] = []
    streams: list[Stream] = []
    cin = spec.image_size ** 2
    for i in range(spec.depth):
        name = f"fc{i}"
        layers = ([nn.Flatten(1)] if i == 0 else []) + [nn.Linear(cin, spec.width), nn.ReLU()]
        units.append((name, nn.Sequential(*layers)))
        cin = spec.width
    units.append(("head", nn.Sequential(nn.Linear(cin, spec.num_classes))))
    for i in range(spec.depth):
        lin = 1 if i == 0 else 0
        reader = "head.0" if i == spec.depth - 1 else f"fc{i + 1}.0"
        streams.append(Stream(f"fc{i}", spec.width, (i,), (
            StreamEntry(f"fc{i}.{lin}.weight", 0, 1), StreamEntry(f"fc{i}.{lin}.bias", 0, 1),
            StreamEntry(f"{reader}.weight", 1, -1))))
    return units, streams


def _resnet18(spec: ArchSpec) -> tuple[list[tuple[str, nn.Module]], list[Stream]]:
    from chiplock.softlock.model_io import build_architecture

    model = build_architecture("resnet18", width=spec.width, num_classes=spec.num_classes,
                               image_size=spec.image_size)
    units: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv1, model.bn1, model.relu))]
    streams: list[Stream] = []
    entries = [StreamEntry("stem.0.weight", 0, 0), *_bn("stem.1")]
    after, width = [0], spec.width
    for li, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        for bi, block in enumerate(layer):
            name, k = f"layer{li}_{bi}", len(units)
            units.append((name, block))
            entries.append(StreamEntry(f"{name}.conv1.weight", 1, -1))
            if len(block.shortcut):
                # A projection shortcut reads the old stream and starts a new one with the block's output.
                entries.append(StreamEntry(f"{name}.shortcut.0.weight", 1, -1))
                streams.append(Stream(f"s{len(streams)}", width, tuple(after), tuple(entries)))
                width = block.conv2.out_channels
                entries, after = [StreamEntry(f"{name}.shortcut.0.weight", 0, 0), *_bn(f"{name}.shortcut.1")], []
            entries += [StreamEntry(f"{name}.conv2.weight", 0, 0), *_bn(f"{name}.bn2")]
            after.append(k)
    units.append(("head", nn.Sequential(model.pool, nn.Flatten(1), model.fc)))
    entries.append(StreamEntry("head.2.weight", 1, -1))
    streams.append(Stream(f"s{len(streams)}", width, tuple(after), tuple(entries)))
    return units, streams


def build_units(spec: ArchSpec, *, device: torch.device | str | None = None) -> tuple[Units, tuple[Stream, ...]]:
    """Build the architecture as a chain of units, and its streams.

    Args:
        spec: The architecture.
        device: Where to allocate; ``"meta"`` allocates nothing (what a rank does before keeping its own stage).

    Returns:
        ``(units, streams)``; the units are freshly initialised (seed torch first for reproducibility).

    Example:
        >>> units, streams = build_units(ArchSpec("mlp", width=32), device="meta")
        >>> [n for n, _ in units.named_children()]
        ['fc0', 'fc1', 'fc2', 'head']
    """
    with torch.device(device) if device is not None else nullcontext():
        units, streams = (_mlp if spec.name == "mlp" else _resnet18)(spec)
    return Units(units), tuple(streams)


def unit_sizes(units: Units) -> list[int]:
    """Parameter count of each unit, in order."""
    return [sum(p.numel() for p in m.parameters()) for m in units.children()]


def partition(sizes: Sequence[int], stages: int) -> list[list[int]]:
    """Cut a chain of units into ``stages`` non-empty runs minimising the largest run's size.

    Args:
        sizes: Each unit's size (parameters).
        stages: Runs wanted.

    Returns:
        The unit indices of each run.

    Raises:
        ValueError: ``stages`` is not between 1 and the number of units.

    Example:
        >>> partition([1, 1, 1, 9], 2)
        [[0, 1, 2], [3]]
    """
    n = len(sizes)
    if not isinstance(stages, int) or not 1 <= stages <= n:
        raise ValueError(f"stages={stages!r}: pass a number between 1 and the model's {n} units")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: the smallest largest-run size for the first j units in k runs; cut[k][j]: where run k starts.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    runs, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        runs.append(list(range(i, j)))
        j = i
    return runs[::-1]


@dataclass(frozen=True)
class Layout:
    """How a model is split: its architecture and the unit names of each stage (``split.json``).

    Args:
        arch: The architecture.
        stages: Unit names of each stage, in chain order.
        version: Schema version.
    """

    arch: ArchSpec
    stages: tuple[tuple[str, ...], ...]
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"Layout version {self.version} is not supported (this chiplock knows 1)")
        if not self.stages or not all(self.stages):
            raise ValueError("Layout.stages must hold at least one non-empty stage")

    @property
    def labels(self) -> tuple[str, ...]:
        """The group label of each stage in the locked container."""
        return tuple(f"stage{i}" for i in range(len(self.stages)))

    def stage_of(self, tensor: str) -> int:
        """The stage holding ``tensor`` (a name of the chain's state dict)."""
        unit = tensor.split(".", 1)[0]
        for i, names in enumerate(self.stages):
            if unit in names:
                return i
        raise KeyError(tensor)

    def to_json(self) -> str:
        return json.dumps({"chiplock_split": self.version, "arch": asdict(self.arch),
                           "stages": [list(s) for s in self.stages]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Parse ``split.json``.

        Raises:
            UnsupportedConfig: Not a split layout, or a field is malformed.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("chiplock_split") != 1:
                raise ValueError("not a version-1 split layout")
            layout = cls(ArchSpec(**data["arch"]), tuple(tuple(str(u) for u in s) for s in data["stages"]))
        except (ValueError, TypeError, KeyError) as e:
            raise UnsupportedConfig(f"split layout is malformed ({e}); write it with `chiplock split lock`") from None
        units, _ = build_units(layout.arch, device="meta")
        names = [n for n, _ in units.named_children()]
        if [u for s in layout.stages for u in s] != names:
            raise UnsupportedConfig(f"split layout's stages must cover the units {names} in order; write it with "
                                    "`chiplock split lock`")
        return layout


def make_layout(arch: ArchSpec, stages: int) -> Layout:
    """Split ``arch`` into ``stages`` runs of units of about equal parameter count.

    Example:
        >>> make_layout(ArchSpec("mlp", width=32), 2).stages
        (('fc0',), ('fc1', 'fc2', 'head'))
    """
    units, _ = build_units(arch, device="meta")
    names = [n for n, _ in units.named_children()]
    return Layout(arch, tuple(tuple(names[i] for i in run) for run in partition(unit_sizes(units), stages)))


def build_stage(layout: Layout, stage: int, *, device: torch.device | str = "cpu") -> tuple[Units, tuple[Stream, ...]]:
    """Materialise only stage ``stage``: the chain is built on the meta device (no memory), the stage's units are
    allocated (uninitialised: load its weights next), and the rest is dropped.

    Example:
        >>> stage, streams = build_stage(make_layout(ArchSpec("mlp", width=32), 2), 1)
    """
    if not 0 <= stage < len(layout.stages):
        raise ValueError(f"stage={stage}: this layout has stages 0..{len(layout.stages) - 1}")
    units, streams = build_units(layout.arch, device="meta")
    part = Units((n, getattr(units, n)) for n in layout.stages[stage])
    del units
    return part.to_empty(device=device), streams


def split_units(units: Units, layout: Layout) -> list[Units]:
    """The stages of a whole chain (sharing its modules): what a single process or the vendor uses."""
    return [Units((n, getattr(units, n)) for n in names) for names in layout.stages]


__all__ = ["ARCHS", "ArchSpec", "Layout", "Stream", "StreamEntry", "Units", "build_stage", "build_units",
           "make_layout", "partition", "split_units", "unit_sizes"]
