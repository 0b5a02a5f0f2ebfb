"""Eval-mode BatchNorm folding.

A BatchNorm right after a Conv/Linear folds into that layer's rows and bias. When the
layer's output also feeds other nodes, or the layer module is called more than once,
the fold goes into a copy of the layer, so the other uses keep the unnormalised output.
Every other eval-mode BatchNorm becomes a ``ChannelAffine`` (y = w·x + b per channel): a
diagonal layer for the group analysis.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ChannelAffine(nn.Module):
    """y[:, c] = weight[c] * x[:, c] + bias[c] — an eval-mode BatchNorm made explicit."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)


@dataclass
class FoldReport:
    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, batchnorm)
    copied: list[str] = field(default_factory=list)  # layers folded into a copy
    affine: list[str] = field(default_factory=list)  # batchnorms made explicit affines
    # folded layers that still hold the unscaled weight (fold_bn(lazy=True)): (layer module, row scale)
    pending: list = field(default_factory=list, repr=False, compare=False)

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the folded weights of a lazy fold (each layer's own new tensor; the original is untouched)."""
        for layer, a in self.pending:
            w = layer.weight
            layer.weight = nn.Parameter(w * a.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1)), w.requires_grad)
        self.pending.clear()


def _bn_scale_shift(bn: nn.Module):
    var = bn.running_var.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    shift = -bn.running_mean.double() * a
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return a, shift


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module, reuse: bool = False, pending: list | None = None) -> nn.Module:
    """A copy of ``layer`` with ``bn`` folded in; the original (maybe the caller's) is not touched,
    unless ``reuse``: then ``layer`` itself is rewritten, and no second copy of its weight exists.
    ``pending``: the copy keeps the unscaled weight for now and (copy, scale) is appended there."""
    a, shift = _bn_scale_shift(bn)  # the per-channel vectors in float64, the weight in its own dtype
    w = layer.weight
    scale = a.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
    if reuse:
        out = layer
        w.mul_(scale)
    else:
        out = copy.copy(layer)
        out._parameters, out._modules = dict(layer._parameters), dict(layer._modules)
        if pending is None:
            out.weight = nn.Parameter(w * scale, w.requires_grad)
        else:
            pending.append((out, a))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
    out.bias = nn.Parameter((b * a + shift).to(w.dtype), w.requires_grad)
    return out


def set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    """Set ``module`` at ``name``; the submodules of the module it replaces stay reachable under it (a
    BatchNorm spelled by timm's BatchNormAct2d has its activation as a child, called on its own)."""
    parent, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    old = getattr(owner, leaf, None)
    if isinstance(old, nn.Module):
        for k, sub in old._modules.items():
            if k not in module._modules:
                module.add_module(k, sub)
    setattr(owner, leaf, module)


def _reads_shape(user: fx.Node) -> bool:
    """A use that reads only the rank, shape or dtype (timm's ``_assert(x.ndim == 4)``): the folded
    layer's output has the same, so such a use does not keep the unfolded output alive."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in ("ndim", "shape", "dtype", "device")
    return user.op == "call_method" and user.target in ("size", "dim", "numel")


def _foldable(bn: nn.Module, layer: nn.Module | None) -> bool:
    if type(bn) not in BATCHNORMS or bn.running_mean is None:
        return False
    return layer is not None and type(layer) in LAYERS and \
        (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == bn.num_features


def fold_bn(gm: fx.GraphModule, inplace: bool = False, reuse_layers: bool = False,
            absorbed=(), lazy: bool = False, keep=()) -> tuple[fx.GraphModule, FoldReport]:
    """Fold eval-mode BatchNorms of ``gm`` (a copy unless ``inplace``).

    Even in place, no module object is mutated: folded layers and affines are new modules
    set into ``gm``'s own hierarchy, so leaves shared with a caller's model stay as they were.
    ``reuse_layers`` (with ``inplace``): a layer whose output feeds only its BatchNorm is
    rewritten in place instead, for a caller that owns every leaf and no longer needs the
    unfolded function (a large model then never holds two copies of its conv weights).
    ``absorbed``: layers that carry a BatchNorm already (a P-BN folded back): a BN after one is an
    affine, as it was when the model was first folded. ``lazy``: the folded layers keep their
    unscaled weights until ``report.materialize()`` (an analysis that reads only the graph and the
    shapes then never writes a second copy of the conv weights). ``keep``: BatchNorm module names
    left as they are (the one after the classifier that an ENorm plan trains with).
    """
    from .functional import modularize

    if not inplace:
        gm = copy.deepcopy(gm)
    modularize(gm)  # every BatchNorm spelling a module first, so that one fold serves them all
    report = FoldReport()
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    # Layers that took a BN already. A BN after that BN reads the layer's node once the first is
    # erased, but in the model it follows a BN: folding it too would fold into the stale module
    # and drop the first BN. It is an affine, as every BN that does not follow a layer.
    absorbed = set(absorbed)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = modules[node.target]
        if type(bn) not in BATCHNORMS or bn.running_mean is None or calls[node.target] != 1 or node.target in keep:
            continue
        src = node.args[0]
        layer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if _foldable(bn, layer) and not src.kwargs and len(src.args) == 1 and src.target not in absorbed:
            alone = sum(not _reads_shape(u) for u in src.users) == 1 and calls[src.target] == 1
            fused = _folded(layer, bn, reuse=inplace and reuse_layers and alone,
                            pending=report.pending if lazy else None)
            if alone:
                set_module(gm, src.target, fused)
                absorbed.add(src.target)
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                report.folded.append((src.target, node.target))
            else:
                name = f"{src.target}__{node.target}".replace(".", "_")
                gm.add_submodule(name, fused)
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_module(name, src.args)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                report.folded.append((name, node.target))
                report.copied.append(src.target)
            continue
        a, shift = _bn_scale_shift(bn)
        dtype = bn.running_mean.dtype
        set_module(gm, node.target, ChannelAffine(a.to(dtype), shift.to(dtype)))
        report.affine.append(node.target)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report
