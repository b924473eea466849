"""Red team: what a host that controls every input to the executor's ops can extract from the answers.

The stealing harness (:mod:`chiplock.enclave.stealing`) measures the TEESlice protocol: a few victim-labelled
*natural* images. The host is far stronger than that: it sends any well-formed tensor to any op of the partition,
as often as it likes, and reads every float of the answer. This module plays that attacker:

* :func:`steal_last1` (last-k, k=1): the tail is one affine map; ``d + 1`` chosen inputs (zero and the basis
  vectors) solve ``W`` and ``b`` exactly.
* :func:`steal_relu1` (last-k, k=2, and any op that is a one-hidden-layer ReLU net of a host-controlled vector,
  such as TEESlice's fc slice): the critical-point attack of Carlini, Jagielski and Mironov (CRYPTO 2020): find
  the kinks of the output along random lines, take the jump of the Jacobian at each kink (a rank-1 matrix
  ``W2[:, j] W1[j]``), resolve each neuron's sign from the affine remainder, then polish with a float64 fit.
  Recovers the hidden layer up to ReLU's positive rescaling (an exact symmetry), i.e. a functionally equal model.
* :func:`steal_shadownet`: every ``post{i}`` op is a per-channel ``relu(A z[idx] + B)`` of the disguised linear
  output; constant probes on each disguised channel give ``idx`` (the permutation), ``A`` (scale and BN folded)
  and ``B`` (bias and BN folded) exactly, the fake channels are the ones no output reads, and the public disguised
  weights then become the victim's weights (BN folded): a model with the victim's accuracy from a few hundred
  queries.
* :func:`steal_first1` (first-k, k=1): the front is conv + BN + ReLU; a few scaled pixel deltas give the folded
  conv weights exactly. :func:`fit_op` is the learning-based fallback for deeper fronts/tails (regression of a
  same-architecture copy on many chosen queries with the op's exact outputs as targets).
* :func:`steal_teeslice_head`: TEESlice's ``slices`` op reads the backbone's hidden fc output only through the
  private head, so ``fc + 1`` chosen queries give those head columns exactly; the fc slice is a one-hidden-layer
  ReLU net of the host-supplied flat features and falls to :func:`steal_relu1` too.

:class:`Counted` counts queries (rows sent) and calls; the ``Mitigated`` wrappers prototype answers an executor
could give instead (labels only, rounding, noise, a query budget, an input range check) so that their effect on
each attack can be measured (``measure_mitigations``). They wrap a ``call`` and change nothing in the executor.

Example:
    >>> from chiplock.enclave.models import NetSpec, build
    >>> from chiplock.enclave.partition import split, build_secure, LocalCall
    >>> p = split(build(NetSpec(image=8, widths=(4, 8), fc=16)), "last-k", k=1)
    >>> got = steal_last1(p.spec, p.public, LocalCall(build_secure(p.spec, p.secure)))
    >>> got.queries, bool((got.weights["units.3.lin.weight"] - p.secure["units.3.lin.weight"]).abs().max() < 1e-5)
    (17, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from chiplock.enclave.models import NetSpec, SeqNet
from chiplock.enclave.partition import parse_spec
from chiplock.errors import EnclaveError

Call = Callable[[str, list[Tensor]], list[Tensor]]

__all__ = [
    "Averaged",
    "Budget",
    "Counted",
    "Extraction",
    "InputRange",
    "LabelsOnly",
    "Noisy",
    "Relu1",
    "Rounded",
    "accuracy",
    "canonical_relu1",
    "fit_op",
    "fold_bn",
    "folded_model",
    "match_relu1",
    "measure_mitigations",
    "steal_first1",
    "steal_last1",
    "steal_last1_labels",
    "steal_last2",
    "steal_relu1",
    "steal_shadownet",
    "steal_teeslice",
    "steal_teeslice_head",
]


# --------------------------------------------------------------------------------------------------------------
# Query accounting and the mitigation prototypes (wrappers around a call)
# --------------------------------------------------------------------------------------------------------------

class Counted:
    """Wraps a ``call``; counts rows sent (``queries``) and calls (world switches); splits at ``max_batch``."""

    def __init__(self, call: Call, max_batch: int = 1024) -> None:
        self.call, self.max_batch = call, max_batch
        self.queries = self.calls = 0

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        n = inputs[0].shape[0]
        outs = []
        for i in range(0, n, self.max_batch):
            part = [t[i:i + self.max_batch].to(torch.float32).contiguous() for t in inputs]
            outs.append(self.call(op, part)[0])
            self.calls += 1
            self.queries += part[0].shape[0]
        return [torch.cat(outs)]


class LabelsOnly:
    """Mitigation prototype: the final op answers a one-hot of the argmax instead of logits."""

    def __init__(self, call: Call, final_ops: tuple[str, ...] = ("tail", "forward", "slices")) -> None:
        self.call, self.final_ops = call, final_ops

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        out = self.call(op, inputs)[0]
        if op in self.final_ops:
            out = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(torch.float32)
        return [out]


class Rounded:
    """Mitigation prototype: answers rounded to ``decimals`` decimal places."""

    def __init__(self, call: Call, decimals: int = 2) -> None:
        self.call, self.decimals = call, decimals

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        return [torch.round(self.call(op, inputs)[0], decimals=self.decimals)]


class Noisy:
    """Mitigation prototype: Gaussian noise of standard deviation ``sigma`` on every answer."""

    def __init__(self, call: Call, sigma: float = 0.01, seed: int = 0) -> None:
        self.call, self.sigma = call, sigma
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        out = self.call(op, inputs)[0]
        return [out + self.sigma * torch.randn(out.shape, generator=self.gen)]


class Budget:
    """Mitigation prototype: at most ``limit`` rows per executor lifetime; then every call is refused."""

    def __init__(self, call: Call, limit: int) -> None:
        self.call, self.limit, self.used = call, limit, 0

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        n = inputs[0].shape[0]
        if self.used + n > self.limit:
            raise EnclaveError(f"query budget of {self.limit} rows is spent; restart with a new licence")
        self.used += n
        return self.call(op, inputs)


class InputRange:
    """Mitigation prototype: refuse inputs outside ``[lo, hi]`` (e.g. the range real activations take) or
    non-finite ones."""

    def __init__(self, call: Call, lo: float, hi: float) -> None:
        self.call, self.lo, self.hi = call, lo, hi

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        for t in inputs:
            if not bool(torch.isfinite(t).all()) or float(t.min()) < self.lo or float(t.max()) > self.hi:
                raise EnclaveError(f"op {op!r}: inputs must lie in [{self.lo}, {self.hi}]")
        return self.call(op, inputs)


@dataclass
class Extraction:
    """What an attack recovered.

    Attributes:
        weights: recovered tensors under the victim's state-dict names (BN folded where noted in ``info``).
        model: a runnable stolen model (``None`` when the attack recovers a part only).
        queries: rows sent to the executor; ``calls``: calls made (world switches).
        info: attack-specific numbers (neurons found, errors, ...).
    """

    weights: dict[str, Tensor]
    model: nn.Module | None
    queries: int
    calls: int
    info: dict[str, Any] = field(default_factory=dict)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _counted(call: Call, spec: dict) -> Counted:
    return call if isinstance(call, Counted) else Counted(call, parse_spec(spec).max_batch)


def _with(spec: NetSpec, tensors: dict[str, Tensor]) -> SeqNet:
    """A SeqNet holding ``tensors`` (the rest at identity BN / zeros: only use where all weights are given)."""
    net = SeqNet(spec)
    sd = net.state_dict()
    for name, t in tensors.items():
        sd[name] = t.detach().to(sd[name].dtype).reshape(sd[name].shape).clone()
    net.load_state_dict(sd)
    return net.eval()


# --------------------------------------------------------------------------------------------------------------
# last-k, k = 1: an affine tail
# --------------------------------------------------------------------------------------------------------------

def steal_last1(spec: dict, public: dict[str, Tensor], call: Call, *, scale: float = 1.0) -> Extraction:
    """Solve the last-1 tail (the classifier) from ``d + 1`` chosen queries: zero, then ``scale`` times each
    basis vector. Exact up to float32 rounding.

    Raises:
        EnclaveError: the partition is not last-k with k=1.
    """
    p = parse_spec(spec)
    if p.strategy != "last-k" or p.k != 1:
        raise EnclaveError("steal_last1 attacks a last-k partition with k=1")
    c = _counted(call, spec)
    d = p.ops["tail"]["inputs"][0]["shape"][0]
    x = torch.cat([torch.zeros(1, d), scale * torch.eye(d)])
    y = c("tail", [x])[0].double()
    b = y[0]
    w = ((y[1:] - b) / scale).T.contiguous()
    n = p.net.units
    weights = {f"units.{n - 1}.lin.weight": w.float(), f"units.{n - 1}.lin.bias": b.float()}
    return Extraction(weights, _with(p.net, {**public, **weights}), c.queries, c.calls)


# --------------------------------------------------------------------------------------------------------------
# One-hidden-layer ReLU nets of a host-controlled vector: the critical-point attack
# --------------------------------------------------------------------------------------------------------------

def _kinks_on_line(f, x0: Tensor, v: Tensor, *, span: float, grid: int, tol: float) -> list[tuple[float, Tensor]]:
    """Kinks of ``t -> f(x0 + t v)`` in ``[-span, span]``: ``(t, jump of the slope)``, ``t`` exact by line
    intersection."""
    ts = torch.linspace(-span, span, grid, dtype=torch.float64)
    cell = (ts[1] - ts[0]).item()
    delta = 0.45 * cell
    pts = torch.cat([ts - delta, ts, ts + delta])
    y = f(x0 + pts[:, None] * v)
    ym, y0, yp = y[:grid], y[grid:2 * grid], y[2 * grid:]
    left = (y0 - ym) / delta     # slope just left of each grid point
    right = (yp - y0) / delta    # slope just right of it
    found: list[tuple[float, Tensor]] = []

    def noise(fx: Tensor, step: float) -> float:
        # A slope from two float32 answers ``step`` apart is off by a few ulps of the answer over the step.
        return 4 * 1.2e-7 * (1.0 + float(fx.abs().max())) / step

    def linear(fa, sa, na, fb, sb, nb, a, b) -> bool:
        # A kink is a change of slope beyond the slopes' float noise (and beyond ``tol`` of their size).
        st = max(tol * (1.0 + max(float(sa.abs().max()), float(sb.abs().max()))), na + nb)
        vt = 16 * 1.2e-7 * (1.0 + max(float(fa.abs().max()), float(fb.abs().max())))
        return bool((sa - sb).abs().max() < st and (fb - fa - sa * (b - a)).abs().max() < vt)

    def refine(a, fa, b, fb, depth):
        # Slopes measured inside [a, b], an eighth of it from each end: a slope taken at an end could straddle
        # a kink just outside, and a straddling slope makes a false kink pass the checks below.
        e = (b - a) / 8
        qa, qb = f(x0 + torch.tensor([[a + e], [b - e]], dtype=torch.float64) * v)
        sa, sb = (qa - fa) / e, (fb - qb) / e
        na, nb = noise(torch.stack([fa, qa]), e), noise(torch.stack([fb, qb]), e)
        if linear(fa, sa, na, fb, sb, nb, a, b):
            return
        vt = 16 * 1.2e-7 * (1.0 + max(float(fa.abs().max()), float(fb.abs().max())))
        ds = sa - sb
        t = float(((fb - fa + sa * a - sb * b) * ds).sum() / (ds * ds).sum().clamp_min(1e-300))
        if a + e < t < b - e:
            # The kink, and a point on each side, must lie on the two lines.
            la, lb = 0.5 * (a + e + t), 0.5 * (t + b - e)
            ft, fla, flb = f(x0 + torch.tensor([[t], [la], [lb]], dtype=torch.float64) * v)
            if ((ft - fa - sa * (t - a)).abs().max() < vt and (ft - fb - sb * (t - b)).abs().max() < vt
                    and (fla - fa - sa * (la - a)).abs().max() < vt and (flb - fb - sb * (lb - b)).abs().max() < vt):
                if float(ds.abs().max()) > 3 * (na + nb):
                    found.append((t, sb - sa))
                return
        if depth > 30 or b - a < 1e-7 * span:
            return
        m = 0.5 * (a + b)
        fm = f(x0 + torch.tensor([[m]], dtype=torch.float64) * v)[0]
        refine(a, fa, m, fm, depth + 1)
        refine(m, fm, b, fb, depth + 1)

    # Grid cells whose end slopes agree and whose ends lie on one line are linear; the rest are refined.
    for i in range(grid - 1):
        if not linear(y0[i], right[i], noise(y[[grid + i, 2 * grid + i]], delta), y0[i + 1], left[i + 1],
                      noise(y[[i + 1, grid + i + 1]], delta), ts[i].item(), ts[i + 1].item()):
            refine(ts[i].item(), y0[i], ts[i + 1].item(), y0[i + 1], 0)
    return sorted(found, key=lambda k: k[0])


def _jacobian(f, p: Tensor, h: float) -> Tensor:
    """Central-difference Jacobian of ``f`` at ``p`` (a float64 vector); coordinates whose one-sided
    differences disagree (a kink within ``h``) are redone with a smaller step."""
    d = p.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    steps = torch.full((d,), h, dtype=torch.float64)
    jac = None
    todo = torch.arange(d)
    for _ in range(6):
        e = eye[todo] * steps[todo, None]
        y = f(torch.cat([p[None], p + e, p - e]))
        y0, yp, ym = y[0], y[1:1 + len(todo)], y[1 + len(todo):]
        fwd, bwd = (yp - y0) / steps[todo, None], (y0 - ym) / steps[todo, None]
        cols = 0.5 * (fwd + bwd)
        if jac is None:
            jac = torch.zeros(y.shape[1], d, dtype=torch.float64)
        jac[:, todo] = cols.T
        bad = ((fwd - bwd).abs().max(1).values > 1e-3 * (1 + fwd.abs().max(1).values))
        if not bool(bad.any()):
            break
        todo = todo[bad]
        steps[todo] /= 16
    return jac


class _RegionJacobians:
    """Jacobians of ``f`` at the middle of each linear region ``[edges[i], edges[i+1]]`` of a line, cached."""

    def __init__(self, f, x0: Tensor, v: Tensor, edges: list[float], r0: float) -> None:
        self.f, self.x0, self.v, self.edges, self.r0 = f, x0, v, edges, r0
        self.cache: dict[int, Tensor] = {}

    def __call__(self, region: int) -> Tensor:
        if region not in self.cache:
            e = self.edges
            mid, width = 0.5 * (e[region] + e[region + 1]), e[region + 1] - e[region]
            self.cache[region] = _jacobian(self.f, self.x0 + mid * self.v, 1e-2 * self.r0 * max(width, 1e-6))
        return self.cache[region]


@dataclass
class Relu1:
    """A one-hidden-layer ReLU net ``w2 @ relu(w1 @ x + b1) + b2`` (float64)."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def canonical_relu1(net: Relu1) -> Relu1:
    """Rescale each hidden neuron so that ``|[w1_j, b1_j]| = 1`` (ReLU's positive homogeneity leaves the
    function unchanged) and sort the neurons by ``b1``: two functionally equal nets then have equal weights."""
    n = torch.cat([net.w1, net.b1[:, None]], 1).norm(dim=1).clamp_min(1e-300)
    w1, b1, w2 = net.w1 / n[:, None], net.b1 / n, net.w2 * n[None]
    order = torch.argsort(b1)
    return Relu1(w1[order], b1[order], w2[:, order], net.b2)


