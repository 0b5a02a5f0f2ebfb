"""Shape propagation from example inputs (torch.fx ShapeProp), keeping small non-tensor values.

Besides ``meta['tensor_meta']`` every node whose result is a shape-like Python value
(``x.size(0)``, a tuple of ints) gets ``meta['value']``: the group analysis needs those
to replay reshapes.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import ShapeError


def _small(v):
    if isinstance(v, (int, float, bool, str, type(None), torch.Size, torch.dtype, slice)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_small(x) for x in v)
    return False


class _Prop(fx.Interpreter):
    """torch.fx ShapeProp's annotations, with errors that name the failing node or module."""

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except ShapeError:
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
                return _extract_tensor_metadata(v)
            return v

        tm = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        if _small(result):
            n.meta["value"] = result
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def as_tuple(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def propagate(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Annotate every node of ``gm`` with shapes from one run on ``example_inputs``; returns ``gm``."""
    args = as_tuple(example_inputs)
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(args) > n_ph:
        raise ShapeError(f"the model takes {n_ph} input(s), {len(args)} example inputs were given")
    prop = _Prop(gm)
    try:
        with torch.no_grad():
            prop.run(*args)
    except ShapeError:
        raise ShapeError(prop.error) from None
    return gm
