"""The analysis front door: trace, check and shape the graph, fold BN, discover groups."""
from __future__ import annotations

import torch.nn as nn

from passes.groupset import RescalingGroups
from passes.manager import prepare, run_pipeline

__all__ = ["find_groups", "prepare"]


def find_groups(model: nn.Module, example_inputs, leaf_modules=(), train: bool = False,
                name: str = "") -> RescalingGroups:
    """Rescaling groups of ``model``; the caller's model is never modified.

    ``train=True`` analyses the model as it trains: BatchNorms are not folded and are barriers.
    The result's ``.module`` is the analysed GraphModule its parameter names refer to.
    """
    # the folded weights are written when the result's source is first read: most callers never do
    return run_pipeline("analyze", model, example_inputs, leaf_modules=leaf_modules, train=train,
                        name=name or type(model).__name__, lazy_weights=True)["groups"]
