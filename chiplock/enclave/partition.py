"""Partition strategies: which part of a model runs on the host and which only inside the secure executor.

``split(model, strategy)`` returns a :class:`Partition`: a public JSON ``spec`` (no secret in it), the ``public``
tensors the host holds and the ``secure`` tensors only the executor holds. Inside the executor,
``build_secure(spec, secure)`` makes a :class:`SecurePart` whose ``run(op, inputs)`` answers the spec's ops; on the
host, :class:`HostModel` runs the public part and sends every secure step through a ``call(op, inputs)``, which is
the executor client (``chiplock.enclave.executor.Enclave``) or, in-process, a :class:`LocalCall`.

Strategies (``n`` = number of units, see :mod:`chiplock.enclave.models`):

=============  =====================================================  =========================================
strategy       secure (inside)                                        ops
=============  =====================================================  =========================================
``all-out``    nothing (the unprotected baseline)                     none
``last-k``     the last ``k`` units (DarkneTZ)                        ``tail``: activation -> logits
``first-k``    the first ``k`` units (Serdab)                         ``front``: image -> activation
``shadownet``  every unit's bias, post (BN, ReLU, pool) and the       ``post{i}``: disguised output -> activation
               disguise key; the host runs disguised linear layers
``teeslice``   narrow private slices + head; the public backbone      ``slices``: backbone features -> logits
               runs on the host (TEESlice)
``all-in``     the whole model                                        ``forward``: image -> logits
=============  =====================================================  =========================================

ShadowNet here is a simplification. Every linear unit (the classifier included) is disguised: its output
channels are scaled by random positive factors (log-uniform in :data:`SCALE_RANGE`), ``ceil(fake_ratio * C)``
fake channels (random filters with the norms of real ones) are added and all are shuffled; the bias, the post and
the key stay inside, one secure op per unit. The real ShadowNet (Sun et al., 2023) also masks the *input* of each
outsourced linear layer with a one-time random pad and removes the pad's contribution inside; we do not, so the
host sees every plain activation. An attacker with a public model of the same architecture (the victim was
fine-tuned from it) can undo the disguise: matching each disguised filter to its closest public filter by cosine
similarity recovers the permutation and the scales and drops the fakes (``chiplock.enclave.stealing`` measures
how well), as TEESlice found ShadowNet to leak about as much as no protection. Seeing the plain activations also
lets the host fit each unit's scales and bias by regression.

Example:
    >>> from chiplock.enclave.models import NetSpec, build
    >>> net = build(NetSpec(image=8, widths=(4, 8), fc=16))
    >>> p = split(net, "last-k", k=2)
    >>> host = HostModel(p.spec, p.public, LocalCall(build_secure(p.spec, p.secure)))
    >>> x = torch.rand(3, 1, 8, 8)
    >>> bool(torch.allclose(host(x), net.eval()(x), atol=1e-5))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chiplock.enclave.models import (
    NetSpec,
    SeqNet,
    TeeSliceNet,
    make_slices,
    make_units,
    run_slices,
)
from chiplock.errors import EnclaveError, UnsupportedConfig

STRATEGIES = ("all-out", "last-k", "first-k", "shadownet", "teeslice", "all-in")
SPEC_VERSION = 1
DEFAULT_MAX_BATCH = 1024
MAX_BATCH_CAP = 65536
#: ShadowNet's random per-channel scales are drawn log-uniformly from this range.
SCALE_RANGE = (0.5, 2.0)

_REDO = "re-create the partition with chiplock.enclave.partition.split"
_DTYPES = {"float32": torch.float32, "int64": torch.int64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Partition:
    """A partitioned model.

    Attributes:
        spec: public JSON: ``version``, ``strategy``, ``net`` (a :class:`NetSpec` JSON), ``k``, ``max_batch``,
            ``ops`` (per op, the declared per-sample ``inputs``/``outputs``), ``secure_tensors`` and
            ``public_tensors`` (name -> dtype and shape), plus ``fakes`` (shadownet) or ``ratio`` and ``start``
            (teeslice).
        public: what the host holds (the disguised linear weights for shadownet; the backbone for teeslice).
        secure: what only the executor holds.
    """

    spec: dict
    public: dict[str, Tensor] = field(repr=False)
    secure: dict[str, Tensor] = field(repr=False)


# --------------------------------------------------------------------------------------------------------------
# Layout: everything a spec declares, derived from (strategy, net, k, fakes, ratio). split() writes it; the
# executor and the host recompute it and refuse a spec that disagrees.

def _decl(t_or_dtype, shape=None) -> dict:
    if isinstance(t_or_dtype, Tensor):
        return {"dtype": _DTYPE_NAMES[t_or_dtype.dtype], "shape": list(t_or_dtype.shape)}
    return {"dtype": t_or_dtype, "shape": list(shape)}


def _op(inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]) -> dict:
    return {"inputs": [_decl("float32", s) for s in inputs], "outputs": [_decl("float32", s) for s in outputs]}


def _meta_state(module_fn) -> dict[str, Tensor]:
    with torch.device("meta"):
        return module_fn().state_dict()


def _unit_state(net: NetSpec) -> dict[str, Tensor]:
    return _meta_state(lambda: SeqNet(net))


def _unit_of(name: str) -> int:
    return int(name.split(".")[1])


def _layout(strategy: str, net: NetSpec, k: int | None, fakes: list[int] | None, ratio: float | None,
            start: int | None):
    """(ops, secure decls, public decls) for a strategy."""
    n, shapes = net.units, net.shapes()
    full = {name: _decl(t) for name, t in _unit_state(net).items()}
    if strategy == "all-out":
        return {}, {}, full
    if strategy == "all-in":
        return {"forward": _op([shapes[0]], [shapes[n]])}, full, {}
    if strategy == "last-k":
        secure = {m: d for m, d in full.items() if _unit_of(m) >= n - k}
        return ({"tail": _op([shapes[n - k]], [shapes[n]])}, secure,
                {m: d for m, d in full.items() if m not in secure})
    if strategy == "first-k":
        secure = {m: d for m, d in full.items() if _unit_of(m) < k}
        return ({"front": _op([shapes[0]], [shapes[k]])}, secure,
                {m: d for m, d in full.items() if m not in secure})
    if strategy == "shadownet":
        ops, secure, public = {}, {}, {}
        for i in range(n):
            w = full[f"units.{i}.lin.weight"]["shape"]
            c = w[0]
            public[f"shadow.{i}.weight"] = _decl("float32", [c + fakes[i], *w[1:]])
            secure[f"shadow.{i}.index"] = _decl("int64", [c])
            secure[f"shadow.{i}.scale"] = _decl("float32", [c])
            for m, d in full.items():
                if _unit_of(m) == i and m != f"units.{i}.lin.weight":
                    secure[m] = d
            spatial = shapes[i][1:] if len(shapes[i]) == 3 else ()
            ops[f"post{i}"] = _op([(c + fakes[i], *spatial)], [shapes[i + 1]])
        return ops, secure, public
    if strategy == "teeslice":
        public = {f"backbone.{m}": d for m, d in full.items() if _unit_of(m) < n - 1}
        secure = {m: _decl(t) for m, t in _meta_state(lambda: _SliceHolder(net, ratio, start)).items()}
        return {"slices": _op(shapes[start:n], [shapes[n]])}, secure, public
    raise AssertionError(strategy)


def _check_int(spec: dict, key: str, lo: int, hi: int, why: str) -> int:
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise EnclaveError(f"partition spec: {key!r} must be an integer in {lo}..{hi} {why}(got {v!r}); {_REDO}")
    return v


@dataclass(frozen=True)
class _Parsed:
    strategy: str
    net: NetSpec
    k: int | None
    max_batch: int
    fakes: list[int] | None
    ratio: float | None
    start: int | None
    ops: dict
    secure: dict
    public: dict


def parse_spec(spec: object) -> _Parsed:
    """Validate a partition spec (it may come from a file) and recompute its layout.

    Raises:
        EnclaveError: not a dict, unknown version/strategy/fields, values out of range, or declared ops or
            tensors that differ from what the strategy implies.
    """
    if not isinstance(spec, dict):
        raise EnclaveError(f"partition spec must be a JSON object (got {type(spec).__name__}); {_REDO}")
    version = spec.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != SPEC_VERSION:
        raise EnclaveError(f"partition spec version {version!r} is not supported (expected "
                           f"{SPEC_VERSION}); upgrade chiplock or {_REDO}")
    strategy = spec.get("strategy")
    if strategy not in STRATEGIES:
        raise EnclaveError(f"partition spec: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    allowed = {"version", "strategy", "net", "k", "max_batch", "ops", "secure_tensors", "public_tensors"}
    allowed |= {"shadownet": {"fakes"}, "teeslice": {"ratio", "start"}}.get(strategy, set())
    unknown = sorted(str(key) for key in spec if key not in allowed)
    missing = sorted(allowed - set(spec))
    if unknown or missing:
        raise EnclaveError(f"partition spec for {strategy!r}: unknown fields {unknown}, missing fields {missing}; "
                           f"{_REDO}")
    net = NetSpec.from_json(spec["net"])
    n = net.units
    k = None
    if strategy in ("last-k", "first-k"):
        k = _check_int(spec, "k", 1, n, f"(1..number of units) for {strategy} ")
    elif spec["k"] is not None:
        raise EnclaveError(f"partition spec: 'k' must be null for strategy {strategy!r}; {_REDO}")
    max_batch = _check_int(spec, "max_batch", 1, MAX_BATCH_CAP, "")
    fakes = ratio = start = None
    if strategy == "shadownet":
        fakes = spec["fakes"]
        widths = [*net.widths, net.fc, net.classes]
        if (not isinstance(fakes, list) or len(fakes) != n or
                any(not isinstance(f, int) or isinstance(f, bool) or not 0 <= f <= c for f, c in zip(fakes, widths))):
            raise EnclaveError(f"partition spec: 'fakes' must list {n} integers, each between 0 and its unit's "
                               f"width; {_REDO}")
    if strategy == "teeslice":
        ratio = spec["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise EnclaveError(f"partition spec: 'ratio' must be a number in (0, 1] (got {ratio!r}); {_REDO}")
        ratio = float(ratio)
        start = _check_int(spec, "start", 0, len(net.widths), "(the first conv unit with a slice) ")
    ops, secure, public = _layout(strategy, net, k, fakes, ratio, start)
    for key, want in (("ops", ops), ("secure_tensors", secure), ("public_tensors", public)):
        if spec[key] != want:
            raise EnclaveError(f"partition spec: {key!r} does not match strategy {strategy!r} on this net "
                               f"(altered or written by another version); {_REDO}")
    return _Parsed(strategy, net, k, max_batch, fakes, ratio, start, ops, secure, public)


def _check_tensors(where: str, got: object, want: dict) -> None:
    if not isinstance(got, dict):
        raise EnclaveError(f"{where} tensors must be a dict of name -> tensor (got {type(got).__name__})")
    missing = sorted(set(want) - set(got))
    extra = sorted(str(m) for m in set(got) - set(want))
    if missing or extra:
        raise EnclaveError(f"{where} tensors do not match the partition spec: missing {missing[:5]}, unexpected "
                           f"{extra[:5]}; load the tensors from the same partition as the spec")
    for name, d in want.items():
        t = got[name]
        if not isinstance(t, Tensor) or t.dtype != _DTYPES[d["dtype"]] or list(t.shape) != d["shape"]:
            desc = (f"{_DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape)}" if isinstance(t, Tensor)
                    else type(t).__name__)
            raise EnclaveError(f"{where} tensor {name!r} is {desc}, the spec declares {d['dtype']} {d['shape']}; "
                               "load the tensors from the same partition as the spec")


def _assign(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """Load ``tensors`` into a meta-device ``module`` without copying them (same storage), eval mode."""
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()


# --------------------------------------------------------------------------------------------------------------
# Modules holding part of a model under its plain state-dict names.

class _Units(nn.Module):
    """Units ``indices`` of a SeqNet, named ``units.{i}.*`` as in the full model."""

    def __init__(self, net: NetSpec, indices: range) -> None:
        super().__init__()
        all_units = make_units(net)
        self.indices = list(indices)
        self.units = nn.ModuleDict({str(i): all_units[i] for i in self.indices})

    def forward(self, x: Tensor) -> Tensor:
        for i in self.indices:
            x = self.units[str(i)](x)
        return x


class _BiasOnly(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(c))


class _ShadowSecure(nn.Module):
    """Per unit: the bias, the post, and the disguise key (``index`` of each real channel, its ``scale``)."""

    def __init__(self, net: NetSpec) -> None:
        super().__init__()
        units = make_units(net)
        for u in units:
            u.lin = _BiasOnly(u.lin.out_channels if isinstance(u.lin, nn.Conv2d) else u.lin.out_features)
        self.units = nn.ModuleList(units)
        self.shadow = nn.ModuleList(_ShadowKey(u.lin.bias.shape[0]) for u in units)

    def post(self, i: int, z: Tensor) -> Tensor:
        key, unit = self.shadow[i], self.units[i]
        view = (1, -1) + (1,) * (z.dim() - 2)
        y = z.index_select(1, key.index) / key.scale.view(view) + unit.lin.bias.view(view)
        return unit.post(y)


class _ShadowKey(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("index", torch.empty(c, dtype=torch.int64))
        self.register_buffer("scale", torch.empty(c))


class _SliceHolder(nn.Module):
    """TEESlice's private part: ``slices.{j}.*`` and ``head.*``."""

    def __init__(self, net: NetSpec, ratio: float, start: int) -> None:
        super().__init__()
        self.slices, self.head = make_slices(net, ratio, start)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return run_slices(self.slices, self.head, feats)


