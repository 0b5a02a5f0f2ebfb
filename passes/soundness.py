"""The soundness check: random positive factors on every free variable must not change the output."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .fold_bn import BATCHNORMS, LAYERS, ChannelAffine
from .groupset import RescalingGroups, apply_factors
from .modules import cast_floating
from .shapes import as_tuple


@torch.no_grad()
def lively_init(model: nn.Module, seed: int = 0, gain: float = 1.0) -> nn.Module:
    """Re-initialise so that signal survives depth (normal weights of variance gain/fan-in, random BN
    statistics). gain 1 keeps deep SiLU/sigmoid networks (EfficientNet) from growing to outputs
    of 1e4 and more, where float64 cancellation alone exceeds the check's 1e-10; gain 2 (He)
    did that on efficientnet_b7 (2.7e-8) although power-of-two factors gave exactly 0.

    Several torchvision initialisations make deep outputs almost independent of the input
    (e.g. googlenet's truncated normal with std 0.01): a rescaling check on such a model
    could not fail. In place; returns the model.
    """
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, LAYERS):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (gain / fan_in) ** 0.5)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        elif isinstance(mod, ChannelAffine):
            mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        elif isinstance(mod, BATCHNORMS) and mod.running_mean is not None:
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if mod.weight is not None:
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


@dataclass
class SoundnessResult:
    max_rel_error: float
    max_abs_error: float
    num_free: int
    ok: bool


def random_factors(groups: RescalingGroups, seed: int = 0, low: float = 1e-2, high: float = 1e2) -> dict:
    """An independent log-uniform factor in [low, high] for every free variable."""
    rng = np.random.default_rng(seed)
    return {g.id: np.exp(rng.uniform(np.log(low), np.log(high), g.width)) for g in groups.groups}


def outputs(module, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def rel_error(a: list, b: list) -> tuple[float, float]:
    rel = ab = 0.0
    for x, y in zip(a, b):
        d = (x - y).abs().max().item() if x.numel() else 0.0
        ab = max(ab, d)
        rel = max(rel, d / max(x.abs().max().item(), 1e-300) if x.numel() else 0.0)
    return rel, ab


def check_soundness(groups: RescalingGroups, example_inputs, seed: int = 0, tol: float = 1e-10,
                    module=None, reinit: bool = False) -> SoundnessResult:
    """Apply random factors to a float64 copy of the analysed module and compare outputs.

    ``reinit`` re-initialises the copy (``lively_init``) first: the groups are a property of
    the graph, and a model whose output barely depends on its input could not fail the check.
    """
    base = copy.deepcopy(module if module is not None else groups.source).double().eval()
    if reinit:
        lively_init(base, seed)
    inputs = cast_floating(as_tuple(example_inputs), torch.float64)
    ref = outputs(base, inputs)
    apply_factors(base, groups, random_factors(groups, seed))
    rel, ab = rel_error(ref, outputs(base, inputs))
    return SoundnessResult(max_rel_error=rel, max_abs_error=ab, num_free=groups.num_free, ok=rel <= tol)
