"""Reconstruction attacks on a split model: how much does holding a fraction of it help?

An attacker holds some of a trained model's shards (whole layers covering a fraction ``p`` of its parameters),
re-initialises the rest at random, and fine-tunes everything with a small labelled set. Recovered test accuracy
and compute are compared with training the same architecture from scratch on the same data, with the same
initialisation of the missing layers and the same number of optimizer steps (the attacker's alternative that needs
no shard at all), and with the victim itself.

Which layers the attacker holds:

* by depth position (:data:`POSITIONS`): a contiguous block of layers from the input side (``input``), from the
  output side (``output``) or around the middle of the parameter mass (``middle``);
* by size only: ``random`` whole layers adding up to ``p`` (seeded draws);
* colluding ranks: the pipeline stages (:func:`chiplock.split.units.make_layout`, ``stages`` of about equal
  size) of ``k`` consecutive ranks out of ``N``.

A *layer* is one convolution or linear layer with the batch norm that follows it (weights, affine parameters,
running statistics); ``p`` counts parameters, not buffers.

Boundary transforms (:mod:`chiplock.split.boundary`): every stream that crosses a stage boundary carries a random
channel map, rotated on a schedule. Ranks that copy their shards at different times (different rotation epochs)
hand the attacker stages folded with different maps, so adjacent shards no longer fit: at every crossing stream
the reader sees the writer's channels permuted and rescaled. Shards copied at one epoch compose to exactly the
victim's function (the maps cancel). The attacker who knows this inserts a trainable 1x1 *stitching layer*
(identity-initialised) at every stage boundary, which can represent the mismatch exactly; both that attacker and
the naive one are measured.

Compute is measured as optimizer steps (batch ``batch_size``) to reach a target accuracy: ``target`` times what
training from scratch reaches with the same data and the whole step budget; ``compute vs scratch`` is the
attacker's steps to target divided by from-scratch's (UPM reports that fine-tuning stitched partitions costs
>= 60 % of the tokens of training from scratch). Steps are read off an evaluation schedule
(``checkpoints`` points, doubling), so they are upper bounds at that resolution.

Example:
    >>> from chiplock.split import reconstruct
    >>> result = reconstruct.run(preset="smoke")
    >>> result.save("bench/results/split")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chiplock.attacks.result import (
    AttackResult,
    Progress,
    Table,
    new_figure,
    resolve,
    save_figure,
)
from chiplock.errors import UnsupportedConfig
from chiplock.split.boundary import BoundaryMap, crossing, fold, random_boundary
from chiplock.split.units import (
    ArchSpec,
    Layout,
    Stream,
    Units,
    build_units,
    make_layout,
)

#: Contiguous blocks of layers by depth position.
POSITIONS = ("input", "middle", "output")
#: Every way :func:`select_layers` can pick layers.
STRATEGIES = POSITIONS + ("random",)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"data": "digits8", "width": 4, "pretrain_epochs": 1, "cache": None, "seed": 0, "ps": [0.5],
              "positions": ["input", "output"], "size_draws": 1, "fractions": [0.1], "steps": 4, "checkpoints": 1,
              "lr": 2e-3, "scratch_lr": 2e-3, "batch_size": 64, "target": 0.95, "stages": 2,
              "transform_p": 0.5, "stitch": True, "collude": True, "test_images": 200},
    "paper": {"data": "mnist5000", "width": 16, "pretrain_epochs": 8, "cache": None, "seed": 0,
              "ps": [0.1, 0.25, 0.5, 0.75, 0.9], "positions": list(POSITIONS), "size_draws": 1,
              "fractions": [0.01, 0.1], "steps": 300, "checkpoints": 6, "lr": 2e-3, "scratch_lr": 2e-3,
              "batch_size": 64, "target": 0.95, "stages": 4, "transform_p": 0.5, "stitch": True, "collude": True,
              "test_images": 500},
}

CLAIM_LOCATION = ("Martic et al. (ICLR 2019): how hard a model is to complete depends less on the number of missing "
                  "parameters than on their type and location")
CLAIM_UPM = "UPM (2025): fine-tuning stitched partitions consumes >= 60 % of the tokens needed to train from scratch"
CLAIM_TARGET = "issue 14 target: boundary transforms push recovery at p = 0.5 toward the from-scratch baseline"
CLAIM_SPLIT = ("the proposal (Cui 2024): dividing a model so that no single party holds it whole protects it "
               "without encryption")


@dataclass(frozen=True)
class LayerGroup:
    """One layer of the victim: a convolution or linear layer and the batch norm after it.

    Attributes:
        name: The layer's weight-bearing module (``layer2_0.conv1``).
        tensors: Names of its parameters and buffers in the model's state dict.
        size: Its parameter count (buffers not counted).
    """

    name: str
    tensors: tuple[str, ...]
    size: int


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's layers in registration order (forward order for the chains here), each a conv/linear module
    with the batch norm registered right after it.

    Raises:
        UnsupportedConfig: A parameter belongs to no conv, linear or batch-norm module.

    Example:
        >>> [g.name for g in layer_groups(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))]
        ['0', '2']
    """
    groups: list[list[Any]] = []
    for name, module in model.named_modules():
        own = [f"{name}.{k}" if name else k for k, _ in module.named_parameters(recurse=False)]
        own += [f"{name}.{k}" if name else k for k, _ in module.named_buffers(recurse=False)]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            groups.append([name, own, sum(p.numel() for p in module.parameters(recurse=False))])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and groups:
            groups[-1][1] += own
            groups[-1][2] += sum(p.numel() for p in module.parameters(recurse=False))
        elif any(True for _ in module.parameters(recurse=False)):
            raise UnsupportedConfig(f"layer_groups: module {name!r} ({type(module).__name__}) holds parameters but "
                                    "is not a conv, linear or batch-norm layer; attack a model built from those")
    return [LayerGroup(n, tuple(t), s) for n, t, s in groups]


