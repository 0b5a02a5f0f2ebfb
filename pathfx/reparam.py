"""``pathfx.reparameterize``: a path-parameterized copy of a model, with P-BN (DESIGN §3).

The path pipeline of ``passes.manager`` does the work (trace, shapes, fold, groups, reparam, pbn);
this is its public front door, with the optional float64 check against the original.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from passes.manager import run_pipeline
from passes.modules import cast_floating, float64_copy
from passes.pathmodel import INITS, OFFDIAG_SCALE, ReparamReport
from passes.shapes import as_tuple
from passes.soundness import outputs, rel_error
from passes.trace import AUTO

__all__ = ["reparameterize", "ReparamReport", "INITS", "OFFDIAG_SCALE"]


def reparameterize(model: nn.Module, example_inputs, policy: str = "per-block", pbn: bool = True,
                   init: str = "preserve", leaf_modules=AUTO, copy_model: bool = True,
                   check: bool = True, value_dtype: torch.dtype | None = None,
                   frontend: str = "fx") -> tuple[fx.GraphModule, ReparamReport]:
    """A path-parameterized copy of ``model`` and its report; ``model`` is never modified.

    ``copy_model=False`` builds on ``model`` itself, which is then changed (a caller's private
    copy). ``check``: with ``init="preserve"``, measure ``report.max_rel_error`` against ``model``
    in float64. ``value_dtype``: the dtype the path model is meant to run in (default: the model's);
    groups are kept in weight space where path values would leave its range (``passes.reparam.solve``).
    ``leaf_modules`` and ``frontend``: as for ``pathfx.find_groups``.
    """
    inputs = as_tuple(example_inputs)
    training = model.training
    reference = float64_copy(model).eval() if check and init == "preserve" else None
    result = run_pipeline("path", model, inputs, copy=copy_model, policy=policy, init=init, pbn=pbn,
                          leaf_modules=leaf_modules, value_dtype=value_dtype, frontend=frontend)
    gm, report = result.gm, result["reparam_report"]
    if reference is not None:
        xs = cast_floating(inputs, torch.float64)
        report.max_rel_error = rel_error(outputs(reference, xs), outputs(float64_copy(gm).eval(), xs))[0]
    gm.train(training)
    return gm, report
