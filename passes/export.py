"""The second front end: the ATen graph of ``torch.export``.

``torch.export.export`` runs the model (in eval mode) on fake tensors and records every ATen op it
dispatches. Python control flow is followed as it runs on the example input — a branch on
``x.shape[-1]``, on an optional argument, on a module attribute — which symbolic tracing cannot
do. The program is decomposed to core ATen except for the ops of ``KEEP``, whose decomposition
hides what the analysis reads: a linear layer's weight behind a transpose and ``addmm``, PReLU's
behind a ``where``, an upsampling or a reflection padding as index arithmetic, a max pooling
as a (values, indices) pair; some activations are kept so that their barriers say what they
are. ``ExportedProgram.module()`` lifts parameters and buffers back to ``get_attr`` nodes of a
GraphModule that holds the model's own tensors under their own names, so that groups name the
model's parameters. From there the pipeline is the one of the fx front end: ``passes.functional``
turns ``aten.convolution`` / ``aten.linear`` / ``aten._native_batch_norm_legit_no_training`` on
parameters into Conv / Linear / BatchNorm modules (BatchNorm folding, ENorm and the path builder
work on modules), and the other ATen ops go through the entries of ``passes.rules_aten``.

When to use which: the fx front end keeps the model's own modules as the graph's leaves (a
rewritten model still contains them, named as in the model) and keeps a submodule it cannot
follow opaque; the export front end follows any Python control flow that depends on shapes or
attributes, at the cost of an ATen-level graph (every module inlined) and of eval mode only.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_structure

from .errors import InputError, TraceError
from .finite import check_finite
from .shapes import as_tuple

aten = torch.ops.aten

KEEP = (aten.linear.default, aten.prelu.default, aten._prelu_kernel.default,
        aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
        aten.upsample_linear1d.vec, aten.upsample_trilinear3d.vec,
        aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default,
        aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default,
        aten._pad_circular.default,
        aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
        aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
        aten.hardswish.default, aten.hardsigmoid.default, aten.silu.default, aten.mish.default, aten.softplus.default)


def decompositions():
    table = torch.export.default_decompositions()
    for op in KEEP:
        if op in table:
            del table[op]
    return table


class _Quiet:
    """torch.export logs and warns about what it tries on the way; its result or its error is what counts."""

    def __enter__(self):
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.ERROR)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        self.warnings.__exit__(*exc)


def export_graph(model: nn.Module, example_inputs, train: bool = False) -> fx.GraphModule:
    """The eval-mode ATen graph of ``model`` on ``example_inputs``, as a GraphModule that holds the
    model's parameters and buffers (the same tensors: read it, never write it). The model's own
    flags are restored after."""
    if train:
        raise InputError("the export front end analyses eval mode only (BatchNorms folded); use frontend=\"fx\" "
                         "to analyse a model as it trains")
    if example_inputs is None:
        raise InputError("the export front end needs example inputs: torch.export runs the model on them")
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    check_finite(model)
    args = as_tuple(example_inputs)
    flags = [(mod, mod.training) for mod in model.modules()]
    try:
        for mod, _ in flags:
            mod.__dict__["training"] = False
        with _Quiet():
            program = torch.export.export(model, args).run_decompositions(decompositions())
    except Exception as e:  # what torch.export cannot capture is the user's model, said in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.export cannot capture {type(model).__name__}: {msg}") from None
    finally:
        for mod, flag in flags:
            mod.__dict__["training"] = flag
    lifted = program.module(check_guards=False)
    gm = fx.GraphModule(lifted, lifted.graph, type(model).__name__)
    for node in [n for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]:
        gm.graph.erase_node(node)  # dtype checks of the example: the float64 runs of verification would fail them
    _plain_signature(gm, len(args))
    gm.meta["frontend"] = "export"
    gm.training = False
    return gm


def _plain_signature(gm: fx.GraphModule, n_args: int) -> None:
    """``forward(x, ...)`` returning one tensor, without the pytree flattening that ``module()`` wraps
    every exported program in, when the model takes positional tensors and returns one: the graph
    then deep-copies and exports as any traced graph does."""
    info = gm.graph._codegen.pytree_info if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen) else None
    plain = tree_structure(((0,) * n_args, {}))
    if info is None or info.in_spec != plain or not info.out_spec.is_leaf():
        return
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (out.args[0][0],)
    gm.graph._codegen = fx.graph.CodeGen()
    for spec in ("_in_spec", "_out_spec"):
        gm.__dict__.pop(spec, None)
    gm.recompile()
