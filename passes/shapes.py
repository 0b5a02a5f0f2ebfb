"""Shape propagation from example inputs (torch.fx ShapeProp), keeping small non-tensor values.

Besides ``meta['tensor_meta']`` every node whose result is a shape-like Python value
(``x.size(0)``, a tuple of ints) gets ``meta['value']``: the group analysis needs those
to replay reshapes. Given the model the graph was traced from, the run is real and checks the
graph against the model's forward on the way (``passes.replay``); otherwise it runs on the meta
device.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from . import replay
from .errors import ShapeError


def _small(v):
    if isinstance(v, (int, float, bool, str, type(None), torch.Size, torch.dtype, slice)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_small(x) for x in v)
    return False


# Ops whose output has their first input's shape, dtype and strides: on meta tensors the
# generic elementwise meta functions are slow Python, and these need no computing at all.
_SAME_AS_INPUT = {torch.relu, torch.nn.functional.relu, torch.nn.ReLU, torch.nn.Identity, torch.nn.Dropout,
                  torch.nn.functional.dropout, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                  "ChannelAffine"}
_SAME_SHAPE_BINARY = {operator.add, operator.sub, operator.mul}


class _Prop(fx.Interpreter):
    """torch.fx ShapeProp's annotations, with errors that name the failing node or module."""

    meta = False
    lockstep: replay.Lockstep | None = None  # the run follows the model's own forward (replay.run_checked)

    def _shortcut(self, n):
        if not self.meta or n.op not in ("call_function", "call_module"):
            return None
        key = n.target if n.op == "call_function" else type(self.module.get_submodule(n.target))
        args = [self.env.get(a) if isinstance(a, fx.Node) else a for a in n.args]
        if key in _SAME_AS_INPUT or getattr(key, "__name__", None) in _SAME_AS_INPUT:
            x = args[0] if args else None
            return x if isinstance(x, torch.Tensor) and len(n.args) == 1 and not n.kwargs else None
        if key in _SAME_SHAPE_BINARY and len(args) == 2 and not n.kwargs and all(
                isinstance(a, torch.Tensor) for a in args) and args[0].shape == args[1].shape \
                and args[0].dtype == args[1].dtype and args[0].stride() == args[1].stride():
            return args[0]
        return None

    def run_node(self, n):
        try:
            if self.lockstep is not None:
                result = self.lockstep.execute(n)
            else:
                result = self._shortcut(n)
                if result is None:
                    result = super().run_node(n)
        except (ShapeError, replay.Abandon):
            raise
        except Exception as e:  # report the node and module that failed, once
            where = f"module '{n.target}' ({type(self.module.get_submodule(n.target)).__name__})" \
                if n.op == "call_module" else f"node '{n.name}' ({n.op} {getattr(n.target, '__name__', n.target)})"
            msg = str(e).strip().splitlines()
            self.error = f"forward failed at {where} on the example input: {msg[0] if msg else type(e).__name__}"
            raise ShapeError(self.error) from None
        found = []

        def meta(v):
            if isinstance(v, torch.Tensor):
                found.append(v)
                return _metadata(v)
            return v

        tm = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        if _small(result):
            n.meta["value"] = result
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def _metadata(t: torch.Tensor) -> TensorMetadata:
    """ShapeProp's record of a tensor without its memory-format probes, which cost more than the
    rest of a real run's bookkeeping and which no pass reads."""
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride() if t.layout == torch.strided else (),
                          None, t.is_quantized, {})


def as_tuple(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _on_meta(gm: fx.GraphModule, args):
    """Parameters, buffers and inputs as meta tensors: shapes without arithmetic, and no
    BatchNorm running statistics updated on the caller's buffers."""
    from torch.nn.utils.stateless import _reparametrize_module

    state = {k: torch.empty_like(v, device="meta")
             for k, v in list(gm.named_parameters()) + list(gm.named_buffers())}
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    return _reparametrize_module(gm, state), meta_args


def propagate(gm: fx.GraphModule, example_inputs, meta: bool = True, reference=None) -> fx.GraphModule:
    """Annotate every node of ``gm`` with shapes from one run on ``example_inputs``; returns ``gm``.

    ``reference``: the model ``gm`` was traced from. The run is then real, in eval mode, and raises
    TraceError when the graph does not compute what the model's forward computes (``passes.replay``).
    Otherwise the run is on the meta device when every op supports it, else on real tensors (with
    buffers cloned, so a training-mode BatchNorm does not move the caller's statistics).
    """
    args = as_tuple(example_inputs)
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(args) > n_ph:
        raise ShapeError(f"the model takes {n_ph} input(s), {len(args)} example inputs were given")
    if reference is not None and all(isinstance(a, torch.Tensor) for a in args):
        prop = _Prop(gm)
        try:
            replay.run_checked(reference, gm, prop, args)
        except ShapeError:
            raise ShapeError(prop.error) from None
        return gm
    if meta:
        ctx, meta_args = _on_meta(gm, args)
        prop = _Prop(gm)
        prop.meta = True
        try:
            with ctx, torch.no_grad():
                prop.run(*meta_args)
            return gm
        except Exception:  # an op without a meta kernel, or a real error: the real run tells which
            pass
    from torch.nn.utils.stateless import _reparametrize_module

    prop = _Prop(gm)
    with _reparametrize_module(gm, {k: v.clone() for k, v in gm.named_buffers()}), torch.no_grad():
        _run(prop, args)
    return gm


def _run(prop: _Prop, args):
    try:
        return prop.run(*args)
    except ShapeError:
        raise ShapeError(prop.error) from None
