"""`pathfx.enorm`: balance a model's weights by Equi-normalization (DESIGN §2, passes/enorm.py)."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from passes.enorm import ENormReport
from passes.manager import run_pipeline
from passes.trace import AUTO


def enorm(model: nn.Module, example_inputs, p: float = 2, c: float = 1.0, cycles: int | None = None,
          tol: float = 1e-6, groups=None, leaf_modules=AUTO, max_cycles: int = 10_000,
          frontend: str = "fx") -> tuple[fx.GraphModule, ENormReport]:
    """(balanced model, report). The caller's model is never modified.

    The balanced model is the analysed GraphModule (a traced copy in eval mode, BatchNorms
    folded) with its weights rescaled; it computes the same function as ``model``.
    ``cycles`` fixes the number of cycles, otherwise they run until the objective's relative
    decrease in one cycle is ≤ ``tol``. ``groups`` restricts the balancing to those group ids
    of ``pathfx.find_groups(model, example_inputs)``. ``leaf_modules`` and ``frontend``: as for ``find_groups``.
    """
    result = run_pipeline("balance", model, example_inputs, leaf_modules=leaf_modules, name=type(model).__name__,
                          p=p, c=c, cycles=cycles, tol=tol, select=groups, max_cycles=max_cycles, frontend=frontend)
    return result.gm.eval(), result["enorm_report"]
