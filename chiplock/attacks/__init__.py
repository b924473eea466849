"""Attacks on chiplock's locks (expert layer): each computes a statistic, and its AUC says whether it works.

* :mod:`chiplock.attacks.hardlock`: key oracles against ``pre-aes`` (canonical codes, code ranks, breakpoint hits,
  KS fit).
* :mod:`chiplock.attacks.structure`: the structural panel (spectrum, row norms, conv-kernel smoothness, ...).
* :mod:`chiplock.attacks.locked`: the attacker's view of a locked tensor (the one place that knows the format).
* :mod:`chiplock.attacks.auc`: AUC, its sampling noise, and how many samples a test needs.

``benchmarks/attack_distinguish.py`` measures them on the pretrained DigitCNN; docs/attacks.md has the numbers.
"""

from chiplock.attacks.auc import auc, false_alarm_probability, null_sigma, samples_needed
from chiplock.attacks.hardlock import (breakpoint_hit_fraction, canonical_code_fraction, code_rank_uniformity,
                                       ks_fit_pvalue, model_cdf, quantize_int8, right_wrong_samples)
from chiplock.attacks.locked import LockedTensor, PreAesTensor, lock_pre_aes

__all__ = ["LockedTensor", "PreAesTensor", "auc", "breakpoint_hit_fraction", "canonical_code_fraction",
           "code_rank_uniformity", "false_alarm_probability", "ks_fit_pvalue", "lock_pre_aes", "model_cdf",
           "null_sigma", "quantize_int8", "right_wrong_samples", "samples_needed"]