def _fraction(groups: Sequence[LayerGroup], chosen: Sequence[int]) -> float:
    return sum(groups[i].size for i in chosen) / sum(g.size for g in groups)


def select_layers(groups: Sequence[LayerGroup], p: float, how: str, *, seed: int = 0) -> list[int]:
    """Pick whole layers covering about a fraction ``p`` of the parameters.

    Every strategy lands within half the largest layer of ``p`` (the selection's granularity).

    Args:
        groups: :func:`layer_groups` of the victim.
        p: The fraction of parameters wanted, in (0, 1).
        how: ``input`` (the first layers), ``output`` (the last), ``middle`` (the contiguous block whose centre of
            parameter mass is nearest the model's, among blocks within 2.5 points of the best attainable
            fraction), ``random``
            (layers in a seeded random order, each kept when it brings the total nearer ``p``).
        seed: Seeds ``random``.

    Returns:
        Indices into ``groups``, ascending.

    Raises:
        UnsupportedConfig: ``p`` outside (0, 1) or an unknown ``how``.

    Example:
        >>> select_layers(layer_groups(model), 0.5, "output")  # doctest: +SKIP
    """
    if not 0 < p < 1:
        raise UnsupportedConfig(f"select_layers: p={p!r}; pass a fraction of the parameters in (0, 1), e.g. 0.5")
    if how not in STRATEGIES:
        raise UnsupportedConfig(f"select_layers: how={how!r}; use one of {', '.join(STRATEGIES)}")
    n, total = len(groups), sum(g.size for g in groups)
    cum = [0]
    for g in groups:
        cum.append(cum[-1] + g.size)
    if how == "random":
        order = np.random.default_rng([seed, 7]).permutation(n)
        chosen, mass = [], 0
        for i in order:
            # Keep the layer when the total with it is no farther above p than it is below without it.
            if mass + groups[i].size <= p * total + groups[i].size / 2:
                chosen.append(int(i))
                mass += groups[i].size
        return sorted(chosen)
    blocks = [(i, j) for i in range(n) for j in range(i + 1, n + 1) if (i, j) != (0, n)]
    if how == "input":
        blocks = [(0, j) for j in range(1, n)]
    elif how == "output":
        blocks = [(i, n) for i in range(1, n)]

    def miss(b: tuple[int, int]) -> float:
        return abs((cum[b[1]] - cum[b[0]]) / total - p)

    best = min(miss(b) for b in blocks)
    if how != "middle":
        i, j = min(blocks, key=miss)
        return list(range(i, j))
    # Blocks within 2.5 points of the best attainable fraction (never beyond the granularity), then the one
    # centred nearest the middle of the parameter mass.
    grain = max(g.size for g in groups) / total / 2
    near = [b for b in blocks if miss(b) <= max(best, min(best + 0.025, grain)) + 1e-12]
    i, j = min(near, key=lambda b: abs((cum[b[0]] + cum[b[1]]) / 2 / total - 0.5) + miss(b))
    return list(range(i, j))


_RENAME = ((re.compile(r"^conv1\."), "stem.0."), (re.compile(r"^bn1\."), "stem.1."),
           (re.compile(r"^layer(\d)\.(\d+)\."), r"layer\1_\2."), (re.compile(r"^fc\."), "head.2."))


