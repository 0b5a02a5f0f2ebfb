"""Functional spellings of layers and BatchNorms made the modules every pass knows.

torch.fx traces through every module outside torch.nn: timm's ``BatchNormAct2d`` (a BatchNorm2d
subclass whose forward calls ``F.batch_norm`` and then its activation), a user's BatchNorm,
Conv or Linear subclass, timm's ``Linear``, torchvision's ``FrozenBatchNorm2d`` (a per-channel
affine computed from buffers). They reach the graph as functional calls on ``get_attr`` tensors.
``modularize`` rewrites each such call into a call of the equivalent module, set at the name of
the module that owns the tensors (parameter and buffer names unchanged), so that BatchNorm
folding, P-BN and the path builder handle every spelling as they handle ``nn.BatchNorm2d``,
``nn.Conv2d`` and ``nn.Linear``. The rewrites are keyed by function in ``SPELLINGS``; a call that
no entry takes (a BatchNorm in training mode, statistics that are not buffers, a weight shared
with another op) stays functional, and the rule table decides (a barrier with its reason).

The ATen graph of the export front end (``passes.export``) spells the same layers
``aten.convolution``, ``aten.linear`` and ``aten._native_batch_norm_legit_no_training`` (the
last returning a tuple whose first item is the normalised tensor), on ``get_attr`` tensors of
the model's own names: ``SPELLINGS`` has entries for them too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .fold_bn import ChannelAffine, set_module

aten = torch.ops.aten
CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # by spatial dims
BN_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# Layer calls on (input, weight, bias, ...): kind and the argument position of conv groups (None: 1).
LAYER_CALLS = {F.linear: ("linear", None), aten.linear.default: ("linear", None),
               **{f: ("conv", 6) for f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)},
               aten.convolution.default: ("conv", 8)}


def transposed(node) -> bool:
    """An ``aten.convolution`` that is a transposed convolution (its weight is (in, out, ...))."""
    return node.target is aten.convolution.default and (bool(arg(node, 6, "transposed", False)) or
                                                         any(arg(node, 7, "output_padding", ())))


def arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def batch_norm_refusal(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why an ``F.batch_norm`` call is not a constant per-channel affine map (None when it is)."""
    if arg(node, 5, "training", False) is not False:
        return "BatchNorm in training mode: normalises by the statistics of the batch"
    stats = [arg(node, 1, "running_mean"), arg(node, 2, "running_var")]
    if any(s is None for s in stats):
        return "BatchNorm without running statistics: normalises by the statistics of the batch"
    if not all(_attr(gm, s) is not None and not isinstance(_attr(gm, s), nn.Parameter) for s in stats):
        return "BatchNorm whose statistics are computed in forward, not buffers"
    affine = [arg(node, 3, "weight"), arg(node, 4, "bias")]
    if not all(a is None or _attr(gm, a) is not None for a in affine):
        return "BatchNorm whose affine parameters are computed in forward"
    return None


def _attr(gm, a):
    """The tensor a ``get_attr`` node reads, else None."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return None
    owner, _, field = a.target.rpartition(".")
    try:
        t = getattr(gm.get_submodule(owner), field)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


def _owner(gm, node, tensors) -> str | None:
    """The module that owns every given ``get_attr`` tensor when ``node`` alone reads them and that
    module is fx's attribute holder (a plain nn.Module: nothing calls it), else None."""
    given = [t for t in tensors if t is not None]
    if not given or any(not (isinstance(t, fx.Node) and t.op == "get_attr") or set(t.users) != {node}
                        for t in given):
        return None
    owners = {t.target.rpartition(".")[0] for t in given}
    if len(owners) != 1 or "" in owners:
        return None
    owner = owners.pop()
    return owner if type(gm.get_submodule(owner)) is nn.Module else None


