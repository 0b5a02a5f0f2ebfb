"""Model builders: torchvision's classifiers (weights=None) and the papers' architectures."""
from .registry import ZOO, Entry, all_names, build, lookup, torchvision_names
from .typec import ResNet18TypeC, resnet18_typec

__all__ = ["ZOO", "Entry", "all_names", "build", "lookup", "torchvision_names", "ResNet18TypeC", "resnet18_typec"]
from .plain import PlainNet, StackedCNN, plainnet18, stacked_cnn  # noqa: E402,F401
from .paper import CifarNV, CifarResNet, MLP, cifar_nv, enorm_fc, pbn_mlp, plainnet34, resnet18_cifar, resnet34_cifar, resnet50_cifar  # noqa: E402,F401,E501
from .mnist1d import Conv1dNet, MLP1d, mnist1d_cnn, mnist1d_mlp, mnist1d_plain  # noqa: E402,F401
from .quant import DepthwiseSeparableNet, MobileNetV2ReLU, VGG11Small, dwsep_net, mobilenet_v2_relu, vgg11_bn_small  # noqa: E402,F401,E501