def as_units(model: nn.Module, spec: ArchSpec) -> tuple[Units, tuple[Stream, ...]]:
    """The project's ResNet-18 (:func:`chiplock.softlock.model_io.build_architecture`) as the chain of units
    :mod:`chiplock.split` splits, with the same weights (so it computes the same function).

    Raises:
        UnsupportedConfig: ``model`` is not the ResNet-18 ``spec`` describes.
    """
    units, streams = build_units(spec)
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in _RENAME:
            key = pattern.sub(repl, key)
        state[key] = value
    try:
        units.load_state_dict(state)
    except RuntimeError as e:
        raise UnsupportedConfig(f"as_units: the model is not the ResNet-18 of {spec} ({str(e)[:200]}); build it with "
                                "chiplock.softlock.model_io.build_architecture('resnet18', ...)") from None
    return units.eval(), streams


def epoch_maps(streams: Sequence[Stream], names: Sequence[str], epoch: int, *, seed: int = 0) -> dict[str, BoundaryMap]:
    """The boundary maps in force at rotation ``epoch`` on the streams ``names`` (reproducible from ``seed``;
    each epoch's map is a fresh draw, as the composition of the rotations so far is).

    This is the one place the attack draws maps; it uses :func:`chiplock.split.boundary.random_boundary`.
    """
    by_name = {s.name: s for s in streams}
    return {n: random_boundary(by_name[n].width, rng=np.random.default_rng([seed, 1 + epoch, k]))
            for k, n in enumerate(names)}


def capture(victim: Mapping[str, torch.Tensor], layout: Layout, streams: Sequence[Stream],
            epochs: Sequence[int] | None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """What colluding ranks copy: each stage's tensors as that rank held them at its own rotation epoch.

    Args:
        victim: The plain model's state dict (unit names).
        layout: The pipeline split.
        streams: The chain's streams.
        epochs: The rotation epoch each stage was copied at (one per stage); ``None``: no boundary transforms
            (the plain weights).
        seed: Seeds the maps (:func:`epoch_maps`).

    Returns:
        A new state dict: every stage's tensors folded with its epoch's maps on the streams crossing a boundary.

    Raises:
        UnsupportedConfig: ``epochs`` does not give one epoch per stage.
    """
    out = {k: v.clone() for k, v in victim.items()}
    if epochs is None:
        return out
    if len(epochs) != len(layout.stages):
        raise UnsupportedConfig(f"capture: epochs={list(epochs)} gives {len(epochs)} epochs for "
                                f"{len(layout.stages)} stages; pass one rotation epoch per stage")
    names = list(crossing(streams, {k: layout.stage_of(k) for k in victim}))
    for stage, epoch in enumerate(epochs):
        part = {k: v for k, v in out.items() if layout.stage_of(k) == stage}
        out.update(fold(part, epoch_maps(streams, names, int(epoch), seed=seed), streams))
    return out


def assemble(fresh: Units, held: Mapping[str, torch.Tensor]) -> Units:
    """A copy of ``fresh`` (the re-initialised model) with the tensors the attacker holds loaded over it.

    Raises:
        UnsupportedConfig: ``held`` names a tensor the model does not have.
    """
    model = copy.deepcopy(fresh)
    state = model.state_dict()
    unknown = sorted(set(held) - set(state))
    if unknown:
        raise UnsupportedConfig(f"assemble: the model has no tensor {', '.join(unknown[:3])}; pass tensors of the "
                                "same chain of units")
    with torch.no_grad():
        for k, v in held.items():
            state[k].copy_(v)
    return model


def stitch(model: Units, layout: Layout, x: torch.Tensor) -> Units:
    """The chain with an identity-initialised 1x1 stitching layer (a linear layer for flat activations) before
    every stage but the first: what an attacker inserts to learn the mismatched boundary maps back.

    Args:
        model: The assembled chain (its modules are shared, not copied).
        layout: The pipeline split (where the boundaries are).
        x: A few inputs, to read each boundary's channel count.
    """
    chain, firsts = [], {names[0] for names in layout.stages[1:]}
    h = x[:2]
    was = model.training
    model.eval()
    with torch.no_grad():
        for name, module in model.named_children():
            if name in firsts:
                c = h.shape[1]
                layer = nn.Conv2d(c, c, 1, bias=False) if h.dim() == 4 else nn.Linear(c, c, bias=False)
                with torch.no_grad():
                    layer.weight.copy_(torch.eye(c).view(layer.weight.shape))
                chain.append((f"stitch_{name}", layer))
            chain.append((name, module))
            h = module(h)
    out = Units(chain)
    out.train(was)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    model.train(was)
    return correct / max(len(y), 1)


def schedule(steps: int, checkpoints: int) -> list[int]:
    """Evaluation points: 0, then ``checkpoints`` points doubling up to ``steps``."""
    return sorted({0, steps} | {max(1, round(steps / 2 ** k)) for k in range(max(checkpoints, 1))})


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             seed: int, eval_x: torch.Tensor, eval_y: torch.Tensor, checkpoints: int) -> dict[str, Any]:
    """Adam on cross-entropy for ``steps`` steps (batches from seeded epochs over ``(x, y)``), accuracy on
    ``(eval_x, eval_y)`` at :func:`schedule` points.

    Returns:
        ``{"curve": [[step, accuracy], ...], "seconds": training wall time (evaluation excluded), "steps"}``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    at = schedule(steps, checkpoints)
    curve, seconds, order, pos = [[0, accuracy(model, eval_x, eval_y)]], 0.0, torch.empty(0, dtype=torch.long), 0
    bs = min(batch_size, len(y))
    model.train()
    for step in range(1, steps + 1):
        t = time.perf_counter()
        if pos + bs > len(order):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        seconds += time.perf_counter() - t
        if step in at:
            curve.append([step, accuracy(model, eval_x, eval_y)])
    model.eval()
    return {"curve": curve, "seconds": seconds, "steps": steps}


def steps_to(curve: Sequence[Sequence[float]], target: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``target`` (``None``: never)."""
    return next((int(s) for s, a in curve if a >= target), None)