# --------------------------------------------------------------------------------------------------------------

def split(model: SeqNet | TeeSliceNet, strategy: str, *, k: int = 2, seed: int = 0, fake_ratio: float = 0.25,
          max_batch: int = DEFAULT_MAX_BATCH) -> Partition:
    """Partition ``model`` with ``strategy``.

    The returned tensors are copies; the model is not changed.

    Args:
        model: a :class:`SeqNet` (every strategy but teeslice) or a :class:`TeeSliceNet` (teeslice).
        strategy: one of :data:`STRATEGIES`.
        k: units inside for ``last-k`` and ``first-k`` (1..number of units); ignored otherwise.
        seed: seed of ShadowNet's disguise (permutation, scales, fake channels).
        fake_ratio: ShadowNet's fake channels per real channel, in [0, 1].
        max_batch: largest batch the executor accepts per call (1..65536).

    Returns:
        A :class:`Partition`.

    Raises:
        UnsupportedConfig: unknown strategy, ``k`` out of range, a model of the wrong kind for the strategy,
            or ``fake_ratio``/``max_batch`` out of range.

    Example:
        >>> from chiplock.enclave.models import NetSpec, build
        >>> sorted(split(build(NetSpec(image=8, widths=(4,))), "shadownet").spec["ops"])
        ['post0', 'post1', 'post2']
    """
    if strategy not in STRATEGIES:
        raise UnsupportedConfig(f"unknown partition strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "teeslice" and not isinstance(model, TeeSliceNet):
        raise UnsupportedConfig("the teeslice strategy needs a TeeSliceNet (a public backbone with trained "
                                "private slices); build one with chiplock.enclave.train.train_teeslice")
    if strategy != "teeslice" and not isinstance(model, SeqNet):
        raise UnsupportedConfig(f"the {strategy} strategy needs a SeqNet (got {type(model).__name__}); "
                                "partition a TeeSliceNet with strategy 'teeslice'")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH_CAP:
        raise UnsupportedConfig(f"max_batch must be an integer in 1..{MAX_BATCH_CAP} (got {max_batch!r})")
    net = model.spec
    n = net.units
    if strategy in ("last-k", "first-k") and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
        raise UnsupportedConfig(f"k={k!r} is out of range for {strategy}: this net has {n} units, use 1..{n}")
    if strategy == "shadownet" and not (isinstance(fake_ratio, (int, float)) and 0.0 <= fake_ratio <= 1.0):
        raise UnsupportedConfig(f"fake_ratio must be a number in [0, 1] (got {fake_ratio!r})")
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    spec: dict = {"version": SPEC_VERSION, "strategy": strategy, "net": net.to_json(),
                  "k": k if strategy in ("last-k", "first-k") else None, "max_batch": max_batch}
    fakes = ratio = start = None
    if strategy == "shadownet":
        widths = [*net.widths, net.fc, net.classes]
        fakes = [math.ceil(fake_ratio * c) for c in widths]
        spec["fakes"] = fakes
    if strategy == "teeslice":
        ratio, start = model.ratio, model.start
        spec.update(ratio=ratio, start=start)
    ops, secure_decl, public_decl = _layout(strategy, net, spec["k"], fakes, ratio, start)
    spec.update(ops=ops, secure_tensors=secure_decl, public_tensors=public_decl)
    if strategy == "shadownet":
        public, secure = _disguise(state, net, fakes, seed)
    else:
        public = {m: state[m] for m in public_decl}
        secure = {m: state[m] for m in secure_decl}
    return Partition(spec, public, secure)


def _disguise(state: dict[str, Tensor], net: NetSpec, fakes: list[int], seed: int):
    """ShadowNet's disguise of every linear unit: scale each output channel by a random positive factor, add
    fake channels, shuffle; the host gets the disguised weights, the executor the key, the bias and the post."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
    public, secure = {}, {}
    for i in range(net.units):
        w = state[f"units.{i}.lin.weight"]
        c = w.shape[0]
        scale = torch.exp(torch.rand(c, generator=gen) * (hi - lo) + lo)
        real = w * scale.view(-1, *([1] * (w.dim() - 1)))
        # Fake filters: random directions with the norm of a randomly chosen real (scaled) filter, so a filter's
        # norm alone does not tell a fake from a real one.
        norms = real.flatten(1).norm(dim=1)
        pick = torch.randint(0, c, (fakes[i],), generator=gen)
        fake = torch.randn((fakes[i], *w.shape[1:]), generator=gen)
        fake = fake / fake.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1)))
        fake = fake * norms[pick].view(-1, *([1] * (w.dim() - 1)))
        perm = torch.randperm(c + fakes[i], generator=gen)
        public[f"shadow.{i}.weight"] = torch.cat([real, fake])[perm].contiguous()
        secure[f"shadow.{i}.index"] = torch.argsort(perm)[:c].contiguous()
        secure[f"shadow.{i}.scale"] = scale
        for m, t in state.items():
            if _unit_of(m) == i and m != f"units.{i}.lin.weight":
                secure[m] = t
    return public, secure


class SecurePart:
    """The secure part of a partition, built inside the executor from the spec and the secure tensors only.

    Attributes:
        spec: the validated spec.
        ops: the spec's ``ops`` (name -> declared per-sample inputs/outputs).
        max_batch: the largest leading batch dimension :meth:`run` accepts.
        final_ops: the ops that return the model's logits.
    """

    def __init__(self, parsed: _Parsed, spec: dict, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        self._p, self.spec, self._module = parsed, spec, module
        self.ops, self.max_batch = parsed.ops, parsed.max_batch
        #: The ops whose output is the model's logits (what a labels-only executor reduces to the argmax).
        final = {"tail", "forward", "slices", f"post{parsed.net.units - 1}"}
        if parsed.strategy == "first-k" and parsed.k == parsed.net.units:
            final.add("front")  # every unit inside: the front's output is the logits
        self.final_ops = frozenset(final & set(self.ops))
        self._bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def parameters_bytes(self) -> int:
        """Bytes of secure tensors this part holds."""
        return self._bytes

    def check_inputs(self, op: str, inputs: object) -> None:
        """Raise :class:`EnclaveError` unless ``inputs`` fit op ``op``'s declaration (same batch, <= max_batch)."""
        if op not in self.ops:
            raise EnclaveError(f"unknown op {op!r} for this {self._p.strategy} partition; "
                               f"expected one of {sorted(self.ops) or 'none'}")
        decl = self.ops[op]["inputs"]
        if not isinstance(inputs, (list, tuple)) or len(inputs) != len(decl):
            got = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            raise EnclaveError(f"op {op!r} takes {len(decl)} input tensor(s), got {got}")
        batch = None
        for j, (t, d) in enumerate(zip(inputs, decl)):
            if not isinstance(t, Tensor) or t.dtype != _DTYPES[d["dtype"]] or t.dim() != len(d["shape"]) + 1 \
                    or list(t.shape[1:]) != d["shape"]:
                desc = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise EnclaveError(f"op {op!r} input {j} is {desc}; expected {d['dtype']} [batch, "
                                   f"{', '.join(map(str, d['shape']))}]")
            if batch is None:
                batch = t.shape[0]
            if t.shape[0] != batch or not 1 <= t.shape[0] <= self.max_batch:
                raise EnclaveError(f"op {op!r}: every input needs the same batch size in 1..{self.max_batch} "
                                   f"(got {t.shape[0]}); split the batch")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                # NaN/Inf carry no honest request; refusing them removes one of the host's probing tools.
                raise EnclaveError(f"op {op!r} input {j} holds NaN or infinite values; send finite inputs")

    def example_inputs(self, op: str, batch: int = 1) -> list[Tensor]:
        """Zero tensors that fit op ``op`` (for a warm-up run).

        Raises:
            EnclaveError: unknown op.
        """
        if op not in self.ops:
            raise EnclaveError(f"unknown op {op!r}; expected one of {sorted(self.ops) or 'none'}")
        return [torch.zeros((batch, *d["shape"]), dtype=_DTYPES[d["dtype"]]) for d in self.ops[op]["inputs"]]

    @torch.no_grad()
    def run(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        """Run op ``op`` on ``inputs``.

        Raises:
            EnclaveError: unknown op, wrong number of inputs, or an input of the wrong dtype/shape/batch.
        """
        self.check_inputs(op, inputs)
        s = self._p.strategy
        if s == "shadownet":
            out = self._module.post(int(op[4:]), inputs[0])
        elif s == "teeslice":
            out = self._module(list(inputs))
        else:
            out = self._module(inputs[0])
        return [out.contiguous()]


def build_secure(spec: dict, secure: dict[str, Tensor]) -> SecurePart:
    """Build the secure part from the spec and the secure tensors, keeping the tensors' storage (no copy).

    The executor passes tensors that live in secret memory: they become the modules' parameters and buffers as
    they are (``load_state_dict(assign=True, strict=True)``), so no plaintext copy lands on the heap.

    Args:
        spec: the partition spec (validated strictly; it comes from a file).
        secure: the secure tensors, exactly those the spec declares, with the declared dtypes and shapes.

    Returns:
        A :class:`SecurePart`.

    Raises:
        EnclaveError: the spec is malformed or the tensors do not match it.

    Example:
        >>> from chiplock.enclave.models import NetSpec, build
        >>> p = split(build(NetSpec(image=8, widths=(4,))), "all-in")
        >>> build_secure(p.spec, p.secure).run("forward", [torch.zeros(1, 1, 8, 8)])[0].shape
        torch.Size([1, 10])
    """
    parsed = parse_spec(spec)
    _check_tensors("secure", secure, parsed.secure)
    s, net, n = parsed.strategy, parsed.net, parsed.net.units
    with torch.device("meta"):
        module = {"all-out": lambda: None,
                  "all-in": lambda: _Units(net, range(n)),
                  "last-k": lambda: _Units(net, range(n - (parsed.k or 0), n)),
                  "first-k": lambda: _Units(net, range(parsed.k or 0)),
                  "shadownet": lambda: _ShadowSecure(net),
                  "teeslice": lambda: _SliceHolder(net, parsed.ratio, parsed.start)}[s]()
    if module is not None:
        _assign(module, secure)
    if s == "shadownet":
        for i, fk in enumerate(parsed.fakes):
            key = module.shadow[i]
            c = key.index.shape[0]
            # Checked here because a bad key would silently read out of range or divide by zero.
            if (key.index.min() < 0 or key.index.max() >= c + fk or key.index.unique().numel() != c
                    or not bool(torch.isfinite(key.scale).all()) or not bool((key.scale > 0).all())):
                raise EnclaveError(f"secure tensors for unit {i}'s disguise key are invalid; load the tensors "
                                   "from the same partition as the spec")
    return SecurePart(parsed, spec, module, secure)


class HostModel(nn.Module):
    """The partitioned model as the host runs it; every secure step goes through ``call(op, inputs)``.

    Inference only: always in eval mode, no gradients. Batches larger than the spec's ``max_batch`` are split.

    Args:
        spec: the partition spec.
        public: the public tensors (used as they are, not copied).
        call: the executor client (``Enclave``) or a :class:`LocalCall`.

    Raises:
        EnclaveError: the spec is malformed or ``public`` does not match it.
    """

    def __init__(self, spec: dict, public: dict[str, Tensor], call: Callable[[str, list[Tensor]], list[Tensor]]):
        super().__init__()
        self._p = p = parse_spec(spec)
        _check_tensors("public", public, p.public)
        self.call, self.strategy, n = call, p.strategy, p.net.units
        with torch.device("meta"):
            if p.strategy == "all-out":
                self.part = _Units(p.net, range(n))
            elif p.strategy == "last-k":
                self.part = _Units(p.net, range(n - p.k))
            elif p.strategy == "first-k":
                self.part = _Units(p.net, range(p.k, n))
            elif p.strategy == "teeslice":
                self.part = nn.Module()
                self.part.backbone = _Units(p.net, range(n - 1))
            elif p.strategy == "shadownet":
                self.part = nn.Module()
                self.part.shadow = nn.ModuleList(_DisguisedWeight(public[f"shadow.{i}.weight"].shape)
                                                 for i in range(n))
            else:
                self.part = nn.Module()
        _assign(self.part, public)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> HostModel:
        return super().train(False)  # inference only: the public BN statistics must not move

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        mb = self._p.max_batch
        if x.shape[0] > mb:
            return torch.cat([self.forward(x[i:i + mb]) for i in range(0, x.shape[0], mb)])
        s, n = self.strategy, self._p.net.units
        if s == "all-out":
            return self.part(x)
        if s == "all-in":
            return self._call("forward", [x])
        if s == "last-k":
            return self._call("tail", [self.part(x)])
        if s == "first-k":
            return self.part(self._call("front", [x]))
        if s == "teeslice":
            feats = [x]
            for i in self.part.backbone.indices:
                feats.append(self.part.backbone.units[str(i)](feats[-1]))
            return self._call("slices", feats[self._p.start:])
        for i in range(n):  # shadownet
            w = self.part.shadow[i].weight
            z = F.conv2d(x, w, padding=1) if w.dim() == 4 else F.linear(x, w)
            x = self._call(f"post{i}", [z])
        return x

    def _call(self, op: str, inputs: list[Tensor]) -> Tensor:
        out = self.call(op, [t.contiguous() for t in inputs])
        want = [inputs[0].shape[0], *self._p.ops[op]["outputs"][0]["shape"]]
        if (not isinstance(out, (list, tuple)) or len(out) != 1 or not isinstance(out[0], Tensor)
                or out[0].dtype != torch.float32 or list(out[0].shape) != want):
            raise EnclaveError(f"the executor's answer to op {op!r} is not one float32 tensor of shape {want}; "
                               "restart the executor with the container this host model was loaded from")
        return out[0]


class _DisguisedWeight(nn.Module):
    def __init__(self, shape) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class LocalCall:
    """In-process stand-in for the executor client, with the same counters.

    Attributes:
        switches: calls made (world switches).
        bytes_in: tensor bytes sent in.
        bytes_out: tensor bytes returned.

    Example:
        >>> from chiplock.enclave.models import NetSpec, build
        >>> p = split(build(NetSpec(image=8, widths=(4,))), "all-in")
        >>> call = LocalCall(build_secure(p.spec, p.secure))
        >>> _ = HostModel(p.spec, p.public, call)(torch.zeros(2, 1, 8, 8)); call.switches
        1
    """

    def __init__(self, part: SecurePart) -> None:
        self.part = part
        self.switches = self.bytes_in = self.bytes_out = 0

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        out = self.part.run(op, inputs)
        self.switches += 1
        self.bytes_in += sum(t.numel() * t.element_size() for t in inputs)
        self.bytes_out += sum(t.numel() * t.element_size() for t in out)
        return out
