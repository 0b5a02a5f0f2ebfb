"""Front end: symbolic tracing and normalisation of op spellings.

After ``normalize`` every spelling of one op reaches the group analysis as one form:
relu -> ``torch.relu``; add/sub/mul (operator, torch.*, methods, in-place) -> ``operator.*``;
``nn.Flatten`` / ``x.flatten`` / ``x.view(x.size(0), -1)`` / ``reshape`` -> ``torch.flatten(x, 1)``.
"""
from __future__ import annotations

import copy
import operator
import os
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import TraceError
from .finite import check_finite

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(__file__)


class _Tracer(fx.Tracer):
    """Records which submodule was being traced when tracing failed; honours ``leaf_modules``."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.stack: list[str] = []
        self.failed_at: list[str] | None = None

    def is_leaf_module(self, m, qualname):
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _user_frame(tb):
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_THIS_DIR)]
    return frames[-1] if frames else None


def trace(model: nn.Module, leaf_modules=(), copy_model: bool = True) -> fx.GraphModule:
    """Trace a copy of ``model``; the caller's module is never touched.

    ``leaf_modules``: qualified submodule names (or module classes) kept opaque; the
    group analysis treats them as barriers.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    check_finite(model)  # every pass starts here: a NaN weight would otherwise pass verification as NaN == NaN
    root = copy.deepcopy(model) if copy_model else model
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as e:  # any failure inside tracing is the user's model, reported as such
        where = [p for p in (tracer.failed_at or []) if p]
        sub = where[-1] if where else ""
        frame = _user_frame(e.__traceback__)
        line = f"\n  at {frame.filename}:{frame.lineno}: {frame.line}" if frame else ""
        what = f"submodule '{sub}' ({type(root.get_submodule(sub)).__name__})" if sub else \
            f"the forward of {type(model).__name__}"
        hint = f"\n  hint: pass leaf_modules=['{sub}'] (CLI: --leaf {sub}) to keep it opaque (it becomes a barrier)" if sub else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"cannot trace {what}: {msg}{line}{hint}") from None
    name = type(root).__name__
    graph.owning_module = tracer.root  # dead-code elimination asks the module whether calls are pure
    _normalize_graph(graph, dict(tracer.root.named_modules()))
    return fx.GraphModule(tracer.root, graph, name)  # compiles the normalised graph once


# -- spelling normalisation -------------------------------------------------------------------

_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_BINARY = {
    operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add, "add": operator.add, "add_": operator.add,
    operator.sub: operator.sub, operator.isub: operator.sub, torch.sub: operator.sub, "sub": operator.sub, "sub_": operator.sub,
    operator.mul: operator.mul, operator.imul: operator.mul, torch.mul: operator.mul, "mul": operator.mul, "mul_": operator.mul,
}


def _key(node):
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    return None


def _is_batch_size(node, x) -> bool:
    """``x.size(0)`` or ``x.shape[0]``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is x:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr \
            and src.args[0] is x and src.args[1] == "shape"
    return False


def _flatten_form(node):
    """The tensor a node flattens from dim 1, if it is one of the flatten spellings."""
    if node.op == "call_module":
        return None
    k = _key(node)
    args = list(node.args)
    if k in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return args[0] if start == 1 and end == -1 else None
    if k in ("view", "reshape", torch.reshape):
        x = args[0]
        shape = args[1:] if k != torch.reshape else list(args[1])
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        if len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], x):
            return x
    return None


_INPLACE = {torch.relu_, "relu_", operator.iadd, operator.isub, operator.imul, "add_", "sub_", "mul_"}


def _inplace(node, modules) -> bool:
    """The node writes into its first argument (its result may be discarded, the argument read later)."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    flag = node.args[1] if node.target is F.relu and len(node.args) > 1 else node.kwargs.get("inplace", False)
    return node.target in _INPLACE or bool(flag)


def _later_users(node, position):
    """Users placed after ``node``; ``position`` numbers the original nodes (new ones come right
    after the node they replace, so only original nodes can be later users)."""
    here = position[node]
    return lambda user: position.get(user, -1) > here


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Normalise the op spellings of ``gm``'s graph in place and recompile it."""
    _normalize_graph(gm.graph, dict(gm.named_modules()))
    gm.recompile()
    return gm


def _normalize_graph(g: fx.Graph, modules: dict) -> None:
    position = {n: i for i, n in enumerate(g.nodes)}
    for node in list(g.nodes):
        new = None
        if node.op == "call_module":
            m = modules[node.target]
            if type(m) is nn.Identity and len(node.args) == 1 and not node.kwargs:
                # it returns its input itself: an in-place write through either name reaches both
                node.replace_all_uses_with(node.args[0])
                g.erase_node(node)
                continue
            if type(m) is nn.ReLU:
                with g.inserting_after(node):
                    new = g.call_function(torch.relu, (node.args[0],))
            elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
                with g.inserting_after(node):
                    new = g.call_function(torch.flatten, (node.args[0], 1))
        elif node.op in ("call_function", "call_method"):
            k = _key(node)
            if k in _RELU and len(node.args) >= 1:
                with g.inserting_after(node):
                    new = g.call_function(torch.relu, (node.args[0],))
            elif k in _BINARY and len(node.args) == 2 and not node.kwargs:
                with g.inserting_after(node):
                    new = g.call_function(_BINARY[k], tuple(node.args))
            else:
                x = _flatten_form(node)
                if x is not None and not (node.target is torch.flatten and len(node.args) == 2 and not node.kwargs):
                    with g.inserting_after(node):
                        new = g.call_function(torch.flatten, (x, 1))
        if new is not None:
            new.meta = dict(node.meta)
            x = node.args[0]
            if _inplace(node, modules) and isinstance(x, fx.Node):
                # the rewrite is out of place: reads of the mutated tensor after it read the new value
                x.replace_all_uses_with(new, delete_user_cb=_later_users(node, position))
            node.replace_all_uses_with(new)
            g.erase_node(node)
    g.eliminate_dead_code()
