"""Model definitions written in the project (no torchvision)."""

from chiplock.models.cnn import SmallCNN
from chiplock.models.resnet import ResNet, resnet18, resnet50

__all__ = ["ResNet", "SmallCNN", "resnet18", "resnet50"]
