"""Entries of the rule table keyed by ATen overloads: the ops of the export front end's graphs
(``passes.export``), in the same table as the torch-level keys of ``passes.rules``.

The keys are those of core ATen (the graph is decomposed: ``reshape`` / ``flatten`` arrive as
``view``, ``transpose`` as ``permute``, ``chunk`` as ``split_with_sizes``) and the few ops the front
end keeps whole (``passes.export.KEEP``). Most take their arguments where their torch spelling
does, and use the same rule (a ``view`` is replayed on the slot ids as ``x.view`` is). The others
have a small rule of their own here: a max pooling that returns (values, indices),
``constant_pad_nd`` and the copy paddings, ``clamp`` with a zero lower bound (a ReLU), a
convolution that is transposed. Layers on parameters
were made modules before the analysis (``passes.functional``); the ``aten.convolution`` /
``aten.linear`` entries take the ones that stayed functional (a weight used twice, a weight
computed in forward). Anything not here is a barrier, as in ``passes.rules``.
"""
from __future__ import annotations

import numpy as np
import torch

from .functional import transposed
from .rules import (BARRIER_REASONS, MAX_POOLING, NOT_HOMOGENEOUS, _arg, add, barrier, cast, cat, layer, move, neg,
                    padded, passthrough, pool, product, reduce, rule, split)
from .slots import fixed, only_along

aten = torch.ops.aten


def ops(text: str) -> tuple:
    """ATen overloads from 'name.overload' words."""
    out = []
    for word in text.split():
        name, overload = word.split(".")
        out.append(getattr(getattr(aten, name), overload))
    return tuple(out)


for _keys, _why in [
    (ops("gelu.default silu.default sigmoid.default tanh.default hardswish.default hardsigmoid.default elu.default "
         "softplus.default mish.default exp.default log.default sqrt.default rsqrt.default"), NOT_HOMOGENEOUS),
    (ops("hardtanh.default"), "saturates: not positively homogeneous"),
    (ops("_softmax.default _log_softmax.default"), "normalises across channels"),
    (ops("native_layer_norm.default native_group_norm.default"),
     "normalises across channels (scale invariant, not homogeneous)"),
    (ops("_native_batch_norm_legit_functional.default _native_batch_norm_legit.default _native_batch_norm_legit.no_stats "
         "native_batch_norm.default"), "BatchNorm in training mode: normalises by the statistics of the batch"),
    (ops("pow.Tensor_Scalar pow.Tensor_Tensor"), "power: homogeneous of another degree"),
    (ops("bmm.default mm.default baddbmm.default"), "product of two activations"),
    (ops("_scaled_dot_product_flash_attention_for_cpu.default"), "attention: products of activations and softmax"),
]:
    for _k in _keys:
        BARRIER_REASONS[_k] = _why

rule(*ops("relu.default leaky_relu.default prelu.default clone.default alias.default"))(passthrough)

MAX_POOLS = ops("max_pool1d.default max_pool2d.default max_pool3d.default")
MAX_POOLS_WITH_INDICES = ops("max_pool2d_with_indices.default adaptive_max_pool2d.default adaptive_max_pool3d.default")
MAX_POOLING.update(MAX_POOLS + MAX_POOLS_WITH_INDICES)
rule(*MAX_POOLS, *ops("avg_pool2d.default avg_pool3d.default adaptive_avg_pool1d.default adaptive_avg_pool2d.default "
                      "adaptive_avg_pool3d.default upsample_nearest1d.vec upsample_nearest2d.vec upsample_nearest3d.vec "
                      "upsample_linear1d.vec upsample_bilinear2d.vec upsample_trilinear3d.vec"))(pool)


@rule(*MAX_POOLS_WITH_INDICES)
def pool_with_indices(ctx, node):
    """(values, indices): the values carry the input's slots, per channel; the indices are integers."""
    ids = ctx.value(node.args[0])
    if not isinstance(ids, np.ndarray) or not only_along(ids, 1):
        return barrier(ctx, node, "slots vary along the pooled dims")
    ctx.event(node, "maxpool", ids)
    return ids, fixed(len(ctx.shapes(node)[1]))


@rule(*ops("constant_pad_nd.default"))
def constant_pad(ctx, node):
    return padded(ctx, node, ctx.concrete(node.args[1]), "constant", _arg(node, 2, "value", 0))


@rule(*ops("reflection_pad1d.default reflection_pad2d.default reflection_pad3d.default replication_pad1d.default "
           "replication_pad2d.default replication_pad3d.default _pad_circular.default"))
def copy_pad(ctx, node):
    return padded(ctx, node, ctx.concrete(node.args[1]), "copy", None)


@rule(*ops("clamp.default"))
def clamp(ctx, node):
    """clamp(x, min=0) is a ReLU; any other bound saturates."""
    low, high = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    if low != 0 or high is not None:
        return barrier(ctx, node, "saturates: not positively homogeneous")
    return passthrough(ctx, node)


rule(*ops("add.Tensor sub.Tensor"))(add)


@rule(*ops("mul.Tensor"))
def mul(ctx, node):
    return product(ctx, node, divide=False)


@rule(*ops("div.Tensor"))
def div(ctx, node):
    return product(ctx, node, divide=True)


rule(*ops("neg.default"))(neg)
rule(*ops("cat.default"))(cat)
rule(*ops("split_with_sizes.default"))(split)
rule(*ops("view.default permute.default squeeze.dims unsqueeze.default expand.default flip.default slice.Tensor "
          "select.int repeat.default"))(move)
rule(*ops("_to_copy.default"))(cast)
rule(*ops("mean.dim sum.dim_IntList amax.default"))(reduce)


@rule(*ops("convolution.default linear.default"))
def aten_layer(ctx, node):
    if transposed(node):
        return barrier(ctx, node, "transposed convolution")
    return layer(ctx, node)


@rule(*ops("_native_batch_norm_legit_no_training.default"))
def batch_norm(ctx, node):
    """An eval-mode BatchNorm that stayed functional: ``passes.functional`` makes the others modules."""
    return barrier(ctx, node, "BatchNorm whose tensors are computed in forward, read by other ops too, or not "
                              "attributes of one module")
