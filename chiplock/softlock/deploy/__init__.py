"""Deployment-time transforms an attacker applies to a soft-locked model (see :mod:`.base`)."""

from chiplock.softlock.deploy.base import (RECIPES, STEPS, AttackRow, AttackTable, Calibration, Step, attack_table,
                                           family, recipes_for, register_recipe, register_step, run_recipe)
from chiplock.softlock.deploy import quant as _quant  # noqa: F401  (registers the quantisation steps)
from chiplock.softlock.deploy import prune as _prune  # noqa: F401  (registers the pruning steps)

__all__ = ["AttackRow", "AttackTable", "Calibration", "RECIPES", "STEPS", "Step", "attack_table", "family",
           "recipes_for", "register_recipe", "register_step", "run_recipe"]
