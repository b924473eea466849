"""Small image classifiers built from *units*, the granularity at which a model is partitioned.

A unit is one linear layer (``lin``: a 3x3 convolution or a fully connected layer) plus what follows it
(``post``). :class:`SeqNet` is a VGG-like stack of units; :class:`TeeSliceNet` is a frozen public
:class:`SeqNet` backbone beside narrow private *slices* and a private head (TEESlice).

Example:
    >>> spec = NetSpec(image=8, widths=(8, 16), fc=32)
    >>> net = build(spec, seed=0)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from chiplock.errors import EnclaveError

#: Caps on what a spec (which may come from a file) can ask for.
MAX_IN_CHANNELS = 16
MAX_IMAGE = 256
MAX_UNITS_CONV = 8
MAX_WIDTH = 1024
MAX_FC = 4096
MAX_CLASSES = 1000
MAX_PARAMS = 64 * 1024 * 1024  # 256 MiB of float32


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class NetSpec:
    """The architecture of a :class:`SeqNet`: ``len(widths)`` 3x3 conv units (a 2x2 max-pool after every second
    one), one hidden fully connected unit of ``fc`` features and a classifier unit of ``classes`` outputs.

    Args:
        in_channels: image channels (1..16).
        image: image side in pixels (square images, 4..256).
        widths: output channels of each conv unit (1..8 units, each 1..1024).
        fc: width of the hidden fully connected unit (1..4096).
        classes: number of classes (2..1000).
        version: spec version, 1.

    Raises:
        ValueError: a field is out of range or the net would exceed 64 Mi parameters.

    Example:
        >>> NetSpec(image=8, widths=(8, 16)).units
        4
    """

    in_channels: int = 1
    image: int = 28
    widths: tuple[int, ...] = (16, 32, 32, 64)
    fc: int = 64
    classes: int = 10
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.widths, list):
            object.__setattr__(self, "widths", tuple(self.widths))
        if self.version != 1 or not _is_int(self.version):
            raise ValueError(f"NetSpec.version must be 1 (got {self.version!r}); upgrade chiplock to read newer specs")
        for name, lo, hi in (("in_channels", 1, MAX_IN_CHANNELS), ("image", 4, MAX_IMAGE), ("fc", 1, MAX_FC),
                             ("classes", 2, MAX_CLASSES)):
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise ValueError(f"NetSpec.{name} must be an integer in {lo}..{hi} (got {v!r})")
        if not isinstance(self.widths, tuple) or not 1 <= len(self.widths) <= MAX_UNITS_CONV:
            raise ValueError(f"NetSpec.widths must be a tuple of 1..{MAX_UNITS_CONV} conv widths (got {self.widths!r})")
        for w in self.widths:
            if not _is_int(w) or not 1 <= w <= MAX_WIDTH:
                raise ValueError(f"NetSpec.widths entries must be integers in 1..{MAX_WIDTH} (got {w!r})")
        if self.final_side < 1:
            raise ValueError(f"NetSpec.image={self.image} is too small for {len(self.widths)} conv units "
                             f"({self.pools} 2x2 pools); use a larger image or fewer conv units")
        if self.num_params > MAX_PARAMS:
            raise ValueError(f"NetSpec describes {self.num_params} parameters, over the cap of {MAX_PARAMS}; "
                             "use narrower widths, a smaller fc or a smaller image")

    @property
    def pools(self) -> int:
        return len(self.widths) // 2

    @property
    def final_side(self) -> int:
        side = self.image
        for _ in range(self.pools):
            side //= 2
        return side

    @property
    def flat(self) -> int:
        """Features after the last conv unit (flattened)."""
        return self.widths[-1] * self.final_side ** 2

    @property
    def units(self) -> int:
        """Number of units: the conv units, the hidden fc unit and the classifier."""
        return len(self.widths) + 2

    @property
    def num_params(self) -> int:
        n, cin = 0, self.in_channels
        for w in self.widths:
            n += cin * w * 9 + w + 4 * w  # conv weight + bias, BN weight/bias/running mean/var
            cin = w
        return n + self.flat * self.fc + self.fc + self.fc * self.classes + self.classes

    def pooled(self, i: int) -> bool:
        """Whether conv unit ``i`` ends with a 2x2 max-pool."""
        return i % 2 == 1

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample activation shapes: ``shapes()[0]`` is the image, ``shapes()[i + 1]`` unit ``i``'s output."""
        out: list[tuple[int, ...]] = [(self.in_channels, self.image, self.image)]
        side = self.image
        for i, w in enumerate(self.widths):
            side = side // 2 if self.pooled(i) else side
            out.append((w, side, side))
        out[-1] = (self.flat,)  # the last conv unit's post flattens
        return out + [(self.fc,), (self.classes,)]

    def to_json(self) -> dict:
        """A JSON-able dict (``widths`` as a list)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_json(cls, d: object) -> NetSpec:
        """Parse :meth:`to_json` output strictly.

        Raises:
            EnclaveError: ``d`` is not a dict of the known fields with valid values.
        """
        if not isinstance(d, dict):
            raise EnclaveError(f"the net spec must be a JSON object (got {type(d).__name__}); "
                               "re-create the partition with chiplock.enclave.partition.split")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise EnclaveError(f"the net spec has unknown fields {unknown}; it was written by a newer chiplock or "
                               "altered, re-create the partition")
        d = dict(d)
        if "widths" in d:
            if not isinstance(d["widths"], (list, tuple)) or len(d["widths"]) > MAX_UNITS_CONV:
                raise EnclaveError(f"the net spec's widths must be a list of at most {MAX_UNITS_CONV} integers")
            d["widths"] = tuple(d["widths"])
        try:
            return cls(**d)
        except (ValueError, TypeError) as exc:
            raise EnclaveError(f"invalid net spec: {exc}") from None


class Unit(nn.Module):
    """One linear layer (``lin``) and what follows it (``post``)."""

    def __init__(self, lin: nn.Module, post: nn.Module) -> None:
        super().__init__()
        self.lin, self.post = lin, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.lin(x))


def conv_post(width: int, *, pool: bool, flatten: bool) -> nn.Sequential:
    """BN + ReLU, then a 2x2 max-pool and a flatten where asked."""
    layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    if flatten:
        layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def make_units(spec: NetSpec) -> list[Unit]:
    """The units of a :class:`SeqNet` for ``spec`` (on the current default device)."""
    units, cin, last = [], spec.in_channels, len(spec.widths) - 1
    for i, w in enumerate(spec.widths):
        units.append(Unit(nn.Conv2d(cin, w, 3, padding=1), conv_post(w, pool=spec.pooled(i), flatten=i == last)))
        cin = w
    units.append(Unit(nn.Linear(spec.flat, spec.fc), nn.ReLU()))
    units.append(Unit(nn.Linear(spec.fc, spec.classes), nn.Identity()))
    return units


class SeqNet(nn.Module):
    """A VGG-like classifier as a list of units; see :class:`NetSpec` for the layout.

    State-dict names are ``units.{i}.lin.weight``, ``units.{i}.post.0.running_mean`` and so on.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.units = nn.ModuleList(make_units(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_units(x, 0, len(self.units))

    def forward_units(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run ``units[start:stop]`` on ``x`` (the input of unit ``start``)."""
        for unit in self.units[start:stop]:
            x = unit(x)
        return x


def build(spec: NetSpec, seed: int = 0) -> SeqNet:
    """A freshly initialised :class:`SeqNet`, deterministic in ``seed``.

    Example:
        >>> build(NetSpec(image=8, widths=(4,)), seed=1).spec.units
        3
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SeqNet(spec)


def slice_widths(spec: NetSpec, ratio: float) -> list[int]:
    """Widths of the TEESlice slices: ``ceil(ratio * width)`` for every conv unit and the hidden fc unit."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1] (got {ratio!r})")
    return [max(1, math.ceil(ratio * w)) for w in (*spec.widths, spec.fc)]


def default_start(spec: NetSpec) -> int:
    """The first unit that gets a slice by default: the one after the first full-resolution block (unit 2), and
    never past the last conv unit.

    The early, full-resolution units hold generic features that the public backbone already provides; slicing
    them would cost the most (largest feature maps) for the least gain. At least one conv slice stays: without
    one the private part is an fc slice and a head, which a host choosing inputs extracts exactly
    (:func:`chiplock.enclave.extraction.steal_teeslice`).
    """
    return max(0, min(2, len(spec.widths) - 1))


class SliceLin(nn.Module):
    """A slice's linear layer after its first: a 1x1 convolution of the backbone's feature (``tap``) plus a 3x3
    convolution of the previous slice's output (``own``). Cheaper than one 3x3 convolution of both concatenated,
    for the same accuracy on our data sets."""

    def __init__(self, backbone_channels: int, slice_channels: int, out: int) -> None:
        super().__init__()
        self.tap = nn.Conv2d(backbone_channels, out, 1, bias=False)
        self.own = nn.Conv2d(slice_channels, out, 3, padding=1)

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.tap(b) + self.own(s)


def _check_start(spec: NetSpec, start: int) -> int:
    if not _is_int(start) or not 0 <= start <= len(spec.widths):
        raise ValueError(f"start must be an integer in 0..{len(spec.widths)} (got {start!r})")
    return start


def make_slices(spec: NetSpec, ratio: float, start: int) -> tuple[nn.ModuleList, nn.Linear]:
    """The private slices and head of a :class:`TeeSliceNet`.

    There is one slice per conv unit from ``start`` on and one for the hidden fc unit, each of width
    ``slice_widths(spec, ratio)[unit]``. The first conv slice is a 3x3 convolution of the backbone's input of
    its unit; the next ones are :class:`SliceLin`; each is followed by the unit's kind of post (BN, ReLU, pool,
    flatten). The fc slice reads the backbone's flattened conv features (and the last conv slice's); the head
    reads the backbone's hidden fc features concatenated with the fc slice's.
    """
    sw, last = slice_widths(spec, ratio), len(spec.widths) - 1
    slices = []
    for j in range(_check_start(spec, start), last + 1):
        cb = spec.widths[j - 1] if j else spec.in_channels
        lin = nn.Conv2d(cb, sw[j], 3, padding=1) if j == start else SliceLin(cb, sw[j - 1], sw[j])
        slices.append(Unit(lin, conv_post(sw[j], pool=spec.pooled(j), flatten=j == last)))
    extra = sw[last] * spec.final_side ** 2 if start <= last else 0
    slices.append(Unit(nn.Linear(spec.flat + extra, sw[-1]), nn.ReLU()))
    return nn.ModuleList(slices), nn.Linear(spec.fc + sw[-1], spec.classes)


def run_slices(slices: nn.ModuleList, head: nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
    """Logits from the backbone features ``[input of unit start, ..., last conv output, hidden fc output]``."""
    s = None
    for b, unit in zip(feats, slices[:-1]):
        s = unit.post(unit.lin(b) if s is None else unit.lin(b, s))
    s = slices[-1](feats[-2] if s is None else torch.cat([feats[-2], s], 1))
    return head(torch.cat([feats[-1], s], 1))


class TeeSliceNet(nn.Module):
    """TEESlice: a frozen public backbone plus narrow private slices and a private head.

    The slices read the backbone's per-unit features and the backbone never reads the slices, so the host can
    run the backbone alone and hand its features (from unit ``start``'s input on) to the secure side in one call
    per batch. The backbone stays in eval mode and gets no gradient; only ``slices`` and ``head`` train.

    State-dict names: ``backbone.units.{i}...`` (public), ``slices.{j}...`` (``j`` counts from the first
    slice) and ``head.*`` (private).

    Args:
        backbone: the public model; it is copied, not modified.
        ratio: slice width as a fraction of each unit's width, in (0, 1].
        seed: initialisation seed of the slices and head.
        start: first conv unit with a slice (0..number of conv units); default :func:`default_start`.
    """

    def __init__(self, backbone: SeqNet, ratio: float = 0.25, seed: int = 0, start: int | None = None) -> None:
        super().__init__()
        self.spec, self.ratio = backbone.spec, float(ratio)
        self.start = _check_start(self.spec, default_start(self.spec) if start is None else start)
        self.backbone = SeqNet(backbone.spec)
        self.backbone.load_state_dict(backbone.state_dict())
        self.backbone.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.slices, self.head = make_slices(self.spec, ratio, self.start)

    def train(self, mode: bool = True) -> TeeSliceNet:
        super().train(mode)
        self.backbone.eval()  # frozen: its BN statistics must not move
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[x, unit 0 output, ..., hidden fc output]`` of the backbone (its classifier is not run)."""
        feats = [x]
        for unit in self.backbone.units[:-1]:
            feats.append(unit(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_slices(self.slices, self.head, self.features(x)[self.start:])