def _check(params: dict[str, Any]) -> None:
    if not params["ps"] or any(not 0 < float(p) < 1 for p in params["ps"]):
        raise UnsupportedConfig("reconstruct: ps must be fractions of the parameters in (0, 1), e.g. [0.25, 0.5]")
    if not params["fractions"] or any(not 0 < float(f) <= 1 for f in params["fractions"]):
        raise UnsupportedConfig("reconstruct: fractions (of the labelled training data) must lie in (0, 1], "
                                "e.g. [0.01, 0.1]")
    bad = [p for p in params["positions"] if p not in POSITIONS]
    if bad:
        raise UnsupportedConfig(f"reconstruct: unknown position(s) {bad}; use {', '.join(POSITIONS)}")
    if params["steps"] < 1 or params["checkpoints"] < 1 or params["batch_size"] < 1 or params["size_draws"] < 0:
        raise UnsupportedConfig("reconstruct: steps, checkpoints and batch_size must be >= 1, size_draws >= 0")
    if not params["lr"] > 0 or not params["scratch_lr"] > 0 or not 0 < params["target"] <= 1:
        raise UnsupportedConfig("reconstruct: lr and scratch_lr must be > 0 and target in (0, 1], e.g. 0.95")
    if params["stages"] < 2:
        raise UnsupportedConfig("reconstruct: stages must be >= 2 (the pipeline ranks N)")
    if params["test_images"] is not None and params["test_images"] < 1:
        raise UnsupportedConfig("reconstruct: test_images must be >= 1 (or None for the whole test split)")


