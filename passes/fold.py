"""Fold an eval-mode path model back into plain layers with static weights (for export).

Every ``PathLayer`` becomes its Conv/Linear with weight V/b + red; every ``PBN`` becomes one
layer with W = a ⊙ offdiag + λ·red, bias = β + a·(layer bias − μ), a = γ/sqrt(var + eps)
(DESIGN §3); the remaining BatchNorms are folded by ``passes.fold_bn``.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .fold_bn import fold_bn
from .pathnn import PBN, PathLayer


def _plain(base: nn.Module, weight: torch.Tensor, bias) -> nn.Module:
    layer = copy.deepcopy(base)
    layer.weight = nn.Parameter(weight.detach().clone())
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    return layer


@torch.no_grad()
def fold(path_model: fx.GraphModule, fold_batchnorm: bool = True) -> fx.GraphModule:
    """A copy of ``path_model`` (eval mode) with only plain Conv/Linear layers; the eval output is unchanged."""
    gm = copy.deepcopy(path_model).eval()
    done, pbn = [], []
    for name, mod in list(gm.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(mod, PBN):
            new = _plain(mod.layer.base, *mod.folded())
            pbn.append(name)
        elif isinstance(mod, PathLayer):
            new = _plain(mod.base, mod.effective_weight(), mod.effective_bias())
        else:
            continue
        gm.set_submodule(name, new)
        done.append(name)
    gm.recompile()
    if fold_batchnorm:
        # a P-BN's layer carries its BN: a BN after it stays an affine, as in the original's fold,
        # so that what is computed from the fold (the path-norm's bias paths) matches the original's
        gm, _ = fold_bn(gm, inplace=True, absorbed=pbn)
    return gm
