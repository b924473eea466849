"""The lock-training configuration.

Each tunable field carries its command-line help in ``metadata``; ``chiplock softlock train`` builds its options
from these fields (:func:`chiplock.registry.options_from_dataclass`), so a new field is one line here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from chiplock.softlock.registry import config_from_dict, config_to_dict, parse_config


def _cli(text: str, **extra: Any) -> dict:
    """Field metadata: the CLI help text and, optionally, ``flag`` and ``choices``."""
    return {"help": text, **extra}


@dataclass(frozen=True)
class SoftLockConfig:
    """How to fine-tune a model so it works on ``authorized`` and fails on every ``unauthorized`` configuration.

    The loss is ``L(f_a(x), y) + lam * mean_u (epsilon - L(f_u(x), y))**2`` (Clifford et al.).

    Args:
        authorized: Configuration (or name such as ``"fp16"``) the model must keep working on.
        unauthorized: One or several configurations (or names) the model must fail on.
        lam: Weight ``lambda`` of the unauthorized term.
        epsilon: Target unauthorized loss; ``None`` means chance level, ``ln(num_classes)``.
        epochs: Passes over the training set.
        lr: Adam learning rate.
        batch_size: Global batch size (split across DDP ranks; must be divisible by the world size).
        unauth_fraction: Fraction of each batch also run through the unauthorized configurations; below 1 it
            makes a lock step cheaper at the price of a noisier unauthorized term.
        freeze_bn: Keep BatchNorm statistics fixed (eval mode) so training sees exactly the deployed function.
        hinge: Penalise only ``L_u < epsilon`` (``lam * max(0, epsilon - L_u)**2``, equal to the paper's term
            whenever the unauthorized loss is below target); ``False`` is the paper's two-sided square, which
            also pulls an already-broken unauthorized model back up towards chance-level *loss*.
        levers: What to plant before training: ``"decoys"`` (decoy cancellation, :mod:`chiplock.softlock.decoys`),
            ``"levers"`` (the function-preserving scale/outlier/offset levers of :mod:`chiplock.softlock.levers`,
            which standard deployment tools undo), ``"auto"`` (decoys where they apply, else the levers) or
            ``"none"`` (``L_lock`` alone).
        surrogates: Add, for each unauthorized fixed-range float format, its amax-scaled deployment
            (:class:`~chiplock.softlock.scaled.Scaled` per-channel) to the unauthorized term: the attacker in the
            loop, since nobody deploys FP8 by casting. Used with decoys; a legacy lever cannot separate the
            scaled deployment, so lock training then warns (``WeakLockWarning``) and trains against the cast.
        seed: Seed for initialisation-independent randomness (batch order); runs are reproducible.
        version: Schema version.

    Raises:
        ValueError: A numeric field is out of range or no unauthorized configuration is given.

    Example:
        >>> SoftLockConfig(authorized="fp16", unauthorized=("int8",), lam=1.0, epochs=5)
    """

    authorized: Any = "fp32"
    unauthorized: tuple = ("e4m3fn",)
    lam: float = field(default=1.0, metadata=_cli("Weight of the unauthorized term.", flag="--lambda"))
    epsilon: Optional[float] = field(default=None, metadata=_cli("Target unauthorized loss (default ln(classes))."))
    epochs: int = field(default=3, metadata=_cli("Lock-training epochs."))
    lr: float = field(default=1e-3, metadata=_cli("Adam learning rate."))
    batch_size: int = field(default=64, metadata=_cli("Global batch size."))
    unauth_fraction: float = field(default=1.0,
                                   metadata=_cli("Fraction of each batch run unauthorized (cheaper steps)."))
    freeze_bn: bool = field(default=True, metadata=_cli("Keep BatchNorm statistics fixed during lock training."))
    levers: str = field(default="auto", metadata=_cli("decoys: plant decoy cancellations first; levers: the "
                                                      "scale/outlier/offset levers; auto: decoys where they "
                                                      "apply, else levers; none: L_lock only.",
                                                      choices=("auto", "decoys", "levers", "none")))
    hinge: bool = field(default=True, metadata=_cli("Penalise only an unauthorized loss below epsilon "
                                                    "(--no-hinge: the paper's two-sided square)."))
    surrogates: bool = field(default=True, metadata=_cli("Also train against the attacker's standard deployment "
                                                         "of each unauthorized float format (per-channel amax "
                                                         "scaling), not only the naive cast."))
    seed: int = field(default=0, metadata=_cli("Random seed."))
    version: int = 2

    def __post_init__(self) -> None:
        unauth = self.unauthorized
        if isinstance(unauth, (str, bytes)) or not hasattr(unauth, "__iter__"):
            unauth = (unauth,)
        object.__setattr__(self, "authorized", parse_config(self.authorized))
        object.__setattr__(self, "unauthorized", tuple(parse_config(u) for u in unauth))
        if not self.unauthorized:
            raise ValueError("SoftLockConfig(unauthorized=...) needs at least one configuration, e.g. ('int8',)")
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"SoftLockConfig(lam={self.lam}): use a finite lambda >= 0")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"SoftLockConfig(epsilon={self.epsilon}): use a positive target loss or None")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("SoftLockConfig: epochs >= 0, batch_size >= 1 and lr > 0 are required")
        if self.levers not in ("auto", "decoys", "levers", "none"):
            raise ValueError(f"SoftLockConfig(levers={self.levers!r}): use auto, decoys, levers or none")
        if not 0 < self.unauth_fraction <= 1:
            raise ValueError(f"SoftLockConfig(unauth_fraction={self.unauth_fraction}): use a fraction in (0, 1]")

    def trained_against(self) -> tuple:
        """The unauthorized configurations lock training evaluates: each configured one and, with
        ``surrogates``, the attacker's amax-scaled deployment of each unscaled MiniFloat."""
        from chiplock.softlock.minifloat import MiniFloat
        from chiplock.softlock.scaled import Scaled

        out = list(self.unauthorized)
        if self.surrogates:
            for u in self.unauthorized:
                if isinstance(u, MiniFloat):
                    s = Scaled(u.name, weights="channel")
                    if s not in out:
                        out.append(s)
        return tuple(out)

    def target_loss(self, num_classes: int) -> float:
        """``epsilon``, or the chance-level cross-entropy ``ln(num_classes)`` when it is ``None``."""
        return self.epsilon if self.epsilon is not None else math.log(num_classes)

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in ("lam", "epsilon", "epochs", "lr", "batch_size", "unauth_fraction",
                                           "freeze_bn", "levers", "hinge", "surrogates", "seed", "version")}
        d["authorized"] = config_to_dict(self.authorized)
        d["unauthorized"] = [config_to_dict(u) for u in self.unauthorized]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SoftLockConfig":
        d = json.loads(text)
        d["authorized"] = config_from_dict(d["authorized"])
        d["unauthorized"] = tuple(config_from_dict(u) for u in d["unauthorized"])
        return cls(**d)