def run(*, preset: str = "paper", progress: Progress | None = None, **overrides) -> AttackResult:
    """Measure how much holding a fraction of a trained ResNet-18 helps an attacker rebuild it.

    Args:
        preset: ``"smoke"`` (8x8 digits, width 4, seconds) or ``"paper"`` (MNIST-5000, width 16,
            p in {0.1, 0.25, 0.5, 0.75, 0.9}, 1 % and 10 % of the training data, 300 steps).
        progress: ``progress(stage, done, total)``, once per fine-tuning run.
        **overrides: Any preset key: ``data``, ``width``, ``pretrain_epochs``, ``cache`` (folder for the trained
            victim, shared with :mod:`chiplock.attacks.softmodels`), ``seed``, ``ps`` (fractions held),
            ``positions`` (of :data:`POSITIONS`), ``size_draws`` (``random`` draws per p; 0 skips the by-size
            table), ``fractions`` (of the labelled training data), ``steps`` (every fine-tuning and from-scratch
            run), ``checkpoints`` (evaluations, doubling up to ``steps``), ``lr`` (attacker's Adam; the presets use
            the from-scratch recipe, so holding nothing is exactly the from-scratch run), ``scratch_lr``,
            ``batch_size``, ``target`` (compute is measured to ``target`` x the from-scratch accuracy),
            ``stages`` (pipeline ranks N), ``transform_p`` (p of the transforms table), ``stitch`` (also run the
            attacker who inserts stitching layers), ``collude`` (the k-of-N table), ``test_images`` (the curve's
            evaluations use the first this many test images; the final accuracy uses all).

    Returns:
        An :class:`~chiplock.attacks.result.AttackResult` named ``reconstruct``; ``data["runs"]`` holds every run,
        ``data["claims"]`` the literature's claims beside what was measured.

    Raises:
        UnsupportedConfig: Unknown preset or setting, or a value out of range.

    Example:
        >>> [row[:3] for row in run(preset="smoke").tables[0].rows]  # doctest: +SKIP
    """
    from chiplock.attacks.softmodels import load_data, original_model

    t0 = time.perf_counter()
    params = resolve(PRESETS, preset, overrides)
    _check(params)
    seed = params["seed"]
    ds = load_data(params["data"])
    original, info = original_model(data=ds, width=params["width"], pretrain_epochs=params["pretrain_epochs"],
                                    cache=Path(params["cache"]) if params["cache"] else None, seed=seed)
    spec = ArchSpec("resnet18", width=params["width"], num_classes=int(ds.num_classes), image_size=ds.image_size)
    victim, streams = as_units(original, spec)
    plain = {k: v.detach().clone() for k, v in victim.state_dict().items()}
    groups = layer_groups(victim)
    layout = make_layout(spec, params["stages"])
    torch.manual_seed(seed + 1)
    fresh, _ = build_units(spec)
    n_eval = params["test_images"] or len(ds.y_test)
    ex, ey = ds.x_test[:n_eval], ds.y_test[:n_eval]
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed + 2))
    subsets = {float(f): perm[:max(math.ceil(float(f) * len(perm)), 2)] for f in params["fractions"]}
    orig_acc = accuracy(victim, ds.x_test, ds.y_test)

    jobs = _jobs(params, groups, layout)
    total, done = len(jobs) + len(subsets), 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total)

    def train(model: nn.Module, f: float, lr: float) -> dict[str, Any]:
        idx = subsets[f]
        r = finetune(model, ds.x_train[idx], ds.y_train[idx], steps=params["steps"], lr=lr,
                     batch_size=params["batch_size"], seed=seed + 3, eval_x=ex, eval_y=ey,
                     checkpoints=params["checkpoints"])
        return dict(r, final=accuracy(model, ds.x_test, ds.y_test), samples=len(idx))

    scratch = {}
    for f in subsets:
        scratch[f] = train(copy.deepcopy(fresh), f, params["scratch_lr"])
        scratch[f]["target"] = params["target"] * scratch[f]["curve"][-1][1]
        scratch[f]["steps_to_target"] = steps_to(scratch[f]["curve"], scratch[f]["target"])
        tick("reconstruct: from scratch")
    captured: dict[tuple | None, dict[str, torch.Tensor]] = {}
    done_runs: dict[tuple, dict[float, dict[str, Any]]] = {}
    runs = []
    for job in jobs:
        key = tuple(job["epochs"]) if job["epochs"] is not None else None
        same = (tuple(job["tensors"]), key, job["stitch"])
        if same not in done_runs:
            # A job that holds what an earlier one held (the transforms table's plain row, a coalition equal to a
            # position block) reuses its runs.
            if key not in captured:
                captured[key] = capture(plain, layout, streams, job["epochs"], seed=seed)
            model = assemble(fresh, {k: captured[key][k] for k in job["tensors"]})
            if job["stitch"]:
                model = stitch(model, layout, ds.x_train[:2])
            done_runs[same] = {}
            for f, idx in subsets.items():
                if job["complete"]:
                    # The whole plain model: nothing to recover.
                    done_runs[same][f] = {"curve": [[0, accuracy(model, ex, ey)]], "seconds": 0.0, "steps": 0,
                                          "final": accuracy(model, ds.x_test, ds.y_test), "samples": len(idx)}
                else:
                    done_runs[same][f] = train(copy.deepcopy(model), f, params["lr"])
        for f in subsets:
            row = {k: v for k, v in job.items() if k != "tensors"}
            row.update(done_runs[same][f], fraction=f, held_tensors=len(job["tensors"]))
            row["steps_to_target"] = steps_to(row["curve"], scratch[f]["target"])
            runs.append(row)
        tick(f"reconstruct: {job['table']}")
    result = AttackResult(
        name="reconstruct", title="Reconstruction attacks on a split model (issue 14, item 3)",
        tables=_tables(runs, scratch, orig_acc, params), notes=[], params=params, plot=_plot,
        data={"runs": runs, "scratch": {str(f): s for f, s in scratch.items()}, "original_accuracy": orig_acc,
              "original": {k: info.get(k) for k in ("steps", "seconds", "pretrain_epochs")},
              "layers": [[g.name, g.size] for g in groups], "stages": [list(s) for s in layout.stages],
              "stage_fractions": _stage_fractions(groups, layout), "parameters": sum(g.size for g in groups)})
    result.data["claims"] = _claims(runs, scratch, orig_acc, params)
    result.notes = _notes(result.data, params)
    result.seconds = time.perf_counter() - t0
    return result


