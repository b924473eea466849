"""Attacks on chiplock's locks (expert layer): each computes a statistic, and its AUC says whether it works.

* :mod:`chiplock.attacks.hardlock`: key oracles against ``pre-aes`` (canonical codes, code ranks, breakpoint hits,
  KS fit).
* :mod:`chiplock.attacks.structure`: the structural panel (spectrum, row norms, conv-kernel smoothness, ...).
* :mod:`chiplock.attacks.locked`: the attacker's view of a locked tensor (the one place that knows the format).
* :mod:`chiplock.attacks.auc`: AUC, its sampling noise, and how many samples a test needs.

``benchmarks/attack_distinguish.py`` measures them on the pretrained DigitCNN; docs/attacks.md has the numbers.

The harness (``chiplock attack <name>``, ``make paper`` → docs/results.md) prices every lock, one module per attack,
each with ``PRESETS`` (``smoke``, ``paper``) and ``run(preset=..., **overrides) -> AttackResult``
(:mod:`chiplock.attacks.result`):

* :mod:`~chiplock.attacks.crack`: brute force over a reduced key space through the real file and licence (tag,
  structural distinguisher, full evaluation), cost per guess split KDF / check (the paper's Table 1).
* :mod:`~chiplock.attacks.enumeration`: precision-fingerprint configurations software reaches here, and opening a
  precision-locked file by walking them.
* :mod:`~chiplock.attacks.distinguish`: the structural panel's AUC per statistic and tensor (pre-aes, shuffle).
* :mod:`~chiplock.attacks.emulate`: native vs emulated speed of each authorized configuration (Table 4).
* :mod:`~chiplock.attacks.retraining`, :mod:`~chiplock.attacks.noise`: retraining (Figures 3-4) and weight noise
  (Figure 5) against soft locks (:mod:`~chiplock.attacks.softmodels` trains the locked models).
* :mod:`~chiplock.attacks.scale`: lock/unlock time vs parameter count and the attacker's cost per guess vs size.
* :mod:`~chiplock.attacks.paper`: runs them all and writes docs/results.md.
"""

from chiplock.attacks.auc import auc, false_alarm_probability, null_sigma, samples_needed
from chiplock.attacks.hardlock import (breakpoint_hit_fraction, canonical_code_fraction, code_rank_uniformity,
                                       ks_fit_pvalue, model_cdf, quantize_int8, right_wrong_samples)
from chiplock.attacks.locked import LockedTensor, PreAesTensor, lock_pre_aes

__all__ = ["LockedTensor", "PreAesTensor", "auc", "breakpoint_hit_fraction", "canonical_code_fraction",
           "code_rank_uniformity", "false_alarm_probability", "ks_fit_pvalue", "lock_pre_aes", "model_cdf",
           "null_sigma", "quantize_int8", "right_wrong_samples", "samples_needed"]
