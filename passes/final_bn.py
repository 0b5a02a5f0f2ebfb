"""The one BatchNorm after the classifier that the ENorm paper trains with (§6.2–6.3: "to stabilize the
training", for convolutional networks; none for the fully connected net of §6.1).

``final_bn_name`` finds a BatchNorm whose output is the graph's output (the model has one: it is kept,
not folded); ``add_final_bn`` puts one after the output of a model that has none. Added, it is the
identity in eval mode (running mean 0, running variance 1, γ = √(1 + ε), β = 0), so the balanced
model still computes the original function; in training mode it normalises the logits by the batch.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from .fold_bn import BATCHNORMS

NAME = "final_bn"


def _output_value(gm: fx.GraphModule):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    return out, value if isinstance(value, fx.Node) else None


def final_bn_name(gm: fx.GraphModule) -> str | None:
    """The BatchNorm module whose output is the model's only output, if there is one."""
    out, value = _output_value(gm)
    if value is None or value.op != "call_module" or len(value.users) != 1:
        return None
    return value.target if isinstance(gm.get_submodule(value.target), BATCHNORMS) else None


def add_final_bn(gm: fx.GraphModule, add: bool = True) -> str:
    """In place: a BatchNorm1d after a (batch, classes) output; returns what was done: "kept" (the model
    has one), "added", or why none was added (``add=False``: only one the model has is kept)."""
    if final_bn_name(gm) is not None:
        return "kept"
    if not add:
        return "none: a trained model is fine-tuned without a new one"
    out, value = _output_value(gm)
    meta = value.meta.get("tensor_meta") if value is not None else None
    if meta is None or len(meta.shape) != 2:
        return "none: the output is not one (batch, classes) tensor"
    bn = nn.BatchNorm1d(meta.shape[1]).to(meta.dtype)
    with torch.no_grad():
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
    gm.add_submodule(NAME, bn)
    with gm.graph.inserting_before(out):
        node = gm.graph.call_module(NAME, (value,))
    node.meta = dict(value.meta)
    out.replace_input_with(value, node)
    gm.recompile()
    return "added"
