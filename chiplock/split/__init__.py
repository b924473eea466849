"""Split-model protection for distributed training: no rank ever holds the whole model.

A model is a chain of units (:mod:`chiplock.split.units`) cut by depth into stages; the stages are one
chiplock container with a content key per stage, so a rank's licence opens its own stage only
(:mod:`chiplock.split.shards`). Each rank materialises only its stage and trains it in a
``torch.distributed.pipelining`` schedule (:mod:`chiplock.split.pipeline`, launched by ``torchrun`` through
:mod:`chiplock.split.train` or ``chiplock split train``), with random channel maps folded into the layers at
every stage boundary and rotated on a schedule (:mod:`chiplock.split.boundary`). See docs/split.md.
"""

from chiplock.split.boundary import BoundaryMap, fold, random_boundary, unfold
from chiplock.split.shards import issue_stage_license, load_stage, lock_split, lock_stages, save_stage
from chiplock.split.units import ArchSpec, Layout, Units, build_stage, build_units, make_layout, split_units

__all__ = ["ArchSpec", "BoundaryMap", "Layout", "Units", "build_stage", "build_units", "fold", "issue_stage_license",
           "load_stage", "lock_split", "lock_stages", "make_layout", "random_boundary", "save_stage", "split_units",
           "unfold"]