def _stage_fractions(groups: Sequence[LayerGroup], layout: Layout) -> list[float]:
    total = sum(g.size for g in groups)
    return [sum(g.size for g in groups if layout.stage_of(g.tensors[0]) == s) / total
            for s in range(len(layout.stages))]


def _job(table: str, label: str, groups: Sequence[LayerGroup], chosen: Sequence[int], *, p: float | None,
         epochs: Sequence[int] | None = None, stitch: bool = False, extra: dict | None = None) -> dict[str, Any]:
    return {"table": table, "held": label, "p": p, "p_held": _fraction(groups, chosen),
            "layers": [groups[i].name for i in chosen], "tensors": [t for i in chosen for t in groups[i].tensors],
            "epochs": list(epochs) if epochs is not None else None, "stitch": stitch,
            "complete": len(chosen) == len(groups) and epochs is None, **(extra or {})}


def _jobs(params: dict[str, Any], groups: Sequence[LayerGroup], layout: Layout) -> list[dict[str, Any]]:
    """Every (held layers, transforms, stitching) the run fine-tunes, each for every data fraction."""
    jobs, seed, n = [], params["seed"], len(layout.stages)
    for how in params["positions"]:
        for p in params["ps"]:
            jobs.append(_job("position", how, groups, select_layers(groups, float(p), how), p=float(p)))
    for d in range(params["size_draws"]):
        for p in params["ps"]:
            jobs.append(_job("size", f"random #{d}", groups, select_layers(groups, float(p), "random", seed=seed + d),
                             p=float(p), extra={"draw": d}))
    tp = float(params["transform_p"])
    epochs = list(range(n))  # every rank copied its shard at a different rotation epoch
    for how in params["positions"]:
        chosen = select_layers(groups, tp, how)
        jobs.append(_job("transforms", how, groups, chosen, p=tp, extra={"variant": "none"}))
        jobs.append(_job("transforms", how, groups, chosen, p=tp, epochs=epochs, extra={"variant": "transforms"}))
        if params["stitch"]:
            jobs.append(_job("transforms", how, groups, chosen, p=tp, epochs=epochs, stitch=True,
                             extra={"variant": "transforms + stitching"}))
    if params["collude"]:
        for k in range(1, n + 1):
            for start in range(n - k + 1):
                ranks = list(range(start, start + k))
                chosen = [i for i, g in enumerate(groups) if layout.stage_of(g.tensors[0]) in ranks]
                label = "+".join(str(r) for r in ranks)
                extra = {"k": k, "ranks": ranks}
                jobs.append(_job("collude", label, groups, chosen, p=None, extra=dict(extra, variant="none")))
                if k > 1:
                    jobs.append(_job("collude", label, groups, chosen, p=None, epochs=epochs,
                                     extra=dict(extra, variant="transforms")))
                    if params["stitch"]:
                        jobs.append(_job("collude", label, groups, chosen, p=None, epochs=epochs, stitch=True,
                                         extra=dict(extra, variant="transforms + stitching")))
    return jobs


def _ratio(steps: int | None, base: int | None) -> float | None:
    if steps is None or not base:
        return None
    return steps / base


def _cells(r: dict[str, Any], scratch: dict[float, Any]) -> list[Any]:
    s = scratch[r["fraction"]]
    return [f"{r['fraction']:.0%} ({r['samples']})", r["curve"][0][1], r["final"], s["final"],
            r["steps_to_target"] if r["steps_to_target"] is not None else "not reached", s["steps_to_target"],
            _ratio(r["steps_to_target"], s["steps_to_target"]), r["seconds"]]


_TAIL = ["labelled data", "before fine-tuning", "after fine-tuning", "from scratch", "steps to target",
         "scratch steps to target", "compute vs scratch", "fine-tune s"]


