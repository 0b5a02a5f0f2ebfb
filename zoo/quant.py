"""Small convolutional networks of the quantization study (docs/quantization.md), for 32×32 inputs.

Each is a named model of its own, with BatchNorm after every convolution and ReLU activations:
VGG-11 with BN at reduced width, a plain depthwise-separable network (MobileNet-v1 style) and
MobileNetV2 with ReLU where the original has ReLU6. The last is a different network from
torchvision's ``mobilenet_v2``, not a rewrite of it: a ReLU6 clips at 6, is not positively
homogeneous, and freezes its channels' rescaling groups, so the zoo offers the ReLU variant under
its own name and never swaps the activations of a model it is given. Initialisation is PyTorch's
default for every layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register

VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")  # torchvision's configuration "A" in units of width
DWSEP = ((2, 1), (4, 2), (4, 1), (8, 2), (8, 1), (16, 2), (16, 1))  # (channels in units of width, stride)
# MobileNetV2 (Sandler et al. 2018, Table 2) as (expansion, channels, blocks, stride); the stem has stride 1
# instead of 2, so that 32×32 inputs end at 2×2, not 1×1.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return layers + ([nn.ReLU(inplace=True)] if relu else [])


class PooledClassifier(nn.Module):
    """``layers`` in sequence (``features``), global average pooling, one linear classifier (``fc``)."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGG11Small(PooledClassifier):
    """VGG-11 with BatchNorm (Simonyan & Zisserman 2015, configuration A; torchvision's ``vgg11_bn``) at
    ``width`` channels in the first stage instead of 64 (16 → 16, 32, 64, 64, 128 × 4), five max-pools
    (32×32 → 1×1), global average pooling and one linear classifier in place of the three 4096-wide ones."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3):
        layers, c = [], in_channels
        for v in VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(c, v * width)
                c = v * width
        super().__init__(layers, c, num_classes)


class DepthwiseSeparableNet(PooledClassifier):
    """A plain (no skip) depthwise-separable network in the style of MobileNet-v1 (Howard et al. 2017): a 3×3
    stem of ``width`` channels, seven blocks of a 3×3 depthwise conv and a 1×1 pointwise conv, each with BN
    and ReLU (2, 4, 4, 8, 8, 16, 16 × ``width`` channels; stride 2 in blocks 2, 4, 6: 32×32 → 4×4), global
    average pooling, one linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3):
        layers, c = conv_bn_relu(in_channels, width), width
        for mult, stride in DWSEP:
            layers += conv_bn_relu(c, c, 3, stride, groups=c) + conv_bn_relu(c, mult * width, 1)
            c = mult * width
        super().__init__(layers, c, num_classes)


class InvertedResidual(nn.Module):
    """1×1 expansion (BN, ReLU; absent when the expansion is 1), 3×3 depthwise (BN, ReLU), 1×1 linear
    projection (BN, no activation), and the identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers = conv_bn_relu(c_in, hidden, 1) if expansion != 1 else []
        layers += conv_bn_relu(hidden, hidden, 3, stride, groups=hidden) + conv_bn_relu(hidden, c_out, 1, relu=False)
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.skip else self.block(x)


def _round(c: float) -> int:
    """Channels rounded to the nearest multiple of 8 and not below 90 % of ``c``, as MobileNetV2's width
    multiplier does."""
    r = max(8, int(c + 4) // 8 * 8)
    return r + 8 if r < 0.9 * c else r


class MobileNetV2ReLU(PooledClassifier):
    """MobileNetV2 (Sandler et al. 2018) with ReLU in place of ReLU6 everywhere, for 32×32 inputs: the
    paper's 17 inverted residual blocks (``MOBILENET_V2``) at width multiplier ``width_mult`` (channels
    rounded to multiples of 8), a 3×3 stem of stride 1 and the 1×1 head conv of 1280 × ``width_mult``
    channels, global average pooling, one linear classifier (no dropout)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 0.5, in_channels: int = 3):
        c = _round(32 * width_mult)
        layers = conv_bn_relu(in_channels, c)
        for t, channels, n, s in MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidual(c, _round(channels * width_mult), s if i == 0 else 1, t))
                c = _round(channels * width_mult)
        head = _round(1280 * width_mult)
        super().__init__(layers + conv_bn_relu(c, head, 1), head, num_classes)


@register("vgg11_bn_small", (1, 3, 32, 32))
def vgg11_bn_small(num_classes: int = 10, **kw) -> VGG11Small:
    """VGG-11 with BN at width 16 (``VGG11Small``), for 3×32×32 inputs."""
    return VGG11Small(num_classes=num_classes, **kw)


@register("dwsep_net", (1, 3, 32, 32))
def dwsep_net(num_classes: int = 10, **kw) -> DepthwiseSeparableNet:
    """A plain depthwise-separable network, MobileNet-v1 style, at width 16 (``DepthwiseSeparableNet``)."""
    return DepthwiseSeparableNet(num_classes=num_classes, **kw)


@register("mobilenet_v2_relu", (1, 3, 32, 32))
def mobilenet_v2_relu(num_classes: int = 10, **kw) -> MobileNetV2ReLU:
    """MobileNetV2 with ReLU instead of ReLU6, width multiplier 0.5, for 3×32×32 inputs (``MobileNetV2ReLU``):
    not torchvision's ``mobilenet_v2``, whose ReLU6 channels cannot be rescaled."""
    return MobileNetV2ReLU(num_classes=num_classes, **kw)