def _install(gm, node, owner: str, module: nn.Module, fields: dict, result=None) -> None:
    """Set ``module`` at ``owner`` with the owner's tensors as ``fields`` and its other members kept,
    and call it in place of ``node`` (of ``result``, the node that reads ``node``'s tensor output, when
    ``node`` returns a tuple)."""
    old = gm.get_submodule(owner)
    for name, t in fields.items():
        if t is None:
            continue
        if isinstance(t, nn.Parameter):
            setattr(module, name, t)
        else:
            module.register_buffer(name, t)
    for name, t in old._parameters.items():
        if name not in fields:
            module.register_parameter(name, t)
    for name, t in old._buffers.items():
        if name not in fields:
            module.register_buffer(name, t)
    set_module(gm, owner, module)
    result = result or node
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(owner, (node.args[0],))
    new.meta = dict(result.meta)
    result.replace_all_uses_with(new)
    for n in (result, node) if result is not node else (node,):
        gm.graph.erase_node(n)


def _batch_norm(gm, node) -> bool:
    if batch_norm_refusal(gm, node) is not None:
        return False
    names = ("running_mean", "running_var", "weight", "bias")
    nodes = [arg(node, i + 1, n) for i, n in enumerate(names)]
    owner = _owner(gm, node, nodes)
    meta = node.meta.get("tensor_meta")
    if owner is None or (nodes[2] is None) != (nodes[3] is None) or len(getattr(meta, "shape", ())) not in BN_MODULES:
        return False
    mean = _attr(gm, nodes[0])
    module = BN_MODULES[len(meta.shape)](mean.numel(), eps=arg(node, 7, "eps", 1e-5),
                                         momentum=arg(node, 6, "momentum", 0.1), affine=nodes[2] is not None,
                                         device=mean.device, dtype=mean.dtype)
    _install(gm, node, owner, module, {n: _attr(gm, a) for n, a in zip(names, nodes)})
    return True