def _tables(runs: list[dict[str, Any]], scratch: dict[float, Any], orig: float, params: dict[str, Any]) -> list[Table]:
    def rows(table: str, head) -> list[list[Any]]:
        return [head(r) + _cells(r, scratch) for r in runs if r["table"] == table]

    cap = (f"Accuracy on the held-out test split (victim {orig:.3f}); before fine-tuning = the assembled model "
           f"(missing layers random) on the first {params['test_images'] or 'all'} test images. Every run: "
           f"{params['steps']} Adam steps, batch {params['batch_size']} (lr {params['lr']}; from scratch "
           f"{params['scratch_lr']}, same initialisation of the missing layers). Target = {params['target']:.0%} of "
           "the from-scratch accuracy; compute vs scratch = steps to target / from-scratch steps to target.")
    tables = [
        Table("Recovery vs p, by depth position of the held layers", ["held", "p asked", "p held", *_TAIL],
              rows("position", lambda r: [r["held"], r["p"], r["p_held"]]), caption=cap),
        Table("Recovery vs p, by size only (random whole layers)", ["held", "p asked", "p held", *_TAIL],
              rows("size", lambda r: [r["held"], r["p"], r["p_held"]]), caption=cap),
        Table(f"Boundary transforms at p = {params['transform_p']}: shards copied at different rotation epochs",
              ["held", "p held", "shards", *_TAIL],
              rows("transforms", lambda r: [r["held"], r["p_held"], r["variant"]]),
              caption=f"Each of the {params['stages']} pipeline stages copied at its own rotation epoch; none = the "
                      "plain weights; transforms + stitching = the attacker inserts an identity-initialised 1x1 "
                      "layer before every stage and trains it with the rest. " + cap),
        Table(f"Colluding ranks: k of N = {params['stages']} pool their stages",
              ["ranks", "k", "p held", "shards", *_TAIL],
              rows("collude", lambda r: [r["held"], r["k"], r["p_held"], r["variant"]]),
              caption="Ranks are consecutive pipeline stages (stage 0 holds the input side). " + cap),
    ]
    # A table the settings skipped (size_draws=0, collude=false) is left out rather than printed empty.
    return [t for t in tables if t.rows]



def _claims(runs: list[dict[str, Any]], scratch: dict[float, Any], orig: float,
            params: dict[str, Any]) -> list[dict[str, str]]:
    claims = []
    f = max(scratch)
    s = scratch[f]
    pos = [r for r in runs if r["table"] == "position" and r["fraction"] == f]
    spread = []
    for p in sorted({r["p"] for r in pos}):
        at = [r for r in pos if r["p"] == p]
        if len(at) > 1:
            lo, hi = min(at, key=lambda r: r["final"]), max(at, key=lambda r: r["final"])
            spread.append(f"p={p}: {lo['held']} {lo['final']:.3f} .. {hi['held']} {hi['final']:.3f}")
    if spread:
        claims.append({"claim": CLAIM_LOCATION,
                       "measured": f"{f:.0%} of the data, accuracy after fine-tuning by held position: "
                                   + "; ".join(spread) + f" (from scratch {s['final']:.3f}, victim {orig:.3f})"})
    tr = [r for r in runs if r["table"] == "transforms" and r["fraction"] == f]
    parts = []
    for how in dict.fromkeys(r["held"] for r in tr):
        by = {r["variant"]: r for r in tr if r["held"] == how}
        parts.append(", ".join(f"{v} {r['final']:.3f} ({_fmt_ratio(r, s)})" for v, r in by.items()) + f" [{how}]")
    if parts:
        claims.append({"claim": CLAIM_UPM,
                       "measured": f"p = {params['transform_p']}, {f:.0%} of the data, accuracy (compute vs "
                                   f"scratch): " + "; ".join(parts)})
        gaps = []
        for how in dict.fromkeys(r["held"] for r in tr):
            by = {r["variant"]: r for r in tr if r["held"] == how}
            if "none" in by and "transforms" in by:
                gaps.append(f"{how}: {by['none']['final'] - s['final']:+.3f} -> "
                            f"{by['transforms']['final'] - s['final']:+.3f}"
                            + (f" (stitched {by['transforms + stitching']['final'] - s['final']:+.3f})"
                               if "transforms + stitching" in by else ""))
        claims.append({"claim": CLAIM_TARGET,
                       "measured": "accuracy above from scratch without -> with transforms: " + "; ".join(gaps)})
    col = [r for r in runs if r["table"] == "collude" and r["fraction"] == f]
    single = [r for r in col if r["k"] == 1]
    if single:
        b = max(single, key=lambda r: r["final"])
        whole = [r for r in col if r["p_held"] == 1.0 and r["variant"] == "transforms"]
        tail = (f"; all {len(whole[0]['ranks'])} ranks copying at different rotation epochs: "
                f"{whole[0]['curve'][0][1]:.3f} before fine-tuning, {whole[0]['final']:.3f} after "
                f"({_fmt_ratio(whole[0], s)})" if whole else "")
        claims.append({"claim": CLAIM_SPLIT,
                       "measured": f"{f:.0%} of the data: the most useful single rank (stage {b['held']}, "
                                   f"{b['p_held']:.0%} of the parameters) reaches {b['final']:.3f} vs "
                                   f"{s['final']:.3f} from scratch ({_fmt_ratio(b, s)}){tail}"})
    return claims


def _fmt_ratio(r: dict[str, Any], s: dict[str, Any]) -> str:
    q = _ratio(r["steps_to_target"], s["steps_to_target"])
    if r["steps_to_target"] is None:
        return "target not reached"
    return f"{q:.2f}x scratch steps" if q is not None else f"{r['steps_to_target']} steps, scratch 0"


