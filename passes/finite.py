"""The one check that a model's parameters are finite, shared by every entry point.

A NaN or Inf weight propagates to every output it reaches, and ``verify`` counts a NaN in
both models as agreement: without this check a broken model would come back "verified".
Only parameters are checked: buffers such as attention masks may hold -inf on purpose.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import NonFiniteError


@torch.no_grad()
def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``."""
    # a sum is finite when every entry is (one read, no mask); only a non-finite sum needs the mask
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


@torch.no_grad()
def check_finite(model: nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter of ``model`` that holds NaN or Inf."""
    for name, p in model.named_parameters():
        if p.is_meta or not p.is_floating_point() or is_finite(p):
            continue
        bad = ~torch.isfinite(p)
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if p.dim() else ()
        kinds = " and ".join(k for k, m in (("NaN", p.isnan()), ("Inf", p.isinf())) if bool(m.any()))
        raise NonFiniteError(f"parameter '{name}' holds {kinds} ({int(bad.sum())} of {p.numel()} entries, first at "
                             f"{list(first)}): pathfx needs finite weights")
