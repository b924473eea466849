"""The attacker in the loop: deployment-time transforms and the "best generic attack" on a soft lock.

A soft-locked model is a plain file. Whoever holds it and wants it on the *unauthorized* configuration does not
cast it naively: a deployment engineer runs the standard tools of that format (amax scaling, cross-layer
equalisation, BatchNorm folding and re-estimation, bias correction, calibration-based pruning...) with a few
hundred unlabelled images. A soft lock is only as strong as the best of those recipes, so the unauthorized
accuracy we report is the maximum over every recipe (and composition) registered here, not the naive cast.

A :class:`Step` maps ``(model, config, calibration)`` to ``(model, config)``: it may rewrite the model (fold,
equalise, prune, correct biases) and/or change the configuration it runs on (e.g. ``e4m3fn`` becomes
``e4m3fn@channel``, an amax-scaled deployment of the same element format). A recipe is a chain of step names;
:func:`attack_table` runs every recipe that applies to the target and measures accuracy and time.

Steps are marked ``standard`` (a tool a deployment engineer applies anyway) or not (a bespoke attack that knows
the lock mechanism); the issue's targets are stated against the standard ones, and the bespoke ones are reported
beside them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from chiplock.registry import Registry
from chiplock.softlock.registry import parse_config

#: ``fn(model, config, calib) -> (model, config)``; ``model`` is the attacker's own copy (mutate it freely).
StepFn = Callable[[nn.Module, Any, "Calibration"], "tuple[nn.Module, Any]"]


@dataclass(frozen=True)
class Calibration:
    """What the attacker has besides the file: unlabelled inputs (at most a few hundred)."""

    x: torch.Tensor
    batch_size: int = 256


@dataclass(frozen=True)
class Step:
    """One deployment-time transform.

    Args:
        name: Registry name, used in recipes (``"fold-bn"``, ``"amax-channel"``, ``"wanda"``...).
        fn: The transform (see :data:`StepFn`).
        applies: ``applies(target_config) -> bool``: whether the step makes sense for this unauthorized target.
        standard: A standard tool of the target's deployment pipeline (``False``: bespoke, mechanism-aware).
        doc: One line for tables and ``chiplock softlock attack --list``.
    """

    name: str
    fn: StepFn
    applies: Callable[[Any], bool]
    standard: bool = True
    doc: str = ""
    fits: Optional[Callable[[nn.Module], bool]] = None  # architecture check (None: any model)


STEPS: Registry[Step] = Registry("deployment step")
#: Recipes (chains of step names), tried in order; :func:`recipes_for` keeps those whose steps all apply.
RECIPES: list[tuple[str, ...]] = []


def register_step(name: str, fn: StepFn, applies: Callable[[Any], bool], *, standard: bool = True,
                  doc: str = "", fits: Optional[Callable[[nn.Module], bool]] = None) -> Step:
    """Register a deployment step; ``fits(model)`` (optional) says whether the step has anything to act on in
    a given architecture, so recipes built for another architecture are not run as duplicate rows."""
    step = Step(name, fn, applies, standard, doc, fits)
    STEPS.register(name, step)
    return step


def register_recipe(*chain: str) -> None:
    """Add a recipe (a chain of registered step names) once."""
    if tuple(chain) not in RECIPES:
        RECIPES.append(tuple(chain))


def family(cfg: Any) -> str:
    """``float``, ``integer``, ``sparsity`` (the target's family, from the format registry) or ``compose``."""
    return getattr(cfg, "family", "compose")


def recipes_for(target: Any, *, standard_only: bool = False,
                model: Optional[nn.Module] = None) -> list[tuple[str, ...]]:
    """Every registered recipe whose steps all apply to ``target`` (plus the naive cast, ``()``, first) and, when
    ``model`` is given, fit its architecture."""
    target = parse_config(target)
    out: list[tuple[str, ...]] = [()]
    for chain in RECIPES:
        steps = [STEPS.get(s) for s in chain]
        if not all(s.applies(target) for s in steps) or (standard_only and not all(s.standard for s in steps)):
            continue
        if model is not None and not all(s.fits is None or s.fits(model) for s in steps):
            continue
        out.append(chain)
    return out


def run_recipe(model: nn.Module, target: Any, chain: Iterable[str], calib: Calibration) -> tuple[nn.Module, Any]:
    """Apply ``chain`` to a copy of ``model``; returns ``(deployed model, configuration it runs on)``."""
    from chiplock.softlock.apply import strip_config

    m = strip_config(copy.deepcopy(model)).eval()
    cfg = parse_config(target)
    for name in chain:
        m, cfg = STEPS.get(name).fn(m, cfg, calib)
        m.eval()
    return m, cfg


@dataclass
class AttackRow:
    """One recipe's result: the unauthorized accuracy the attacker gets and what it cost."""

    chain: tuple[str, ...]
    config: str
    accuracy: float
    seconds: float
    standard: bool

    @property
    def recipe(self) -> str:
        return " + ".join(self.chain) if self.chain else "naive cast"


@dataclass
class AttackTable:
    target: str
    rows: list[AttackRow] = field(default_factory=list)
    #: ``(recipe, error)`` for recipes whose tool failed on this model (e.g. a Hessian that is not positive
    #: definite); they are reported, not silently dropped, and the other recipes still run.
    failed: list[tuple[str, str]] = field(default_factory=list)

    def best(self, *, standard_only: bool = True) -> AttackRow:
        rows = [r for r in self.rows if r.standard or not standard_only]
        return max(rows, key=lambda r: (r.accuracy, -r.seconds))

    def to_dict(self) -> dict:
        return {"target": self.target,
                "rows": [{"recipe": r.recipe, "config": r.config, "accuracy": r.accuracy, "seconds": r.seconds,
                          "standard": r.standard} for r in self.rows],
                "failed": [{"recipe": c, "error": e} for c, e in self.failed]}


def attack_table(model: nn.Module, target: Any, calib_x: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 *, recipes: Optional[list[tuple[str, ...]]] = None, standard_only: bool = False,
                 on_row: Optional[Callable[[AttackRow], None]] = None) -> AttackTable:
    """Run every applicable recipe against ``model`` deployed on ``target``; one row per recipe.

    Args:
        model: The (soft-locked) model, plain layers.
        target: The unauthorized configuration (a name such as ``"e4m3fn"`` or a config).
        calib_x: The attacker's unlabelled calibration inputs (use at most 256).
        x_test, y_test: Held-out labelled data to score each deployment (the defender's measurement).
        recipes: Chains to run (default :func:`recipes_for`).
        standard_only: Skip bespoke steps.
        on_row: Called after each row (progress).
    """
    from chiplock.softlock.apply import apply_config
    from chiplock_demo.training import accuracy

    target = parse_config(target)
    calib = Calibration(calib_x)
    table = AttackTable(target.name)
    if recipes is None:
        recipes = recipes_for(target, standard_only=standard_only, model=model)
    for chain in recipes:
        t0 = time.perf_counter()
        try:
            deployed, cfg = run_recipe(model, target, chain, calib)
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # torch's LinAlgError is a RuntimeError
            table.failed.append((" + ".join(chain), f"{type(exc).__name__}: {exc}"[:300]))
            continue
        seconds = time.perf_counter() - t0
        acc = accuracy(apply_config(deployed, cfg, inplace=True), x_test, y_test)
        row = AttackRow(tuple(chain), cfg.name, acc, seconds, all(STEPS.get(s).standard for s in chain))
        table.rows.append(row)
        if on_row is not None:
            on_row(row)
    return table


__all__ = ["AttackRow", "AttackTable", "Calibration", "RECIPES", "STEPS", "Step", "attack_table", "family",
           "recipes_for", "register_recipe", "register_step", "run_recipe"]
