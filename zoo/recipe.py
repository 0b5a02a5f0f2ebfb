"""What the papers specify besides an architecture: the weight initialisation and the training hyper-parameters.

Two initialisations, applied to every convolution and linear layer of a model, the classifier included:

* ``xavier_init``: Glorot & Bengio (2010)'s "normalized initialization" (their eq. 16), uniform on
  [−a, a] with a = √(6 / (fan_in + fan_out)), gain 1; fan = channels × kernel size for a convolution.
* ``kaiming_init``: He et al. (2015a)'s eq. (10), normal with std √(2 / fan_in). He et al. derive a
  fan_out form too (their eq. 14) and show that either suffices; fan_in is chosen because it keeps the
  variance of every layer's output, which is what a network trained without BatchNorm (a balanced form,
  whose BNs are folded) depends on. They apply the same std to the first layer (their factor ½ is then
  immaterial) and so does this; the classifier reads rectified inputs, so eq. (10) holds for it as it is.

Both set biases to 0 (as Glorot & Bengio do; He et al. 2015a §2.2: "we also initialize b = 0") and every
BatchNorm to γ = 1, β = 0 with fresh running statistics.
"""
from __future__ import annotations

import torch.nn as nn

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# pbn F.1: CIFAR-10/100, all ResNet/PlainNet runs.
PBN_CIFAR = dict(batch_size=128, iterations=64_000, lr=0.1, lr_search=(0.1, 0.2, 0.5, 1.0),
                 lr_milestones=(32_000, 48_000), lr_gamma=0.1, weight_decay=1e-4, momentum=0.0,
                 pbn_lambda_resnet=0.1, augment="random crop 32 (pad 4) + horizontal flip, pixels in [0, 1]")


def hparams(**hp):
    """Attach the paper's training settings to a builder as ``builder.hparams``."""
    def wrap(fn):
        fn.hparams = hp
        return fn
    return wrap


def xavier_init(model: nn.Module) -> nn.Module:
    return _init(model, nn.init.xavier_uniform_)


def kaiming_init(model: nn.Module) -> nn.Module:
    return _init(model, lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"))


INITS = {"xavier": xavier_init, "kaiming": kaiming_init}


def init_by_name(model: nn.Module, name: str) -> nn.Module:
    if name not in INITS:
        raise ValueError(f"unknown init '{name}' (inits: {', '.join(INITS)})")
    return INITS[name](model)


def _init(model: nn.Module, fill) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, LAYERS):
            fill(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, NORMS):
            mod.reset_parameters()
    return model
