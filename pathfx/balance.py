"""`pathfx.enorm`: balance a model's weights by Equi-normalization (DESIGN §2, passes/enorm.py)."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from passes.enorm import DEFAULT_TOL, ENormReport
from passes.manager import run_pipeline
from passes.trace import AUTO


def enorm(model: nn.Module, example_inputs, p: float = 2, c: float = 1.0, cycles: int | None = None,
          tol: float = DEFAULT_TOL, groups=None, leaf_modules=AUTO, max_cycles: int = 10_000,
          frontend: str = "fx") -> tuple[fx.GraphModule, ENormReport]:
    """(balanced model, report). The caller's model is never modified.

    The balanced model is the analysed GraphModule (a traced copy in eval mode, BatchNorms
    folded) with its weights rescaled; it computes the same function as ``model``.
    ``p``: any number ≥ 1, or float('inf') / "inf" (the largest |w| of every channel balanced).
    ``c``: the asymmetric variant in the ENorm authors' convention (factor (R / (L·c))^½ for the
    p-norms R, L of a channel's outgoing and incoming weights); c > 1 moves energy to the output.
    ``cycles`` fixes the number of cycles, otherwise they run to a fixed point: until a cycle
    moves no weight or bias by more than ``tol`` (relative). At the default 1e-6, balancing the
    result again at the default tolerance moves no weight by more than 1e-6 (passes/enorm.py).
    ``groups`` restricts the balancing to those group ids of ``pathfx.find_groups(model,
    example_inputs)``. ``leaf_modules`` and ``frontend``: as for ``find_groups``.
    """
    result = run_pipeline("balance", model, example_inputs, leaf_modules=leaf_modules, name=type(model).__name__,
                          p=p, c=c, cycles=cycles, tol=tol, select=groups, max_cycles=max_cycles, frontend=frontend)
    return result.gm.eval(), result["enorm_report"]