def _notes(data: dict[str, Any], params: dict[str, Any]) -> list[str]:
    orig = data["original"]
    notes = [f"Victim: ResNet-18 width {params['width']} on {params['data']} ({data['parameters']:,} parameters, "
             f"{len(data['layers'])} layers), test accuracy {data['original_accuracy']:.3f}, trained in "
             f"{orig.get('steps')} steps ({(orig.get('seconds') or 0):.0f} s when it was trained). Pipeline of "
             f"{params['stages']} stages: "
             + ", ".join(f"stage {i} {q:.0%}" for i, q in enumerate(data["stage_fractions"]))
             + " of the parameters.",
             (f"Every fine-tuning and from-scratch run takes {params['steps']} steps; steps to target are read off "
              f"{params['checkpoints']} doubling checkpoints, so they are upper bounds at that resolution.")]
    for f, s in data["scratch"].items():
        notes.append(f"{float(f):.0%} of the data ({s['samples']} images): from scratch reaches {s['final']:.3f} in "
                     f"{s['steps']} steps ({s['seconds']:.0f} s); the target, {params['target']:.0%} of its "
                     f"{s['curve'][-1][1]:.3f} on the curve's {params['test_images'] or 'all'} test images, is "
                     f"{s['target']:.3f}, reached at step {s['steps_to_target']}.")
    changed = {k: v for k, v in params.items() if k != "cache" and v != PRESETS["paper"].get(k)}
    if changed:
        notes.append("Settings that differ from the paper preset: "
                     + ", ".join(f"{k}={v}" for k, v in changed.items()) + ".")
    notes += [f"{c['claim']}. Measured: {c['measured']}." for c in data["claims"]]
    runs = data["runs"]
    helped = [r for r in runs if r["table"] == "position" and r["steps_to_target"] is not None
              and data["scratch"][str(r["fraction"])]["steps_to_target"]
              and r["steps_to_target"] < data["scratch"][str(r["fraction"])]["steps_to_target"]]
    notes.append(f"{len(helped)} of {sum(1 for r in runs if r['table'] == 'position')} by-position runs reached the "
                 "target in fewer steps than training from scratch.")
    notes.append("Not measured: an attacker who recovers the boundary permutations without data (e.g. by matching "
                 "batch-norm statistics across a boundary), and starting the missing layers from a public model.")
    return notes


def _plot(result: AttackResult, path: Path) -> None:
    runs, scratch = result.data["runs"], result.data["scratch"]
    fracs = sorted({r["fraction"] for r in runs})
    fig, axes = new_figure(len(fracs), width=4.6)
    colors = {"input": "tab:blue", "middle": "tab:orange", "output": "tab:green"}
    for ax, f in zip(axes, fracs):
        for how in dict.fromkeys(r["held"] for r in runs if r["table"] == "position"):
            pts = sorted((r["p_held"], r["final"]) for r in runs
                         if r["table"] == "position" and r["held"] == how and r["fraction"] == f)
            ax.plot(*zip(*pts), "o-", color=colors.get(how), label=f"held from {how}")
        size = [r for r in runs if r["table"] == "size" and r["fraction"] == f]
        if size:
            by_p: dict[float, list] = {}
            for r in size:
                by_p.setdefault(r["p"], []).append(r)
            pts = sorted((statistics.fmean(r["p_held"] for r in v), statistics.fmean(r["final"] for r in v))
                         for v in by_p.values())
            ax.plot(*zip(*pts), "s--", color="tab:purple", label="random layers")
        for r in runs:
            if r["table"] == "transforms" and r["fraction"] == f and r["variant"] != "none":
                ax.plot(r["p_held"], r["final"], "x" if r["variant"] == "transforms" else "+", ms=9,
                        color=colors.get(r["held"], "k"))
        ax.plot([], [], "kx", label="transforms, shards from different epochs")
        if result.params.get("stitch"):
            ax.plot([], [], "k+", label="... + stitching layers")
        ax.axhline(scratch[str(f)]["final"], color="tab:red", ls="--", lw=1, label="from scratch (same data, steps)")
        ax.axhline(result.data["original_accuracy"], color="gray", ls=":", lw=1, label="victim")
        ax.set_xlabel("fraction p of the parameters held")
        ax.set_ylabel("test accuracy after fine-tuning")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{f:.0%} of the training data ({scratch[str(f)]['samples']} images)", fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


__all__ = ["POSITIONS", "PRESETS", "STRATEGIES", "LayerGroup", "accuracy", "as_units", "assemble", "capture",
           "epoch_maps", "finetune", "layer_groups", "run", "schedule", "select_layers", "steps_to", "stitch"]