def _layer(gm, node) -> bool:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    owner = _owner(gm, node, [w, b])
    weight, bias = _attr(gm, w), _attr(gm, b)
    if owner is None or not isinstance(weight, nn.Parameter) or (b is not None and not isinstance(bias, nn.Parameter)) \
            or transposed(node):
        return False
    kind, groups_at = LAYER_CALLS[node.target]
    if kind == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
    else:
        groups = arg(node, groups_at, "groups", 1)
        module = CONV_MODULES[weight.dim() - 2](
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_tuple(arg(node, 3, "stride", 1)),
            padding=_tuple(arg(node, 4, "padding", 0)), dilation=_tuple(arg(node, 5, "dilation", 1)), groups=groups,
            bias=b is not None, device="meta")
    _install(gm, node, owner, module, {"weight": weight, "bias": bias})
    return True


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _aten_batch_norm(gm, node) -> bool:
    """``aten._native_batch_norm_legit_no_training(x, weight, bias, mean, var, momentum, eps)``, of which
    only the first output (the normalised tensor) is read."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return False
    nodes = [arg(node, i, n) for i, n in ((3, "running_mean"), (4, "running_var"), (1, "weight"), (2, "bias"))]
    owner = _owner(gm, node, nodes)
    stats = [_attr(gm, s) for s in nodes[:2]]
    meta = node.args[0].meta.get("tensor_meta")
    if owner is None or any(s is None or isinstance(s, nn.Parameter) for s in stats) or \
            (nodes[2] is None) != (nodes[3] is None) or len(getattr(meta, "shape", ())) not in BN_MODULES:
        return False
    mean = stats[0]
    module = BN_MODULES[len(meta.shape)](mean.numel(), eps=arg(node, 6, "eps", 1e-5), momentum=arg(node, 5, "momentum", 0.1),
                                         affine=nodes[2] is not None, device=mean.device, dtype=mean.dtype)
    names = ("running_mean", "running_var", "weight", "bias")
    _install(gm, node, owner, module, {n: _attr(gm, a) for n, a in zip(names, nodes)}, result=users[0])
    return True


SPELLINGS = {F.batch_norm: _batch_norm, **{f: _layer for f in LAYER_CALLS},
             aten._native_batch_norm_legit_no_training.default: _aten_batch_norm}


# -- the per-channel affine computed from buffers (torchvision's FrozenBatchNorm2d) -------------

ADDS, MULS = (operator.add, aten.add.Tensor), (operator.mul, aten.mul.Tensor)  # fx's spelling and ATen's


def constant(gm, node, seen=None) -> bool:
    """True when ``node`` depends on no graph input and on no parameter (buffers and literals only)."""
    seen = {} if seen is None else seen
    if not isinstance(node, fx.Node):
        return True
    if node not in seen:
        if node.op == "get_attr":
            seen[node] = not isinstance(_attr(gm, node), nn.Parameter)
        else:
            seen[node] = node.op in ("call_function", "call_method") and \
                all(constant(gm, a, seen) for a in node.all_input_nodes)
    return seen[node]


def _evaluate(gm, node, cache):
    if node in cache:
        return cache[node]
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: _evaluate(gm, a, cache))
    if node.op == "get_attr":
        out = _attr(gm, node)
    elif node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        out = node.target(*args, **kwargs)
    cache[node] = out
    return out


def _per_channel(t, ndim: int, channels: int) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == ndim and \
        t.shape[1] in (1, channels) and all(s == 1 for d, s in enumerate(t.shape) if d != 1)


def _frozen_affines(gm) -> int:
    """``x * scale + shift`` with both computed from buffers, per channel, as a ``ChannelAffine`` whose
    parameters do not train (they were buffers): a diagonal layer for the analysis, folded like a BN."""
    seen, cache, done = {}, {}, 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in ADDS and len(node.args) == 2 and not node.kwargs):
            continue
        prod, shift = node.args if isinstance(node.args[0], fx.Node) and node.args[0].target in MULS \
            else node.args[::-1]
        if not (isinstance(prod, fx.Node) and prod.op == "call_function" and prod.target in MULS
                and len(prod.users) == 1 and isinstance(shift, fx.Node) and constant(gm, shift, seen)):
            continue
        x, scale = prod.args if not constant(gm, prod.args[0], seen) else prod.args[::-1]
        meta = node.meta.get("tensor_meta")
        if not (isinstance(scale, fx.Node) and constant(gm, scale, seen) and isinstance(x, fx.Node)
                and not constant(gm, x, seen) and hasattr(meta, "shape") and len(meta.shape) >= 2):
            continue
        ndim, c = len(meta.shape), meta.shape[1]
        with torch.no_grad():
            s, b = _evaluate(gm, scale, cache), _evaluate(gm, shift, cache)
        xmeta = x.meta.get("tensor_meta")
        if not (_per_channel(s, ndim, c) and _per_channel(b, ndim, c) and tuple(getattr(xmeta, "shape", ())) ==
                tuple(meta.shape)):
            continue
        weight = s.detach().reshape(-1).expand(c).clone()
        bias = b.detach().reshape(-1).expand(c).clone().to(weight.dtype)
        affine = ChannelAffine(weight, bias).requires_grad_(False)
        name = _free_name(gm, f"{node.name}_affine")
        gm.add_submodule(name, affine)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(prod)
        done += 1
    return done


def _free_name(gm, base: str) -> str:
    names = dict(gm.named_modules())
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite, in ``gm`` itself, the functional spellings of ``SPELLINGS`` and the frozen per-channel
    affines into modules. New modules only are set into ``gm``'s hierarchy (the owners replaced are
    fx's plain attribute holders, never a caller's module). Needs shape metadata (``passes.shapes``)."""
    changed = _frozen_affines(gm)
    for node in list(gm.graph.nodes):
        fn = SPELLINGS.get(node.target) if node.op == "call_function" else None
        if fn is not None and node.args and fn(gm, node):
            changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm
