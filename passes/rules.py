"""The rule table of the group analysis (DESIGN §1).

Each rule maps a node's input slot values to its output slot value. Keys are the
function object (call_function), ``"method:name"`` (call_method), the module class
(call_module) or the ATen overload (the export front end's graphs: ``passes.rules_aten``
adds those entries). Anything not in the table is a barrier.
"""
from __future__ import annotations

import operator
import numbers

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .fold_bn import ChannelAffine
from .functional import LAYER_CALLS, arg, batch_norm_refusal, constant
from .slots import along, channel_ids, compress, fixed, is_free, only_along, right_align

RULES: dict = {}


def rule(*keys):
    def register(fn):
        for k in keys:
            RULES[k] = fn
        return fn
    return register


def m(*names):
    return tuple(f"method:{n}" for n in names)


# -- barriers ----------------------------------------------------------------------------

NOT_HOMOGENEOUS = "not positively homogeneous"
BARRIER_REASONS = {}
for _keys, _why in [
    ((nn.GELU, F.gelu) + m("gelu"), NOT_HOMOGENEOUS),
    ((nn.SiLU, F.silu) + m("silu"), NOT_HOMOGENEOUS),
    ((nn.Sigmoid, torch.sigmoid, F.sigmoid) + m("sigmoid"), NOT_HOMOGENEOUS),
    ((nn.Tanh, torch.tanh, F.tanh) + m("tanh"), NOT_HOMOGENEOUS),
    ((nn.ReLU6, F.relu6), "saturates at 6: not positively homogeneous"),
    ((nn.Hardtanh, F.hardtanh), "saturates: not positively homogeneous"),
    ((nn.Hardswish, F.hardswish), NOT_HOMOGENEOUS),
    ((nn.Hardsigmoid, F.hardsigmoid), NOT_HOMOGENEOUS),
    ((nn.ELU, F.elu, nn.SELU, F.selu, nn.CELU, F.celu, nn.Softplus, F.softplus, nn.Mish, F.mish), NOT_HOMOGENEOUS),
    ((nn.Softmax, F.softmax, torch.softmax, nn.LogSoftmax, F.log_softmax) + m("softmax", "log_softmax"),
     "normalises across channels"),
    ((nn.LayerNorm, F.layer_norm), "normalises across channels (scale invariant, not homogeneous)"),
    ((nn.GroupNorm, F.group_norm), "normalises across channels (scale invariant, not homogeneous)"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
     "BatchNorm that is not folded (training mode or no running statistics)"),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm, nn.LocalResponseNorm),
     "normalisation: not homogeneous"),
    ((torch.exp, torch.log, torch.sqrt, torch.rsqrt) + m("exp", "log", "sqrt"), NOT_HOMOGENEOUS),
    ((torch.pow, operator.pow) + m("pow"), "power: homogeneous of another degree"),
    ((torch.matmul, operator.matmul, torch.bmm, torch.einsum) + m("matmul", "bmm"),
     "product of two activations"),
    ((nn.MultiheadAttention,), "attention: products of activations and softmax"),
]:
    for _k in _keys:
        BARRIER_REASONS[_k] = _why


# -- helpers ------------------------------------------------------------------------------

def _tensor_args(ctx, node):
    out = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))
    return [a for a in out if isinstance(ctx.value(a), (np.ndarray, tuple))]


def barrier(ctx, node, reason):
    for a in _tensor_args(ctx, node):
        ctx.fix(ctx.value(a), f"input of {ctx.op_name(node)} at node '{node.name}' ({reason})")
    ctx.barrier(node, reason)
    return ctx.fixed_output(node)


_arg = arg


# -- pass-through: positively homogeneous of degree 1, channel-preserving ------------------

ELEMENTWISE = (torch.relu, F.leaky_relu, F.prelu, torch.prelu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
               torch.clone, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
               nn.Identity, "torchvision.ops.stochastic_depth.stochastic_depth") + \
    m("contiguous", "clone")


@rule(*ELEMENTWISE)
def passthrough(ctx, node):
    ids = ctx.value(node.args[0])
    if not isinstance(ids, np.ndarray) or not ctx.is_tensor(node):
        return barrier(ctx, node, "no tensor in or out")
    ctx.event(node, None, ids)
    return ids


MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
            F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
            F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
AVGPOOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d, F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.adaptive_avg_pool1d)


MAX_POOLING = set(MAXPOOLS)  # the keys of every max pooling, ATen's included: tagged "maxpool"


@rule(*MAXPOOLS, *AVGPOOLS)
def pool(ctx, node):
    """Pooling acts per channel over spatial dims: slots must not vary spatially."""
    ids = ctx.value(node.args[0])
    if not ctx.is_tensor(node):
        return barrier(ctx, node, "pooling that returns indices")
    if not only_along(ids, 1):
        return barrier(ctx, node, "slots vary along the pooled dims")
    ctx.event(node, "maxpool" if ctx.key(node) in MAX_POOLING else None, ids)
    return ids


LINEAR_INTERP = {"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area"}


@rule(F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample(ctx, node):
    mod = ctx.module(node)
    mode = mod.mode if mod is not None else _arg(node, 3, "mode", "nearest")
    if mode not in LINEAR_INTERP:
        return barrier(ctx, node, f"interpolation mode {mode!r}")
    return pool(ctx, node)


@rule(F.pad, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
      nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
def pad(ctx, node):
    mod = ctx.module(node)
    if mod is not None:
        pads, value = mod.padding, getattr(mod, "value", 0.0)
        mode = "constant" if hasattr(mod, "value") else "copy"
    else:
        pads, mode, value = ctx.concrete(node.args[1]), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    return padded(ctx, node, pads, mode, value)


def padded(ctx, node, pads, mode, value):
    """Zero padding and padding with copies of the border are homogeneous; a non-zero constant is not."""
    if mode == "constant" and value not in (None, 0, 0.0):
        return barrier(ctx, node, f"padding with the non-zero constant {value}")
    ids = ctx.value(node.args[0])
    n_padded = len(pads) // 2 if isinstance(pads, (tuple, list)) else ids.ndim - 2
    if any(ids.shape[ids.ndim - 1 - i] > 1 for i in range(n_padded)):
        return barrier(ctx, node, "padding along a dim where slots vary")
    ctx.event(node, None, ids)
    return ids


# -- arithmetic ---------------------------------------------------------------------------

def _scalar(ctx, x):
    v = ctx.concrete(x) if isinstance(x, fx.Node) and not ctx.is_tensor(x) else x
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _skip_source(ctx, node):
    """The value a branch carries unchanged: back through single-input pass-through ops, so
    that add(f(x), Identity(x)) is an identity skip although Identity(x) is its own node."""
    while isinstance(node, fx.Node) and node.op in ("call_module", "call_function", "call_method") \
            and RULES.get(ctx.key(node)) in (passthrough, pool, neg, cast) and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node


@rule(operator.add, operator.sub)
def add(ctx, node):
    a, b = node.args[0], node.args[1]
    ndim = len(ctx.shape(node))
    va, vb = ctx.value(a), ctx.value(b)
    if _scalar(ctx, a) or _scalar(ctx, b):
        ids, c = (vb, ctx.concrete(a)) if _scalar(ctx, a) else (va, ctx.concrete(b))
        if c == 0:
            return ids
        ctx.fix(ids, f"added to the constant {c} at node '{node.name}'")
        return fixed(ndim)
    if not (isinstance(va, np.ndarray) and isinstance(vb, np.ndarray)):
        return barrier(ctx, node, "operands that are not tensors")
    va, vb = right_align(va, ndim), right_align(vb, ndim)
    if is_free(va) and is_free(vb):
        sa, sb = _skip_source(ctx, a), _skip_source(ctx, b)
        identity = ctx.is_ancestor(sa, b) or ctx.is_ancestor(sb, a)
        ctx.event(node, "identity-skip" if identity else "learned-skip", va)
    elif is_free(va) or is_free(vb):
        ctx.fix(va if is_free(va) else vb, f"added to a fixed tensor at node '{node.name}'")
    ctx.unions.union(va, vb)
    return compress(np.broadcast_arrays(va, vb)[0].copy())


@rule(operator.mul, operator.truediv, torch.div, "method:div")
def mul(ctx, node):
    return product(ctx, node, divide=ctx.key(node) is not operator.mul)


def product(ctx, node, divide: bool):
    """a * b or a / b: a scalar or a fixed factor keeps the other operand's slots."""
    a, b = node.args[0], node.args[1]
    ndim = len(ctx.shape(node))
    va, vb = ctx.value(a), ctx.value(b)
    if _scalar(ctx, b) or (_scalar(ctx, a) and not divide):
        ids = va if _scalar(ctx, b) else vb
        if isinstance(ids, np.ndarray):
            ctx.event(node, None, ids)
            return ids
    if not (isinstance(va, np.ndarray) and isinstance(vb, np.ndarray)):
        return barrier(ctx, node, "operands that are not tensors")
    if divide and is_free(vb):
        return barrier(ctx, node, "division by an activation")
    if is_free(va) and is_free(vb):
        return barrier(ctx, node, "product of two activations")
    ids = right_align(va if is_free(va) or not is_free(vb) else vb, ndim)
    ctx.event(node, None, ids)
    return ids


@rule(operator.neg, torch.neg, "method:neg")
def neg(ctx, node):
    return ctx.value(node.args[0])


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, node):
    parts = node.args[0] if node.args else node.kwargs["tensors"]
    ndim = len(ctx.shape(node))
    dim = _arg(node, 1, "dim", 0) % ndim
    vals = [ctx.value(p) for p in parts]
    if not all(isinstance(v, np.ndarray) for v in vals):
        return barrier(ctx, node, "concatenation of non-tensors")
    others = [max(v.shape[d] for v in vals) for d in range(ndim)]
    pieces = []
    for p, v in zip(parts, vals):
        shape = list(others)
        shape[dim] = ctx.shape(p)[dim]
        pieces.append(np.broadcast_to(v, shape))
    out = np.concatenate(pieces, axis=dim)
    if any(is_free(v) for v in vals):  # every joined group sees the concat, not only the first piece's
        ctx.event(node, "concat" if dim == 1 else None, out)
    return compress(out)


@rule(torch.split, torch.chunk, torch.tensor_split, *m("split", "chunk", "tensor_split"))
def split(ctx, node):
    ids = ctx.value(node.args[0])
    shapes = ctx.shapes(node)
    dim = _arg(node, 2, "dim", 0) % ids.ndim
    if ids.shape[dim] == 1:
        return tuple(ids for _ in shapes)
    out, start = [], 0
    for s in shapes:
        out.append(np.take(ids, range(start, start + s[dim]), axis=dim))
        start += s[dim]
    ctx.event(node, None, ids)
    return tuple(out)


# -- moving elements around: replay the op on the slot ids ---------------------------------

INDEX_OPS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
             torch.flip, torch.roll, torch.narrow, torch.movedim, torch.swapaxes, torch.t, nn.Flatten, nn.Unflatten,
             operator.getitem) + \
    m("view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand", "repeat", "flip",
      "roll", "narrow", "unflatten", "movedim", "swapaxes", "t")


