"""1-D models for MNIST-1D (Greydanus 2020: signals of 40 samples, 10 classes; input 1×40, lab.data.mnist1d).

* ``mnist1d_mlp``: the fully connected net of ENorm §6.1 with 40 inputs,
* ``mnist1d_cnn``: a small 1-D CNN in the manner of the one published with the data set (94 %),
* ``mnist1d_plain``: PlainNet-18 in 1-D, a deep plain conv net with BN (the depth where P-BN claims its gain).

They are sized for a CPU already (``hparams["cpu_sized"]``: ``pathfx train`` keeps their widths). Their
docstrings say how they are initialised (zoo/recipe.py) and what they were measured to reach.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .paper import MLP
from .recipe import hparams, kaiming_init
from .registry import register

LENGTH = 40
NORMS = ("bn", "none")


class MLP1d(MLP):
    """The MLP of zoo/paper.py on 1×40 signals (a class of its own: an instance's default input is 1×40)."""


class Conv1dNet(nn.Module):
    """Conv1d layers given as (channels, kernel, stride), padding kernel // 2, each followed by BatchNorm
    (``norm="bn"``, convs without bias) or nothing (``norm="none"``, convs with bias), then ReLU; then the
    classifier: a Linear over every channel and position (``head="flatten"``) or over the global average of
    each channel (``head="pool"``). Initialised by ``kaiming_init``."""

    def __init__(self, spec, num_classes: int = 10, in_channels: int = 1, length: int = LENGTH, norm: str = "bn",
                 head: str = "flatten"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm '{norm}' (norms: {', '.join(NORMS)})")
        if head not in ("flatten", "pool"):
            raise ValueError(f"unknown head '{head}' (heads: flatten, pool)")
        layers, c = [], in_channels
        for c_out, k, stride in spec:
            layers.append(nn.Conv1d(c, c_out, k, stride, k // 2, bias=norm == "none"))
            layers += [nn.BatchNorm1d(c_out)] if norm == "bn" else []
            layers.append(nn.ReLU())
            c, length = c_out, (length + 2 * (k // 2) - k) // stride + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1) if head == "pool" else nn.Identity()
        self.fc = nn.Linear(c * (1 if head == "pool" else length), num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register("mnist1d_mlp", (1, 1, LENGTH))
@hparams(init="xavier", cpu_sized=True, batch_size=256, momentum=0.0, weight_decay=1e-3,
         lr_search=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1), lr_schedule="linear decay to 0", enorm_c=1.2)
def mnist1d_mlp(p: int = 3, width: int = 256, num_classes: int = 10, in_features: int = LENGTH, norm: str = "none",
                bias: bool = True) -> MLP1d:
    """ENorm §6.1's fully connected net on MNIST-1D: 40 → ``width``, ``p`` layers ``width`` × ``width``,
    ``width`` → 10, ReLU between; the paper's 500 becomes 256 so that an epoch takes a second on one CPU thread.
    ``norm="bn"`` puts a BN after each hidden layer (the SGD+BN baseline). Input 1×40 (flattened inside).

    Init: Xavier as enorm_fc (§6.1): uniform ±√(6/(fan_in+fan_out)) for every linear layer, the classifier
    too; biases 0; BN γ = 1, β = 0.

    Paper's training (§6.1, on CIFAR-10): SGD without momentum, batch 256, weight decay 1e-3, lr
    cross-validated in {5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1} decaying linearly to 0; ENorm with c = 1.2.

    Measured (``lab.train.train("mnist1d_mlp", "sgd", lab.data.mnist1d(), 30, seed=s)``: the SGD plan's lr 0.1,
    momentum 0.9, batch 128, no BN): 74.8–76.8 % test accuracy over seeds 0–2, about 6 s a run on one thread.
    """
    return MLP1d(in_features, width, p + 2, num_classes, norm=norm, bias=bias, init="xavier")


@register("mnist1d_cnn", (1, 1, LENGTH))
@hparams(init="kaiming", cpu_sized=True, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4)
def mnist1d_cnn(width: int = 32, num_classes: int = 10, norm: str = "bn") -> Conv1dNet:
    """A 1-D CNN for MNIST-1D in the manner of the data set's published one (three convs of 25 channels,
    strides 2, a linear layer over the flattened features; 94 % test accuracy): convs of ``width`` channels,
    kernel 5 stride 2, kernel 3 stride 2, kernel 3 stride 2 (40 → 20 → 10 → 5 positions), each + BN
    (``norm="bn"``, default) + ReLU, then a linear classifier over the 5·``width`` features. Input 1×40.

    Init: Kaiming (He et al. 2015a): normal, std √(2/fan_in), every conv and the classifier; biases
    (``norm="none"``) 0; BN γ = 1, β = 0.

    Paper's training: none of the pathfx papers trains on MNIST-1D; these are the SGD+BN plan's settings
    (pbn F.1: lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr × 0.1 at 50 % and 75 % of training).

    Measured (``lab.train.train("mnist1d_cnn", "sgd", lab.data.mnist1d(), 30, seed=s)``, 960 steps): 93.5–94.9 %
    test accuracy over seeds 0–4, 3–10 s a run on one thread.
    """
    return Conv1dNet([(width, 5, 2), (width, 3, 2), (width, 3, 2)], num_classes=num_classes, norm=norm)


@register("mnist1d_plain", (1, 1, LENGTH))
@hparams(init="kaiming", cpu_sized=True, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
         lr_search=(0.1, 0.2, 0.5, 1.0))
def mnist1d_plain(blocks=(2, 2, 2, 2), width: int = 16, num_classes: int = 10, norm: str = "bn") -> Conv1dNet:
    """PlainNet-18 in 1-D (pbn §5.1's PlainNet without skips): a kernel-3 stem conv of ``width`` channels,
    then stages of 2·``blocks`` kernel-3 convs of ``width`` × 1, 2, 4, 8 channels (stride 2 at the first conv
    of stages 2–4: 40 → 20 → 10 → 5 positions), each + BN (``norm="bn"``, default) + ReLU, global average
    pooling and a linear classifier: 17 convs + 1 linear; ``blocks=(3, 4, 6, 3)`` is PlainNet-34's 33 + 1.
    Input 1×40.

    Init: Kaiming as plainnet18: normal, std √(2/fan_in), every conv and the classifier; biases
    (``norm="none"``) 0; BN γ = 1, β = 0.

    Paper's training (pbn F.1, on CIFAR): SGD+BN lr 0.1 with momentum 0.9, G-SGD+P-BN lr in
    {0.1, 0.2, 0.5, 1.0} without momentum, weight decay 1e-4, batch 128, lr × 0.1 at 50 % and 75 %.

    Measured (``lab.train.train("mnist1d_plain", "sgd", lab.data.mnist1d(), 30, seed=s)``): 97.2–97.9 % test
    accuracy over seeds 0–2, 1.5 min a run on one thread.
    """
    spec = [(width, 3, 1)]
    for i, n in enumerate(blocks):
        spec += [(width * 2 ** i, 3, 2 if (i > 0 and j == 0) else 1) for j in range(2 * n)]
    return Conv1dNet(spec, num_classes=num_classes, norm=norm, head="pool")
