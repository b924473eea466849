"""Model definitions written in the project (no torchvision)."""

from chiplock_demo.models.cnn import SmallCNN
from chiplock_demo.models.resnet import ResNet, resnet18, resnet50

__all__ = ["ResNet", "SmallCNN", "resnet18", "resnet50"]
