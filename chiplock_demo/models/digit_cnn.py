"""The architecture of the pretrained MNIST CNN shipped in the `digit-recognizer-py` package.

The package's own module imports torchvision, so the (short) definition is repeated here and only its weights
file is read, with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

#: The normalisation the pretrained model expects (MNIST mean and std).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DigitCNN(nn.Module):
    """Three conv blocks (32/64/128 channels) and two linear layers; 390k parameters, 28x28 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MNIST_MEAN) / MNIST_STD
        return self.fc_layers(self.conv_layers(x).flatten(1))


def pretrained_weights_path() -> Path | None:
    """Path of the pretrained state dict inside `digit-recognizer-py`, or ``None`` if it is not installed."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / "handwriting_model.pth"
    return path if path.is_file() else None


def load_pretrained() -> DigitCNN | None:
    """The pretrained model in eval mode, or ``None`` when the package is missing."""
    path = pretrained_weights_path()
    if path is None:
        return None
    model = DigitCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
