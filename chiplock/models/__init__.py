"""Model definitions written in the project (no torchvision)."""

from chiplock.models.cnn import SmallCNN

__all__ = ["SmallCNN"]