def match_relu1(got: Relu1, want: Relu1) -> dict[str, float]:
    """Max abs errors of ``got`` against ``want`` after canonicalising both and pairing neurons by direction."""
    g, w = canonical_relu1(got), canonical_relu1(want)
    gg = torch.cat([g.w1, g.b1[:, None]], 1)
    ww = torch.cat([w.w1, w.b1[:, None]], 1)
    sim = ww @ gg.T
    pair = sim.argmax(1)
    live = w.w2.norm(dim=0) > 1e-6  # a neuron the output never reads cannot be observed
    return {"neurons": int(w.w1.shape[0]), "found": int(g.w1.shape[0]), "unobservable": int((~live).sum()),
            "w1": float((ww[live] - gg[pair[live]]).abs().max()) if live.any() else 0.0,
            "w2": float((w.w2[:, live] - g.w2[:, pair[live]]).abs().max()) if live.any() else 0.0,
            "b2": float((w.b2 - g.b2).abs().max())}


def steal_relu1(f: Callable[[Tensor], Tensor], d: int, *, center: Tensor, hidden: int | None = None,
                lines: int = 12, span: float = 16.0, grid: int = 2048, refine_points: int = 0, seed: int = 0,
                tol: float = 1e-4) -> tuple[Relu1, dict]:
    """Extract ``f(x) = w2 relu(w1 x + b1) + b2`` from chosen queries (Carlini et al. 2020).

    Args:
        f: the oracle, float64 ``(B, d) -> (B, m)`` (it rounds to float32 on the way, as the executor does).
        d: input dimension.
        center: a typical input (lines pass near it, with directions of its norm).
        hidden: the hidden width, if known (the spec says it): stop searching once that many are found.
        lines: most random lines searched for kinks.
        refine_points: if > 0, polish the extracted weights by a float64 fit on that many more queries.

    Returns:
        ``(net, info)``: the recovered net and numbers (neurons found, rank-1 quality).
    """
    gen = torch.Generator().manual_seed(seed)
    center = center.detach().double()
    r0 = max(float(center.norm()), 1.0)
    rows, biases, outs = [], [], []
    groups: list[list[int]] = []  # kinks of one neuron (equal (w1, b1) up to sign), seen on several lines
    used = 0
    for _ in range(lines):
        if hidden is not None and len(groups) >= hidden:
            break  # every neuron the spec declares is found
        used += 1
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        v = v / v.norm() * r0
        x0 = center + 0.1 * r0 * torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        kinks = _kinks_on_line(f, x0, v, span=span, grid=grid, tol=tol)
        if not kinks:
            continue
        ts = [k[0] for k in kinks]
        # A kink where a neuron found on an earlier line crosses this line is skipped (no Jacobian needed).
        if groups:
            kw = torch.stack([rows[g[0]] for g in groups])
            kb = torch.tensor([biases[g[0]] for g in groups], dtype=torch.float64)
            known = (-(kw @ x0 + kb) / (kw @ v)).tolist()
        else:
            known = []
        edges = [ts[0] - 0.5 * (ts[1] - ts[0] if len(ts) > 1 else 1.0), *ts,
                 ts[-1] + 0.5 * (ts[-1] - ts[-2] if len(ts) > 1 else 1.0)]
        jac = _RegionJacobians(f, x0, v, edges, r0)

        for j, t in enumerate(ts):
            if any(abs(t - k) < 1e-5 * span for k in known):
                continue
            dj = jac(j + 1) - jac(j)
            u, sv, vh = torch.linalg.svd(dj, full_matrices=False)
            scale = max(float(jac(j).norm()), float(jac(j + 1).norm()), 1e-300)
            jump = kinks[j][1]
            if (sv[0] < 1e-3 * scale or sv[1] > 1e-2 * sv[0]
                    or float((dj @ v - jump).norm()) > 0.05 * float(jump.norm())):
                # Two kinks too close together (not rank 1), or a Jacobian spoilt by a kink within its steps
                # (its jump along the line disagrees with the one the line search measured).
                continue
            r, uu = vh[0], u[:, 0] * sv[0]
            if float(r @ v) < 0:
                r, uu = -r, -uu
            b = -float(r @ (x0 + t * v))
            nrm = math.hypot(float(r.norm()), b)
            rows.append(r / nrm)
            biases.append(b / nrm)
            outs.append(uu * nrm)
            known.append(t)
            key = torch.cat([rows[-1], torch.tensor([biases[-1]], dtype=torch.float64)])
            for g in groups:
                if abs(float(key @ torch.cat([rows[g[0]], torch.tensor([biases[g[0]]], dtype=torch.float64)]))) > 0.999:
                    g.append(len(rows) - 1)
                    break
            else:
                groups.append([len(rows) - 1])
    if not rows:
        raise EnclaveError("no kink found: the op does not look like a ReLU net of its input")
    keys = torch.stack([torch.cat([r, torch.tensor([b], dtype=torch.float64)]) for r, b in zip(rows, biases)])
    w1, b1, w2 = [], [], []
    for g in groups:
        sgn = [1.0 if float(keys[i] @ keys[g[0]]) > 0 else -1.0 for i in g]
        k = sum(s * keys[i] for s, i in zip(sgn, g)) / len(g)
        w1.append(k[:-1])
        b1.append(k[-1])
        w2.append(sum(outs[i] for i in g) / len(g))  # u is invariant to the (w1, b1) sign, see below
    w1, b1, w2 = torch.stack(w1), torch.stack(b1), torch.stack(w2, 1)
    # For a true neuron relu(s (w1 x + b1)) with s = +-1 the Jacobian jump gives the same (u, r); since
    # relu(-z) = relu(z) - z, f - sum u relu(w1 x + b1) is affine, with slope -sum_{s=-1} u_j w1_j^T: solve for s.
    pts = center + r0 * torch.randn(d + 1, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    rem = f(pts) - torch.relu(pts @ w1.T + b1) @ w2.T
    a = torch.linalg.lstsq(torch.cat([pts, torch.ones(d + 1, 1, dtype=torch.float64)], 1), rem).solution
    slope = a[:-1].T  # (m, d)
    basis = torch.stack([torch.outer(w2[:, j], w1[j]).reshape(-1) for j in range(w1.shape[0])], 1)
    alpha = torch.linalg.lstsq(basis, slope.reshape(-1, 1)).solution[:, 0]
    flip = alpha < -0.5
    w1[flip], b1[flip] = -w1[flip], -b1[flip]
    b2 = (f(pts) - torch.relu(pts @ w1.T + b1) @ w2.T).mean(0)
    net = Relu1(w1, b1, w2, b2)
    info = {"lines": used, "neurons_found": int(w1.shape[0]), "sign_margin": float((alpha.abs() - 0.5).abs().min())}
    if refine_points:
        net = _polish(f, net, center, r0, refine_points, gen)
    return net, info


def _polish(f, net: Relu1, center: Tensor, r0: float, n: int, gen) -> Relu1:
    """A float64 least-squares fit from the extracted weights on ``n`` fresh chosen queries."""
    d = net.w1.shape[1]
    # Radii up to 8 r0, as far as the kink search went: every hidden neuron switches somewhere in the sample,
    # so each one's weights are pinned down (a neuron that never switches would only be fitted as a linear term).
    radius = 8 * r0 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    x = center + radius * torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = f(x)
    ps = [t.detach().clone().requires_grad_(True) for t in (net.w1, net.b1, net.w2, net.b2)]
    opt = torch.optim.LBFGS(ps, max_iter=500, history_size=50, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((Relu1(*ps)(x) - y) ** 2).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Relu1(*(p.detach() for p in ps))


def _oracle(c: Counted, op: str, shapes: list[list[int]], slot: int, fixed: list[Tensor] | None = None):
    """``f(x)`` in float64 for op ``op``, with ``x`` fed (as float32) to input ``slot``, the rest ``fixed``."""
    def f(x: Tensor) -> Tensor:
        ins = []
        for j, s in enumerate(shapes):
            if j == slot:
                ins.append(x.to(torch.float32).reshape(x.shape[0], *s))
            else:
                ins.append(fixed[j].expand(x.shape[0], *s).contiguous())
        return c(op, ins)[0].double()
    return f


def steal_last2(spec: dict, public: dict[str, Tensor], call: Call, *, center: Tensor, lines: int = 12,
                seed: int = 0, refine_points: int = 0) -> Extraction:
    """Extract a last-k tail with k=2 (hidden fc + ReLU + classifier) with :func:`steal_relu1`.

    Args:
        center: a typical tail input (e.g. the host's own activations of a public image, averaged).

    Raises:
        EnclaveError: the partition is not last-k with k=2.
    """
    p = parse_spec(spec)
    if p.strategy != "last-k" or p.k != 2:
        raise EnclaveError("steal_last2 attacks a last-k partition with k=2")
    c = _counted(call, spec)
    d = p.ops["tail"]["inputs"][0]["shape"][0]
    net, info = steal_relu1(_oracle(c, "tail", [[d]], 0), d, center=center.reshape(-1), hidden=p.net.fc,
                            lines=lines, seed=seed, refine_points=refine_points)
    n, h = p.net.units, net.w1.shape[0]
    info["queries_extract"] = c.queries
    if h != p.net.fc:
        info["note"] = f"found {h} of {p.net.fc} hidden neurons; the model below pads with dead neurons"
    w1 = torch.zeros(p.net.fc, d, dtype=torch.float64)
    b1 = torch.full((p.net.fc,), -1.0, dtype=torch.float64)
    w2 = torch.zeros(p.net.classes, p.net.fc, dtype=torch.float64)
    m = min(h, p.net.fc)
    w1[:m], b1[:m], w2[:, :m] = net.w1[:m], net.b1[:m], net.w2[:, :m]
    weights = {f"units.{n - 2}.lin.weight": w1.float(), f"units.{n - 2}.lin.bias": b1.float(),
               f"units.{n - 1}.lin.weight": w2.float(), f"units.{n - 1}.lin.bias": net.b2.float()}
    return Extraction(weights, _with(p.net, {**public, **weights}), c.queries, c.calls, info)


# --------------------------------------------------------------------------------------------------------------
# ShadowNet: probe each post op
# --------------------------------------------------------------------------------------------------------------

_PROBES = (1.0, 16.0, 256.0, 4096.0, 65536.0)


def _probe(c: Counted, op: str, shape_in: list[int], t: float, put) -> tuple[Tensor, Tensor]:
    """Answers of ``op`` to a zero input, then per input channel to ``+-t * _PROBES`` placed by ``put``."""
    vals = torch.tensor([-v for v in reversed(_PROBES)] + list(_PROBES), dtype=torch.float64) * (t / _PROBES[-1])
    x = torch.zeros(1 + len(vals) * shape_in[0], *shape_in)
    for ch in range(shape_in[0]):
        for j, v in enumerate(vals):
            put(x[1 + len(vals) * ch + j], ch, float(v))
    y = c(op, [x])[0].double()
    return y.reshape(y.shape[0], -1), vals


def _affine_from_probes(r: Tensor, vals: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """Per column, ``A`` and ``B`` of ``relu(A v + B)`` (or ``A v + B``) from its answers ``r[probe, column]``
    to the probe values ``vals`` (symmetric, increasing) and to zero (``base``): ``A`` from the two largest
    probes on the side where the answer grows (least float error), ``B`` from the smallest active probe."""
    half = len(vals) // 2
    pos = r[-1] >= r[0]  # the answer grows towards +inf: A > 0
    hi = torch.where(pos, r[-1], r[0])
    lo = torch.where(pos, r[-2], r[1])
    a = (hi - lo) / torch.where(pos, vals[-1] - vals[-2], vals[0] - vals[1])
    b = torch.where(base > 0, base, torch.full_like(base, float("nan")))  # relu(B) = B when B > 0
    for j in range(half):  # B <= 0: from the smallest probe on the active side that is active
        rv = torch.where(pos, r[half + j], r[half - 1 - j])
        v = torch.where(pos, vals[half + j], vals[half - 1 - j])
        b = torch.where(torch.isnan(b) & (rv > 0), rv - a * v, b)
    return a, b


def steal_shadownet(spec: dict, public: dict[str, Tensor], call: Call, *, probe: float = 65536.0) -> Extraction:
    """Undo ShadowNet's disguise with chosen probes of every ``post{i}`` op.

    For real channel ``c`` of unit ``i`` the post computes ``post(A_c z[idx_c] + B_c)`` with ``A_c = gamma_c /
    (sigma_c s_c)`` and ``B_c`` the bias and BN shift folded (no BN: ``A_c = 1/s_c``, ``B_c = b_c``). Feeding a
    constant ``v`` on one disguised channel and zero elsewhere moves exactly the real channel that reads it:
    ``idx`` and the fake channels (read by none) follow, and two probes on the active side give ``A_c`` and
    ``B_c``. The stolen model is the victim's, BN folded into the linear layers: ``A_c W'[idx_c]``, ``B_c``.

    Returns:
        An :class:`Extraction` whose ``model`` is a :class:`SeqNet` (BN at identity) and whose ``info`` holds
        per unit ``index`` (recovered permutation), ``fakes`` (disguised channels no output reads), ``A``, ``B``.

    Raises:
        EnclaveError: not a shadownet partition, or a channel could not be resolved.
    """
    p = parse_spec(spec)
    if p.strategy != "shadownet":
        raise EnclaveError("steal_shadownet attacks a shadownet partition")
    c = _counted(call, spec)
    net, n = p.net, p.net.units
    weights: dict[str, Tensor] = {}
    info: dict[str, Any] = {"index": [], "fakes": [], "A": [], "B": []}
    for i in range(n):
        op = f"post{i}"
        shape_in = p.ops[op]["inputs"][0]["shape"]
        cin = shape_in[0]
        cout = (net.widths[i] if i < len(net.widths) else (net.fc if i == n - 2 else net.classes))
        y, vals = _probe(c, op, shape_in, probe, lambda x, ch, v: x.__setitem__((ch,), v))
        y = y.reshape(y.shape[0], cout, -1)[:, :, 0]  # a constant map stays constant through BN, ReLU, pool
        resp = y[1:].reshape(cin, len(vals), cout)  # [disguised channel, probe value, real channel]
        moved = (resp - y[0]).abs().amax(1)  # (cin, cout)
        idx = moved.argmax(0)
        if bool((moved.amax(0) == 0).any()):
            raise EnclaveError(f"unit {i}: a channel reacts to no probe; raise the probe value")
        a, b = _affine_from_probes(resp[idx, :, torch.arange(cout)].T, vals, y[0])
        fakes = sorted(set(range(cin)) - set(idx.tolist()))
        wd = public[f"shadow.{i}.weight"].double()[idx]
        view = (-1,) + (1,) * (wd.dim() - 1)
        weights[f"units.{i}.lin.weight"] = (wd * a.view(view)).float()
        weights[f"units.{i}.lin.bias"] = b.float()
        info["index"].append(idx)
        info["fakes"].append(fakes)
        info["A"].append(a)
        info["B"].append(b)
    model = folded_model(net, weights)
    return Extraction(weights, model, c.queries, c.calls, info)


def folded_model(net: NetSpec, lin: dict[str, Tensor]) -> SeqNet:
    """A :class:`SeqNet` with the given (BN-folded) linear weights and every BN set to the identity."""
    model = SeqNet(net)
    sd = model.state_dict()
    for name in sd:
        if name.endswith("running_var"):
            sd[name] = torch.full_like(sd[name], 1.0 - model.units[0].post[0].eps)
        elif name.endswith("running_mean") or (".post." in name and name.endswith("bias")):
            sd[name] = torch.zeros_like(sd[name])
        elif ".post." in name and name.endswith("weight"):
            sd[name] = torch.ones_like(sd[name])
    for name, t in lin.items():
        sd[name] = t.detach().float().reshape(sd[name].shape).clone()
    model.load_state_dict(sd)
    return model.eval()


def fold_bn(model: SeqNet) -> dict[str, Tensor]:
    """The linear weights of ``model`` with each BN folded in (what :func:`steal_shadownet` recovers)."""
    out = {}
    for i, u in enumerate(model.units):
        w, b = u.lin.weight.detach().double(), u.lin.bias.detach().double()
        bn = u.post[0] if isinstance(u.post, nn.Sequential) and isinstance(u.post[0], nn.BatchNorm2d) else None
        if bn is not None:
            g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            w = w * g.view(-1, 1, 1, 1)
            b = (b - bn.running_mean.double()) * g + bn.bias.double()
        out[f"units.{i}.lin.weight"], out[f"units.{i}.lin.bias"] = w.float(), b.float()
    return out


# --------------------------------------------------------------------------------------------------------------
# first-k, k = 1: conv + BN + ReLU from pixel deltas
# --------------------------------------------------------------------------------------------------------------

def steal_first1(spec: dict, public: dict[str, Tensor], call: Call, *, probe: float = 65536.0) -> Extraction:
    """Recover the first unit (3x3 conv + BN + ReLU, BN folded) of a first-k partition with k=1 from ``1 + 4 *
    in_channels`` chosen images: a zero image and a delta of ``+-t, +-2t`` at the centre pixel of each channel.

    Raises:
        EnclaveError: not first-k with k=1.
    """
    p = parse_spec(spec)
    if p.strategy != "first-k" or p.k != 1:
        raise EnclaveError("steal_first1 attacks a first-k partition with k=1")
    c = _counted(call, spec)
    cin, h, w = p.ops["front"]["inputs"][0]["shape"]
    cy, cx = h // 2, w // 2
    y, vals = _probe(c, "front", [cin, h, w], probe, lambda x, ch, v: x[ch, cy, cx].fill_(v))
    y = y.reshape(y.shape[0], -1, h, w)  # (B, C, h, w): no pool after unit 0
    cout, nv = y.shape[1], len(vals)
    taps = [(ch, dy, dx) for ch in range(cin) for dy in range(3) for dx in range(3)]
    # Output pixel (cy - dy + 1, cx - dx + 1) reads the delta through tap (dy, dx).
    outs = [y[1 + nv * ch:1 + nv * (ch + 1), :, cy - dy + 1, cx - dx + 1] for ch, dy, dx in taps]
    base = y[0, :, cy, cx]
    # B is shared by all taps of an output channel: take it from the tap with the largest response, then each
    # tap's weight from its largest active probe (exact even when a small weight's smaller probes stay dead).
    bias = torch.full((cout,), float("nan"), dtype=torch.float64)
    strength = torch.stack([(o - base).abs().amax(0) for o in outs])  # (taps, cout)
    for co in range(cout):
        _, b = _affine_from_probes(outs[int(strength[:, co].argmax())][:, co:co + 1], vals, base[co:co + 1])
        bias[co] = b[0]
    weight = torch.zeros(cout, cin, 3, 3, dtype=torch.float64)
    for (ch, dy, dx), o in zip(taps, outs):
        pos = o[-1] >= o[0]
        hi, v = torch.where(pos, o[-1], o[0]), torch.where(pos, vals[-1], vals[0])
        weight[:, ch, dy, dx] = torch.where(hi > 0, (hi - bias) / v, torch.zeros_like(hi))
    weights = {"units.0.lin.weight": weight.float(), "units.0.lin.bias": bias.float()}
    return Extraction(weights, None, c.queries, c.calls, {"note": "BN folded into units.0.lin"})


def fit_op(c: Counted, op: str, student: nn.Module, inputs: Tensor, *, epochs: int = 30, lr: float = 3e-3,
           batch: int = 128, seed: int = 0) -> dict[str, float]:
    """Learning-based extraction: train ``student`` to reproduce op ``op``'s exact outputs on ``inputs`` (MSE).

    Returns:
        ``{"queries", "rel_err"}``: rows sent and the student's relative output error on those inputs.
    """
    y = torch.cat([c(op, [inputs[i:i + 1024]])[0] for i in range(0, len(inputs), 1024)])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([q for q in student.parameters() if q.requires_grad], lr=lr)
    student.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=gen)
            for i in range(0, len(inputs), batch):
                j = order[i:i + batch]
                loss = ((student(inputs[j]) - y[j]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    student.eval()
    with torch.no_grad():
        rel = float((student(inputs) - y).norm() / y.norm().clamp_min(1e-12))
    return {"queries": c.queries, "rel_err": rel}


# --------------------------------------------------------------------------------------------------------------
# TEESlice: the head's columns for the backbone's fc features
# --------------------------------------------------------------------------------------------------------------

def steal_teeslice_head(spec: dict, public: dict[str, Tensor], call: Call, *, base: list[Tensor]) -> Extraction:
    """Solve the private head's columns that read the backbone's hidden fc output: with every other input held
    at ``base`` (one sample of backbone features), ``fc + 1`` queries varying only the last input give them
    exactly (``d logits / d feats[-1]``); the answer at ``base`` is their constant.

    Raises:
        EnclaveError: not a teeslice partition.
    """
    p = parse_spec(spec)
    if p.strategy != "teeslice":
        raise EnclaveError("steal_teeslice_head attacks a teeslice partition")
    c = _counted(call, spec)
    shapes = [d["shape"] for d in p.ops["slices"]["inputs"]]
    d = shapes[-1][0]
    f = _oracle(c, "slices", shapes, len(shapes) - 1, [t.reshape(1, *s) for t, s in zip(base, shapes)])
    x = torch.cat([torch.zeros(1, d), torch.eye(d)]).double()
    y = f(x)
    w = (y[1:] - y[0]).T
    return Extraction({"head.weight[:, :fc]": w.float()}, None, c.queries, c.calls, {"const": y[0].float()})


# --------------------------------------------------------------------------------------------------------------
# Mitigations, measured on the last-1 attack
# --------------------------------------------------------------------------------------------------------------

class Averaged:
    """Attacker's answer to noisy outputs: send every row ``repeats`` times and average the answers."""

    def __init__(self, call: Call, repeats: int, max_batch: int = 1024) -> None:
        self.call, self.repeats, self.step = call, repeats, max(1, max_batch // repeats)

    def __call__(self, op: str, inputs: list[Tensor]) -> list[Tensor]:
        outs = []
        for i in range(0, inputs[0].shape[0], self.step):
            part = [t[i:i + self.step] for t in inputs]
            rep = [t.repeat_interleave(self.repeats, 0) for t in part]
            out = self.call(op, rep)[0]
            outs.append(out.reshape(part[0].shape[0], self.repeats, *out.shape[1:]).mean(1))
        return [torch.cat(outs)]


def steal_last1_labels(spec: dict, public: dict[str, Tensor], call: Call, *, inputs: Tensor, epochs: int = 200,
                       seed: int = 0) -> Extraction:
    """last-1 against a labels-only tail: fit the classifier (softmax regression) to the argmax of chosen
    ``inputs``. Recovers the decision function, not the logits' scale."""
    p = parse_spec(spec)
    c = _counted(call, spec)
    y = c("tail", [inputs])[0].argmax(1)
    n = p.net.units
    lin = nn.Linear(inputs.shape[1], p.net.classes)
    torch.manual_seed(seed)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(inputs), y) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weights = {f"units.{n - 1}.lin.weight": lin.weight.detach(), f"units.{n - 1}.lin.bias": lin.bias.detach()}
    return Extraction(weights, _with(p.net, {**public, **weights}), c.queries, c.calls)


def measure_mitigations(spec: dict, public: dict[str, Tensor], call: Call, *, feats: Tensor, test_x: Tensor,
                        test_y: Tensor, victim: nn.Module) -> list[dict[str, Any]]:
    """Each mitigation prototype against the last-1 attack (and its adaptive variant): queries, max weight error,
    stolen accuracy and agreement with the victim on ``test_x``.

    Args:
        feats: the host's own tail inputs (activations of public images), for ranges and chosen inputs.
    """
    p = parse_spec(spec)
    n = p.net.units
    name = f"units.{n - 1}.lin.weight"
    want = victim.state_dict()[name]
    hi = float(feats.max())
    with torch.no_grad():
        ref = victim(test_x).argmax(1)
    rows = []

    def row(what: str, r: Extraction) -> None:
        m = r.model.eval()
        with torch.no_grad():
            pred = m(test_x).argmax(1)
        err = float((r.weights[name] - want).abs().max()) if what.find("labels") < 0 else float("nan")
        rows.append({"mitigation": what, "queries": r.queries, "max_weight_err": err,
                     "accuracy": float((pred == test_y).float().mean()), "agreement": float((pred == ref).float().mean())})

    row("none", steal_last1(spec, public, call))
    row("round 2 dp", steal_last1(spec, public, Rounded(call, 2)))
    row("round 2 dp (attacker scales inputs x1e4)", steal_last1(spec, public, Rounded(call, 2), scale=1e4))
    ranged = InputRange(call, 0.0, hi)
    row(f"round 2 dp + input range [0, {hi:.1f}] (scale to the range)",
        steal_last1(spec, public, Rounded(ranged, 2), scale=hi))
    for reps in (1, 30):
        r = steal_last1(spec, public, Averaged(Noisy(ranged, 0.1), reps), scale=hi)
        r.queries *= reps
        row(f"noise sd 0.1 + input range, attacker averages x{reps}", r)
    gen = torch.Generator().manual_seed(0)
    for q in (50, 500, 5000):
        i, j = torch.randint(0, len(feats), (2, q), generator=gen)
        a = torch.rand(q, 1, generator=gen)
        x = (a * feats[i] + (1 - a) * feats[j]).reshape(q, -1)
        x = x * torch.exp(0.3 * torch.randn(x.shape, generator=gen))
        row(f"labels only (softmax fit on {q} chosen inputs)", steal_last1_labels(spec, public, LabelsOnly(call),
                                                                            inputs=x.clamp(0, hi)))
    d = p.ops["tail"]["inputs"][0]["shape"][0]
    for budget in (d // 4, d // 2, d + 1):
        b = Budget(call, budget)
        x = torch.cat([torch.zeros(1, d), torch.eye(d)])[:budget]
        y = b("tail", [x])[0].double()
        w = torch.zeros(p.net.classes, d, dtype=torch.float64)
        w[:, :budget - 1] = (y[1:] - y[0]).T
        weights = {name: w.float(), f"units.{n - 1}.lin.bias": y[0].float()}
        row(f"budget {budget} queries", Extraction(weights, _with(p.net, {**public, **weights}), budget, 1))
    return rows


def steal_teeslice(spec: dict, public: dict[str, Tensor], call: Call, *, base: list[Tensor], model: nn.Module,
                   seed: int = 0) -> Extraction:
    """TEESlice's private fc slice and head from chosen queries.

    With every input but the flat backbone features held at ``base``, the ``slices`` op is a one-hidden-layer ReLU
    net of those features (the fc slice, then the head), so :func:`steal_relu1` extracts the fc slice's columns
    for the backbone features and the head's slice columns; :func:`steal_teeslice_head` gives the head's backbone
    columns. When the partition has no conv slice (``start`` = number of conv units) that is the whole private
    part, and ``model`` (a :class:`~chiplock.enclave.models.TeeSliceNet` of the same shape, e.g. built on the
    public backbone) receives it.

    Raises:
        EnclaveError: not a teeslice partition.
    """
    p = parse_spec(spec)
    if p.strategy != "teeslice":
        raise EnclaveError("steal_teeslice attacks a teeslice partition")
    c = _counted(call, spec)
    head = steal_teeslice_head(spec, public, c, base=base)
    shapes = [d["shape"] for d in p.ops["slices"]["inputs"]]
    fixed = [t.reshape(1, *s) for t, s in zip(base, shapes)]
    d = shapes[-2][0]
    hidden = model.slices[-1].lin.out_features
    f = _oracle(c, "slices", shapes, len(shapes) - 2, fixed)
    net, info = steal_relu1(f, d, center=base[-2].reshape(-1), hidden=hidden, seed=seed)
    wbb = head.weights["head.weight[:, :fc]"].double()
    info["complete"] = p.start == len(p.net.widths)
    weights = {"head.weight[:, :fc]": wbb.float()}
    if info["complete"] and net.w1.shape[0] == hidden:
        fc_lin, hd = model.slices[-1].lin, model.head
        with torch.no_grad():
            fc_lin.weight.copy_(net.w1)
            fc_lin.bias.copy_(net.b1)
            hd.weight.copy_(torch.cat([wbb, net.w2], 1))
            hd.bias.copy_(net.b2 - wbb @ base[-1].double().reshape(-1))
        weights.update({n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith("backbone.")})
    info["queries_head"] = head.queries
    return Extraction(weights, model.eval() if info["complete"] else None, c.queries, c.calls, info)
