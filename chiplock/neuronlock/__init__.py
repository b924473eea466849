"""Neuron authorization locks (EdgePro), with the password derived from a chiplock key.

A few *authorization neurons* per locked layer carry a secret locking value times a secret scale; the model is
lock-trained so that it is accurate only with that password applied. The password is derived with HKDF-SHA256
from a 32-byte key, so a device that re-derives the key re-derives the password, and a wrong key gives a wrong but
plausible password (no error).

Expert layer: :mod:`chiplock.neuronlock.password` (ranking, derivation) and :mod:`chiplock.neuronlock.runtime`
(hooks).
"""

from __future__ import annotations

from chiplock.neuronlock.password import (
    KEY_BYTES,
    LayerPassword,
    NeuronStats,
    Password,
    PasswordSpec,
    default_layers,
    derive_password,
    rank_neurons,
)
from chiplock.neuronlock.runtime import PasswordedModel, PasswordHandle, apply_password

__all__ = [
    "KEY_BYTES",
    "LayerPassword",
    "NeuronStats",
    "Password",
    "PasswordHandle",
    "PasswordSpec",
    "PasswordedModel",
    "apply_password",
    "default_layers",
    "derive_password",
    "rank_neurons",
]
