"""The soundness check: random positive factors on every free variable must not change the output."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .groupset import RescalingGroups, apply_factors


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
                    module=None) -> SoundnessResult:
    """Apply random factors to a float64 copy of the analysed module and compare outputs."""
    base = copy.deepcopy(module if module is not None else groups.module).double().eval()
    inputs = [x.double() if torch.is_tensor(x) and x.is_floating_point() else x
              for x in (example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))]
    ref = outputs(base, inputs)
    apply_factors(base, groups, random_factors(groups, seed))
    rel, ab = rel_error(ref, outputs(base, inputs))
    return SoundnessResult(max_rel_error=rel, max_abs_error=ab, num_free=groups.num_free, ok=rel <= tol)
