"""The analysis front door: trace, propagate shapes, fold BN, discover groups."""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from passes.finite import check_finite
from passes.fold_bn import fold_bn
from passes.groups import analyze
from passes.groupset import RescalingGroups
from passes.shapes import propagate
from passes.trace import check_trace, trace


def prepare(model: nn.Module, example_inputs, leaf_modules=(), train: bool = False) -> fx.GraphModule:
    """Trace ``model`` (in eval mode unless ``train``), annotate shapes, fold eval BatchNorms.

    The caller's model is not modified: its training flags are restored after tracing,
    shapes are computed on meta tensors, folded layers are new modules. The result may
    share untouched leaf modules with ``model``; copy it before writing to it.
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules:
        check_finite(model)  # a GraphModule is copied, not traced: trace's check does not run
    flags = [(mod, mod.training) for mod in model.modules()]
    try:
        model.train(train)
        gm = copy.deepcopy(model) if isinstance(model, fx.GraphModule) and not leaf_modules \
            else trace(model, leaf_modules=leaf_modules, copy_model=False)
    finally:
        for mod, flag in flags:
            mod.training = flag
    if not isinstance(model, fx.GraphModule):
        check_trace(model, gm, example_inputs)
    gm.training = train  # only the root: leaves may be the caller's; copies take this mode
    propagate(gm, example_inputs)
    if not train:
        gm, _ = fold_bn(gm, inplace=True)
    return gm


def find_groups(model: nn.Module, example_inputs, leaf_modules=(), train: bool = False,
                name: str = "") -> RescalingGroups:
    """Rescaling groups of ``model``; the caller's model is never modified.

    ``train=True`` analyses the model as it trains: BatchNorms are not folded and are barriers.
    The result's ``.module`` is the analysed GraphModule its parameter names refer to.
    """
    gm = prepare(model, example_inputs, leaf_modules=leaf_modules, train=train)
    return analyze(gm, name=name or type(model).__name__)
