"""ResNet-18 of type C: every shortcut is a learned 1×1 convolution (ENorm paper §4.3, He et al. 2015).

The ENorm paper trains it without BatchNorm except one BN after the last layer (its §6.2);
``norm="bn"`` gives the usual per-conv BN instead. ``stem="cifar"`` is the 3×3 stem of
CIFAR ResNets, ``stem="imagenet"`` the 7×7/2 stem with max-pool.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .recipe import hparams, kaiming_init


def _norm(norm: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if norm == "bn" else nn.Identity()


class TypeCBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=norm != "bn")
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=norm != "bn")
        self.bn2 = _norm(norm, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=norm != "bn")
        self.bn_skip = _norm(norm, c_out)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.bn_skip(self.skip(x)))


class ResNet18TypeC(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, norm: str = "none", stem: str = "cifar",
                 in_channels: int = 3):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=norm != "bn"), _norm(norm, width),
                                      nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=norm != "bn"), _norm(norm, width),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            for j in range(2):
                blocks.append(TypeCBlock(c, c_out, 2 if (j == 0 and i > 0) else 1, norm))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        # the paper's single BN after the last layer when the network has no other normalisation
        self.out_bn = nn.BatchNorm1d(num_classes) if norm != "bn" else nn.Identity()
        kaiming_init(self)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))
        return self.out_bn(self.fc(torch.flatten(x, 1)))


@hparams(epochs=90, init="kaiming", momentum=0.9, lr="0.1·B/256", batch_sizes=(32, 64, 128, 256),
         weight_decay={32: 1e-5, 64: 10 ** -4.5, 128: 1e-4, 256: 1e-4}, lr_schedule="quadratic decay to 1e-5",
         augment="Szegedy et al. 2014 (ImageNet)")
def resnet18_typec(num_classes: int = 10, **kw) -> ResNet18TypeC:
    """ResNet-18 of type C (ENorm §4.3, §6.3): every shortcut a learned 1×1 conv; ``norm="none"`` (default) has
    biases and one BN after the classifier, ``norm="bn"`` a BN after every conv. Input 3×32×32 (``stem="cifar"``).

    Init: Kaiming (§6.3, He et al. 2015a): normal, std √(2/fan_in), every conv (shortcuts too) and the
    classifier; biases 0 (He et al.'s b = 0); BNs γ = 1, β = 0.

    Paper's training (§6.3, ImageNet, the setup of Wu & He 2018): 90 epochs, SGD with momentum 0.9, lr 0.1·B/256
    for batch B ∈ {32, 64, 128, 256}, weight decay 1e-4 (B = 128, 256), 10^-4.5 (64), 1e-5 (32), lr decayed
    quadratically to 1e-5, standard augmentation; median error of the last 5 epochs reported.
    """
    return ResNet18TypeC(num_classes=num_classes, **kw)
