"""The one BatchNorm after the classifier that the ENorm paper trains with (§6.2–6.3: "to stabilize the
training", for convolutional networks; none for the fully connected net of §6.1).

``final_bn_name`` finds a BatchNorm whose output is the graph's output (the model has one: it is kept,
not folded); ``add_final_bn`` puts one after the output of a model that has none. Added, it is the
identity in eval mode (running mean 0, running variance 1, γ = √(1 + ε), β = 0), so the balanced
model still computes the original function; in training mode it normalises the logits by the batch.

``restore_behind_barriers`` gives the same identity BatchNorm back to each layer whose BatchNorm was
folded but whose output channels no rescaling group reaches (a barrier follows: ReLU6, SiLU, ...).
ENorm cannot act on those channels, so folding their BatchNorm only takes away the normalisation the
network was built to train with (torchvision's mobilenet_v2 under the ENorm plan: 12.9 % test error
with every BatchNorm folded, against 4.9 % for SGD + BN); rescaling never moves them, so a BatchNorm
there does not interfere with the ENorm cycles.
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


def _identity_bn(kind, channels: int, dtype) -> nn.Module:
    bn = kind(channels).to(dtype)
    with torch.no_grad():
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
    return bn


BN_OF_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def restore_behind_barriers(gm: fx.GraphModule, groups, folded) -> list[str]:
    """In place: an identity BatchNorm after each layer of ``folded`` ((layer, batchnorm) pairs of the
    fold) that produces for no group of ``groups``; returns the names of the BatchNorms put back."""
    free = {p.weight for g in groups.groups for p in g.producers}
    modules = dict(gm.named_modules())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    done = []
    for layer, bn_name in folded:
        node, mod = nodes.get(layer), modules.get(layer)
        meta = node.meta.get("tensor_meta") if node is not None else None
        if node is None or f"{layer}.weight" in free or meta is None or not hasattr(meta, "shape"):
            continue
        rank = len(meta.shape)
        if rank not in BN_OF_RANK or (isinstance(mod, nn.Linear) and rank != 2):  # channels on dim 1 only
            continue
        name = bn_name.replace(".", "_")
        gm.add_submodule(name, _identity_bn(BN_OF_RANK[rank], meta.shape[1], meta.dtype))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        new.meta = dict(node.meta)
        done.append(name)
    if done:
        gm.recompile()
    return done


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
    gm.add_submodule(NAME, _identity_bn(nn.BatchNorm1d, meta.shape[1], meta.dtype))
    with gm.graph.inserting_before(out):
        node = gm.graph.call_module(NAME, (value,))
    node.meta = dict(value.meta)
    out.replace_input_with(value, node)
    gm.recompile()
    return "added"
