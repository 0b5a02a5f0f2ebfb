"""PlainNet-18 (CIFAR ResNet-18 without shortcuts, He et al. 2016) and the stacked CNN of pbn §5.2."""
from __future__ import annotations

import torch
import torch.nn as nn

from .recipe import PBN_CIFAR, hparams, kaiming_init
from .registry import register


def _conv_bn(c_in: int, c_out: int, stride: int, norm: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm)] + ([nn.BatchNorm2d(c_out)] if norm else []) + \
        [nn.ReLU()]


class PlainNet(nn.Module):
    """3×3 stem, four stages of 2·``blocks`` 3×3 convs (64..512 × width/64, stride 2 at stages 2–4), pool, fc."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64, norm: bool = True,
                 in_channels: int = 3):
        super().__init__()
        layers, c = _conv_bn(in_channels, width, 1, norm), width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(2 * n):
                layers += _conv_bn(c, c_out, 2 if (i > 0 and j == 0) else 1, norm)
                c = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class StackedCNN(nn.Module):
    """``depth`` conv layers of ``width`` channels (kernel 3, stride 1, padding 1, no bias), each followed
    by BN (``norm=True``) and ReLU, then global average pooling and a linear classifier (pbn §5.2, F.1)."""

    def __init__(self, depth: int = 50, width: int = 128, num_classes: int = 10, in_channels: int = 3,
                 norm: bool = True):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += _conv_bn(in_channels if i == 0 else width, width, 1, norm)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register("plainnet18", (1, 3, 32, 32))
@hparams(**PBN_CIFAR, init="kaiming")
def plainnet18(num_classes: int = 10, **kw) -> PlainNet:
    """PlainNet-18 (pbn §5.1): ResNet-18 for CIFAR without shortcuts — 3×3 stem and 2-2-2-2 pairs of 3×3
    convs (64..512 channels), each conv + BN + ReLU. Input 3×32×32.

    Init: Kaiming (He et al. 2015a, the initialisation of He et al. 2016 whose networks these are): normal,
    std √(2/fan_in), every conv and the classifier; biases (``norm=False``) 0; BN γ = 1, β = 0.

    Paper's training (pbn F.1), as the ResNets: batch 128, 64k iterations, lr × 0.1 at 32k and 48k, weight
    decay 1e-4, SGD+BN lr 0.1, G-SGD+P-BN lr in {0.1, 0.2, 0.5, 1.0} without momentum (no λ: no skips)."""
    return PlainNet((2, 2, 2, 2), num_classes=num_classes, **kw)


@register("stacked_cnn", (1, 3, 32, 32))
@hparams(batch_size=128, init="kaiming", observed="σ of BN / P-BN per layer on the first mini-batch, at init")
def stacked_cnn(depth: int = 50, width: int = 128, **kw) -> StackedCNN:
    """The stacked CNN of pbn §5.2: ``depth`` 3×3 convs of ``width`` channels (stride 1, padding 1, no bias),
    each + BN + ReLU, global average pooling, a linear classifier. Input 3×32×32.

    Init: Kaiming as plainnet18 (the paper says only "randomly initialized"; He et al. 2015a is the
    initialisation of the networks it trains): normal, std √(2/fan_in), convs and classifier; biases 0;
    BN γ = 1, β = 0.

    Paper's training: none — the network is observed at initialisation on the first CIFAR-10 mini-batch
    of 128 images (σ of BN vs P-BN per layer, gradient norms); depth 50, width 128."""
    return StackedCNN(depth=depth, width=width, **kw)
