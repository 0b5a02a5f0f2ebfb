"""Small facts about modules and their inputs that several passes need: one home for each."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
         "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the model's first floating parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm of the model by name, subclasses (a P-BN's, timm's) included."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def cast_floating(args, dtype: torch.dtype) -> tuple:
    """The arguments with every floating tensor cast to ``dtype``, everything else as given."""
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every floating parameter and buffer in float64, made tensor by tensor:
    no full-size copy in the model's own dtype exists on the way. The copy carries no forward or
    backward hooks: the caller's hooks (loggers, counters) must not fire on pathfx's private runs."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in memo:
            d = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(d, t.requires_grad) if isinstance(t, nn.Parameter) else d
    out = copy.deepcopy(model, memo)
    for m in out.modules():
        for attr in HOOKS:
            getattr(m, attr, {}).clear()
    return out
