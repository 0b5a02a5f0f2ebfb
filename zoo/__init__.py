"""Model builders: torchvision's classifiers (weights=None) and the papers' architectures."""
from .registry import ZOO, Entry, all_names, build, lookup, torchvision_names
from .typec import ResNet18TypeC, resnet18_typec

__all__ = ["ZOO", "Entry", "all_names", "build", "lookup", "torchvision_names", "ResNet18TypeC", "resnet18_typec"]