@rule(*INDEX_OPS)
def move(ctx, node):
    src = ctx.value(node.args[0])
    if isinstance(src, tuple):  # indexing the result of split/chunk
        return src[node.args[1]]
    if not isinstance(src, np.ndarray) or not ctx.is_tensor(node):
        return barrier(ctx, node, "indexing that does not return one tensor")
    out_ndim = len(ctx.shape(node))
    if not is_free(src):
        return fixed(out_ndim)
    full = torch.from_numpy(np.broadcast_to(src, ctx.shape(node.args[0])).copy())
    try:
        mod = ctx.module(node)
        if mod is not None:
            moved = mod(full)
        else:
            args = [full] + [ctx.concrete(a) for a in node.args[1:]]
            kwargs = {k: ctx.concrete(v) for k, v in node.kwargs.items()}
            fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
            moved = fn(*args, **kwargs)
    except Exception as e:  # an index we cannot replay is a barrier, never a guess
        return barrier(ctx, node, f"cannot replay the indexing ({type(e).__name__})")
    ctx.event(node, None, src)
    return compress(moved.numpy())


@rule("method:to", "method:float", "method:double", "method:half", "method:bfloat16", "method:type_as")
def cast(ctx, node):
    ids = ctx.value(node.args[0])
    if not ctx.is_tensor(node) or not ctx.meta(node).dtype.is_floating_point:
        return barrier(ctx, node, "cast to a non-floating dtype")
    return ids


@rule(torch.mean, torch.sum, torch.amax, *m("mean", "sum", "amax"))
def reduce(ctx, node):
    ids = ctx.value(node.args[0])
    dims = _arg(node, 1, "dim", None)
    keep = _arg(node, 2, "keepdim", False)
    if dims is None:
        return barrier(ctx, node, "reduction over all dims")
    dims = [d % ids.ndim for d in ((dims,) if isinstance(dims, int) else dims)]
    if any(ids.shape[d] > 1 for d in dims):
        return barrier(ctx, node, "reduction over dims where slots vary (channels)")
    ctx.event(node, None, ids)
    return ids if keep else ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])


