"""A small CNN for 28x28 or 8x8 single-channel digits."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; about 60k parameters at 28x28.

    Args:
        num_classes: Output classes.
        image_size: Input side (28 for MNIST, 8 for scikit-learn digits).
        width: Channels of the first conv (the second has twice as many).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 28, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
