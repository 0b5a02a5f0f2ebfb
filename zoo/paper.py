"""The papers' architectures not covered by zoo/plain.py and zoo/typec.py.

* ResNet-18/34/50 and PlainNet-34 for CIFAR (pbn §5.1, He et al. 2016),
* CIFAR-NV, the fully convolutional net of ENorm §6.2 (Gitman & Ginsburg 2017),
* the fully connected net of ENorm §6.1 (3072 → 500 × p → 10),
* the MLP of pbn F.3 (4000 units per hidden layer, BN after every hidden layer).

Every builder's docstring lists the initialisation (zoo/recipe.py) and the hyper-parameters the paper
trained it with; the same values are on the builder as ``builder.hparams`` (a dict) for a training
harness to read.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .plain import PlainNet
from .recipe import PBN_CIFAR, hparams, init_by_name, kaiming_init, xavier_init
from .registry import register


# -- ResNet for CIFAR (He et al. 2016, 3×3 stem, no max-pool) ------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + (x if self.shortcut is None else self.shortcut(x)))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    # None (the identity, kept out of the graph so the add sees x itself: the analysis tags the
    # stream identity-skip) when the shape is kept, else a 1×1 projection with BN (He et al.'s option B)
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out))


class CifarResNet(nn.Module):
    """3×3/1 stem conv (64·width/64 channels) + BN + ReLU, four stages (stride 1, 2, 2, 2), global
    average pooling, one linear classifier."""

    def __init__(self, block, blocks, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, n in enumerate(blocks):
            layers = []
            for j in range(n):
                layers.append(block(c, width * 2 ** i, 2 if (i > 0 and j == 0) else 1))
                c = width * 2 ** i * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


_CIFAR_DOC = """{name} for CIFAR (pbn §5.1; He et al. 2016): 3×3 stem, no max-pool, {blocks} {kind} blocks
    in stages of 64/128/256/512 channels (× ``width``/64), identity shortcuts, a 1×1 projection + BN
    where the shape changes. Input 3×32×32.

    Init: Kaiming (He et al. 2015a, as He et al. 2016): normal, std √(2/fan_in), every conv (shortcuts too)
    and the classifier; biases 0; BN γ = 1, β = 0.

    Paper's training (pbn F.1): batch 128, 64k iterations, lr × 0.1 at 32k and 48k, weight decay 1e-4;
    SGD+BN lr 0.1; G-SGD(+P-BN) lr searched in {{0.1, 0.2, 0.5, 1.0}}, no momentum, path-space weight
    decay 1e-4, P-BN λ = 0.1; random 32×32 crops (pad 4) and horizontal flips, pixels in [0, 1].
    Reported CIFAR-10 test error of G-SGD+P-BN: see pbn Table 1."""


@register("resnet18_cifar", (1, 3, 32, 32))
@hparams(**PBN_CIFAR, init="kaiming")
def resnet18_cifar(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **kw)


@register("resnet34_cifar", (1, 3, 32, 32))
@hparams(**PBN_CIFAR, init="kaiming")
def resnet34_cifar(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, **kw)


@register("resnet50_cifar", (1, 3, 32, 32))
@hparams(**PBN_CIFAR, init="kaiming")
def resnet50_cifar(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, **kw)


resnet18_cifar.__doc__ = _CIFAR_DOC.format(name="ResNet-18", blocks="2-2-2-2", kind="basic (two 3×3)")
resnet34_cifar.__doc__ = _CIFAR_DOC.format(name="ResNet-34", blocks="3-4-6-3", kind="basic (two 3×3)")
resnet50_cifar.__doc__ = _CIFAR_DOC.format(name="ResNet-50", blocks="3-4-6-3",
                                           kind="bottleneck (1×1, 3×3, 1×1 ×4)")


@register("plainnet34", (1, 3, 32, 32))
@hparams(**PBN_CIFAR, init="kaiming")
def plainnet34(num_classes: int = 10, **kw) -> PlainNet:
    """PlainNet-34 (pbn §5.1): ResNet-34 for CIFAR without shortcuts — 3×3 stem and 3-4-6-3 pairs of 3×3
    convs (64..512 channels), each conv + BN + ReLU. Input 3×32×32.

    Init: Kaiming as plainnet18: normal, std √(2/fan_in), every conv and the classifier; BN γ = 1, β = 0.

    Paper's training (pbn F.1), as the ResNets: batch 128, 64k iterations, lr × 0.1 at 32k and 48k, weight
    decay 1e-4, SGD+BN lr 0.1, G-SGD+P-BN lr in {0.1, 0.2, 0.5, 1.0} without momentum (no λ: no skips)."""
    return PlainNet((3, 4, 6, 3), num_classes=num_classes, **kw)


# -- CIFAR-NV (ENorm §6.2) ------------------------------------------------------------------------------------

class CifarNV(nn.Module):
    """conv3×3-128 ×3, maxpool 3/2, conv3×3-256 ×3, maxpool 3/2, conv3×3-320, conv1×1-320, conv1×1-classes,
    global average pooling; ReLU after every conv but the last (whose pooled output is the logits).

    ``norm="none"`` (the paper's Baseline/ENorm setting) has one BatchNorm on the logits ("a BatchNorm
    layer at the end of the network after the FC layer"); ``norm="bn"`` puts BN after every hidden conv.
    """

    def __init__(self, num_classes: int = 10, width: int = 128, norm: str = "none", in_channels: int = 3):
        super().__init__()
        c1, c2, c3 = width, 2 * width, width * 5 // 2  # 128, 256, 320
        spec = [(in_channels, c1, 3), (c1, c1, 3), (c1, c1, 3), "pool", (c1, c2, 3), (c2, c2, 3), (c2, c2, 3),
                "pool", (c2, c3, 3), (c3, c3, 1)]
        layers = []
        for s in spec:
            if s == "pool":
                layers.append(nn.MaxPool2d(3, 2, 1))
                continue
            c_in, c_out, k = s
            layers.append(nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=norm != "bn"))
            layers += [nn.BatchNorm2d(c_out)] if norm == "bn" else []
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c3, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_bn = nn.BatchNorm1d(num_classes) if norm != "bn" else nn.Identity()
        xavier_init(self)

    def forward(self, x):
        x = self.pool(self.classifier(self.features(x)))
        return self.out_bn(torch.flatten(x, 1))


@register("cifar_nv", (1, 3, 28, 28))
@hparams(epochs=128, init="xavier", lr_search=(0.01, 0.05, 0.1), weight_decay=1e-3,
         lr_schedule="quadratic decay to 1e-4", momentum=(0.0, 0.9), batch_sizes=(8, 16, 32, 64, 128),
         enorm_c=(1.0, 1.2), train_split=40_000,
         augment="random 28×28 crops + horizontal flip (test: centre 28×28 crop), per-channel standardisation")
def cifar_nv(num_classes: int = 10, **kw) -> CifarNV:
    """CIFAR-NV (ENorm §6.2, Gitman & Ginsburg 2017). Input 3×28×28 (the paper's crops).

    Paper's training: 128 epochs, SGD with lr cross-validated in {0.01, 0.05, 0.1}, weight decay 1e-3,
    lr decayed quadratically to 1e-4, momentum 0 or 0.9, batch 8–128, Xavier init, 40k/10k train/validation
    split, random 28×28 crops + flips (centre crop at test), per-channel standardised inputs; one BN after
    the classifier for Baseline and ENorm (c ∈ {1, 1.2}).

    Init: Xavier (§6.2), read as Glorot & Bengio's normalized initialization — uniform ±√(6/(fan_in+fan_out)),
    fan = channels × 3×3 — for every conv, the 1×1 classifier too; biases 0; BNs γ = 1, β = 0. (The
    authors' released code uses Kaiming normal instead; the paper's text is followed.)
    """
    return CifarNV(num_classes=num_classes, **kw)


# -- fully connected nets --------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Flatten, then ``depth`` Linear layers: in → hidden × (depth − 1) → classes; ReLU (and BN before it
    when ``norm == "bn"``) after every hidden layer; ``init`` names an initialisation of zoo/recipe.py."""

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int, norm: str = "none",
                 bias: bool = True, init: str = "kaiming"):
        super().__init__()
        layers, c = [], in_features
        for _ in range(depth - 1):
            layers.append(nn.Linear(c, hidden, bias=bias))
            layers += [nn.BatchNorm1d(hidden)] if norm == "bn" else []
            layers.append(nn.ReLU())
            c = hidden
        layers.append(nn.Linear(c, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)
        init_by_name(self, init)

    def forward(self, x):
        return self.layers(torch.flatten(x, 1))


@register("enorm_fc", (1, 3, 32, 32))
@hparams(epochs=60, init="xavier", batch_size=256, momentum=0.0, weight_decay=1e-3,
         lr_search=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1), lr_schedule="linear decay to 0", enorm_c=1.2,
         path_sgd_weight_decay=0.0, augment="per-channel standardisation")
def enorm_fc(p: int = 3, width: int = 500, num_classes: int = 10, in_features: int = 3072, norm: str = "none",
             bias: bool = True) -> MLP:
    """ENorm §6.1 fully connected net: 3072 → 500, then ``p`` layers 500 × 500, then 500 → 10, ReLU between
    (``width`` scales the 500). ``norm="bn"`` is the paper's BN setting (a BN after each hidden layer).

    Paper's training: 60 epochs, SGD without momentum, batch 256, weight decay 1e-3, lr cross-validated in
    {5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1} decaying linearly to 0, Xavier init, per-channel standardised
    inputs; ENorm with c = 1.2 did best; p swept (Fig. 4), p = 3 in the norm study (Appendix).

    Init: Xavier (§6.1), Glorot & Bengio's normalized initialization: uniform ±√(6/(fan_in+fan_out)) for
    every linear layer, the classifier too; biases 0 (Glorot & Bengio's own; the paper does not say); BN
    (``norm="bn"``) γ = 1, β = 0. (The authors' released code uses Kaiming normal; the paper's text is followed.)
    """
    return MLP(in_features, width, p + 2, num_classes, norm=norm, bias=bias, init="xavier")


@register("pbn_mlp", (1, 3, 32, 32))
@hparams(epochs=150, init="kaiming", batch_size=64, lr_search=(1, 5, 0.1, 0.5, 0.01, 0.05, 0.001, 0.005))
def pbn_mlp(width: int = 4000, depth: int = 5, num_classes: int = 10, in_features: int = 3072,
            norm: str = "bn") -> MLP:
    """The MLP of pbn F.3 (after Neyshabur et al. 2015): 5 linear layers, 4000 units in each hidden layer,
    BN (P-BN after transform) at the end of every hidden layer, on flattened CIFAR-10 (3072 inputs).
    "5 layers" is read as five weight layers (3072 → 4000 × 4 → 10), the convention of ResNet-18 & co.
    ``width`` scales it down for CPU (e.g. 256).

    Init: Kaiming (He et al. 2015a), as the paper's other networks (F.3 does not say): normal, std √(2/fan_in),
    every linear layer, the classifier too; biases 0; BN γ = 1, β = 0.

    Paper's training: batch 64, 150 epochs, only the lr tuned, in {1, 5} × {1e-1, 1e-2, 1e-3}.
    """
    return MLP(in_features, width, depth, num_classes, norm=norm)