@rule(F.batch_norm)
def functional_batch_norm(ctx, node):
    """An eval-mode ``F.batch_norm`` on buffers became a BatchNorm module (``passes.functional``) and was
    folded; one that reaches the analysis is a barrier, with the reason it stayed functional."""
    why = batch_norm_refusal(ctx.gm, node) or \
        "BatchNorm whose tensors are read by other ops too, or are not attributes of one module"
    return barrier(ctx, node, why)


# -- layers: consumers of their input slots, producers of fresh slots ----------------------

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TORCH_LAYER_CALLS = tuple(f for f in LAYER_CALLS if not isinstance(f, torch._ops.OpOverload))  # ATen's: rules_aten


def _layer_params(ctx, node):
    """(weight name, bias name, kind, groups, out channels) of a layer node, or None."""
    mod = ctx.module(node)
    if mod is not None:
        kind = "linear" if isinstance(mod, nn.Linear) else "affine" if isinstance(mod, ChannelAffine) else "conv"
        groups = getattr(mod, "groups", 1)
        bias = f"{node.target}.bias" if mod.bias is not None else None
        return f"{node.target}.weight", bias, kind, groups, mod.weight.shape[0]
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not _is_parameter(ctx, w) or (b is not None and not (
            isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    kind, groups_at = LAYER_CALLS[ctx.key(node)]
    groups = _arg(node, groups_at, "groups", 1) if groups_at else 1
    return w.target, (b.target if b is not None else None), kind, groups, ctx.shape(w)[0]


def _is_parameter(ctx, w) -> bool:
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return False
    owner, _, field = w.target.rpartition(".")
    try:
        return isinstance(getattr(ctx.gm.get_submodule(owner), field), nn.Parameter)
    except AttributeError:
        return False


def fixed_map(ctx, node):
    """A conv whose weight is a constant (a buffer such as an anti-aliasing blur filter, not a
    parameter): not a free layer. Where every output channel reads one input channel and no bias is
    added, y_o = k_o * x_{o // m} is positively homogeneous and channel-preserving: the slots pass,
    each repeated over the m outputs of its channel. Any other fixed map mixes channels."""
    if LAYER_CALLS[ctx.key(node)][0] == "linear" or _arg(node, 2, "bias") is not None:
        return barrier(ctx, node, "fixed linear map (weight not a parameter) that mixes channels or adds a bias")
    x = ctx.value(node.args[0])
    c_in, c_out = ctx.shape(node.args[0])[1], ctx.shape(node)[1]
    if ctx.shape(_arg(node, 1, "weight"))[1] != 1 or c_out % c_in:
        return barrier(ctx, node, "fixed linear map (weight not a parameter) that mixes channels")
    if not only_along(x, 1):
        return barrier(ctx, node, "fixed linear map over dims where slots vary")
    out = np.repeat(along(x, 1, c_in), c_out // c_in)
    ctx.event(node, None, out)
    return compress(channel_ids(out, len(ctx.shape(node)), 1))


@rule(nn.Linear, *CONVS, *TORCH_LAYER_CALLS, ChannelAffine)
def layer(ctx, node):
    params = _layer_params(ctx, node)
    if params is None:
        if node.op == "call_function" and constant(ctx.gm, _arg(node, 1, "weight")):
            return fixed_map(ctx, node)
        return barrier(ctx, node, "layer whose weight is computed, not a parameter")
    weight, bias, kind, groups, c_out = params
    x = ctx.value(node.args[0])
    ndim = len(ctx.shape(node))
    in_dim = -1 if kind == "linear" else 1
    c_in = ctx.shape(node.args[0])[in_dim]
    escaped = ctx.escaped(weight, bias)
    if escaped:
        ctx.fix(x, f"weight {escaped} is also used outside layer '{node.name}'")
        return fixed(ndim)
    if not only_along(x, in_dim):
        ctx.fix(x, f"input of layer '{node.name}' has slots that vary along non-channel dims")
        x = fixed(x.ndim)
    in_ids = along(x, in_dim, c_in)
    out_ids = ctx.layer(node, weight, bias, kind, groups, in_ids, c_out)
    if kind == "conv" and groups > 1 and groups == c_in:
        ctx.event(node, "depthwise", channel_ids(out_ids, ndim, 1))
    return channel_ids(out_ids, ndim, in_dim)
