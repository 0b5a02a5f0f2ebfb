"""The analysis front door: trace, check and shape the graph, fold BN, discover groups."""
from __future__ import annotations

import torch.nn as nn

from passes.groupset import RescalingGroups
from passes.manager import prepare, run_pipeline
from passes.trace import AUTO

__all__ = ["find_groups", "prepare"]


def find_groups(model: nn.Module, example_inputs, leaf_modules=AUTO, train: bool = False,
                name: str = "", frontend: str = "fx") -> RescalingGroups:
    """Rescaling groups of ``model``; the caller's model is never modified.

    ``train=True`` analyses the model as it trains: BatchNorms are not folded and are barriers.
    The result's ``.module`` is the analysed GraphModule its parameter names refer to.
    ``leaf_modules``: ``"auto"`` keeps every submodule that symbolic tracing cannot follow opaque (a
    barrier, listed in ``.opaque``); ``()`` refuses such a model; a list of submodule names or classes
    keeps exactly those opaque (add ``"auto"`` to the list for both). ``frontend``: ``"fx"`` (symbolic
    trace) or ``"export"`` (``torch.export``'s ATen graph, eval mode only).
    """
    # the folded weights are written when the result's source is first read: most callers never do
    return run_pipeline("analyze", model, example_inputs, leaf_modules=leaf_modules, train=train,
                        name=name or type(model).__name__, lazy_weights=True, frontend=frontend)["groups"]
