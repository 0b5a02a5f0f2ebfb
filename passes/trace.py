"""Front end: symbolic tracing and normalisation of op spellings.

After ``normalize`` every spelling of one op reaches the group analysis as one form:
relu -> ``torch.relu``; add/sub/mul (operator, torch.*, methods, in-place) -> ``operator.*``;
``nn.Flatten`` / ``x.flatten`` / ``x.view(x.size(0), -1)`` / ``reshape`` -> ``torch.flatten(x, 1)``.

Opaque leaves. ``leaf_modules="auto"`` (the default) retries a failed trace with the submodule that
failed kept opaque, until the trace succeeds: data-dependent control flow in one attention block
then costs that block, not the model. An opaque leaf is called as a whole; its call node carries
``meta["opaque"]``, the reason, and the group analysis makes it a barrier with that reason. The
trace also records, per call of a module it traced through, the graph nodes of that call's inputs
and outputs (``gm.meta["module_calls"]``), by which ``passes.locate`` finds the submodule whose
graph does not compute what its forward computes.
"""
from __future__ import annotations

import copy
import inspect
import operator
import os
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from .errors import InputError, TraceError
from .finite import check_finite

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(__file__)

AUTO = "auto"
CHOSEN = "kept opaque by leaf_modules"
UNTRACEABLE = "could not be traced"


def leaf_choice(leaf_modules) -> tuple[bool, tuple]:
    """(automatic leaves on, the leaves named or typed by the caller) of a ``leaf_modules`` value:
    ``"auto"``, a list of qualified names and module classes, or such a list with ``"auto"`` in it."""
    if isinstance(leaf_modules, str):
        leaf_modules = (leaf_modules,)
    chosen = tuple(leaf_modules or ())
    bad = [m for m in chosen if not isinstance(m, (str, type))]
    if bad:
        raise InputError(f"leaf_modules takes \"auto\", submodule names and module classes, not {bad[0]!r}")
    return AUTO in chosen, tuple(m for m in chosen if m != AUTO)


class _Tracer(fx.Tracer):
    """Records which submodule was being traced when tracing failed, and the graph nodes of every
    module call it traced through; honours ``leaf_modules`` and the leaves found so far."""

    def __init__(self, leaf_modules=(), opaque=None):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)} | set(opaque or ())
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.stack: list[str] = []
        self.failed_at: list[str] | None = None
        self.chosen: set[str] = set()  # leaves that are leaves because the caller or the retries chose them
        self.calls: list[tuple[str, list, list]] = []  # (qualname, input nodes, output nodes), in completion order

    def is_leaf_module(self, m, qualname):
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            if not super().is_leaf_module(m, qualname):
                self.chosen.add(qualname)
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append(path)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()
        if not self.is_leaf_module(m, path):
            self.calls.append((path, _nodes((args, kwargs)), _nodes(out)))
        return out


def _nodes(value) -> list:
    return [p.node if isinstance(p, fx.Proxy) else None for p in tree_leaves(value)]


def _user_frame(tb):
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_THIS_DIR)]
    return frames[-1] if frames else None


def trace(model: nn.Module, leaf_modules=AUTO, copy_model: bool = True, opaque=None,
          inputs: int | None = None) -> fx.GraphModule:
    """Trace a copy of ``model``; the caller's module is never touched.

    ``leaf_modules``: ``"auto"`` (keep each submodule that cannot be traced opaque, retrying until the
    trace succeeds), qualified submodule names or module classes kept opaque (only those), or such a
    list with ``"auto"`` in it. ``opaque``: leaves chosen already, {qualified name: reason}. The group
    analysis treats opaque leaves as barriers. ``gm.meta["leaves"]`` keeps the choice, so that a later
    pass can trace again with one more leaf (``passes.locate``). ``inputs``: how many positional
    arguments the model will be called with; the forward's later arguments keep their default values
    (``mask=None``), as constants of the graph, so that a branch on them follows the call analysed.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    auto, chosen = leaf_choice(leaf_modules)
    check_finite(model)  # every pass starts here: a NaN weight would otherwise pass verification as NaN == NaN
    root = copy.deepcopy(model) if copy_model else model
    opaque = dict(opaque or {})
    defaults = _defaults(root, inputs)
    while True:
        tracer = _Tracer(chosen, opaque)
        try:
            graph = tracer.trace(root, concrete_args=defaults)
            break
        except Exception as e:  # any failure inside tracing is the user's model, reported as such
            where = [p for p in (tracer.failed_at or []) if p]
            sub = where[-1] if where else ""
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if auto and sub and sub not in opaque:  # each retry adds a leaf: the loop ends
                opaque[sub] = f"{UNTRACEABLE}: {msg}"
                continue
            raise _trace_error(e, root, model, sub, msg, auto) from None
    name = type(root).__name__
    graph.owning_module = tracer.root  # dead-code elimination asks the module whether calls are pure
    replaced = _normalize_graph(graph, dict(tracer.root.named_modules()))
    for node in graph.nodes:
        if node.op == "call_module" and node.target in tracer.chosen:
            node.meta["opaque"] = opaque.get(node.target, CHOSEN)
    gm = fx.GraphModule(tracer.root, graph, name)  # compiles the normalised graph once
    gm.meta["leaves"] = {"auto": auto, "chosen": chosen, "opaque": opaque, "inputs": inputs}
    gm.meta["module_calls"] = [(path, _names(ins, replaced), _names(outs, replaced))
                               for path, ins, outs in tracer.calls]
    return gm


_CONSTANT = (type(None), bool, int, float, str)


def _defaults(root: nn.Module, inputs: int | None) -> dict | None:
    """{name: default} of the forward's parameters after the first ``inputs`` whose default is a constant."""
    if inputs is None:
        return None
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature: traced as it is
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {p.name: p.default for p in params[inputs:] if p.kind in kinds and isinstance(p.default, _CONSTANT)}
    return out or None


def _names(nodes, replaced) -> list:
    """Names of the nodes as they are after normalisation (a replaced node stands for its replacement)."""
    out = []
    for n in nodes:
        while n in replaced:
            n = replaced[n]
        out.append(n.name if isinstance(n, fx.Node) else None)
    return out


def _trace_error(e, root, model, sub: str, msg: str, auto: bool) -> TraceError:
    frame = _user_frame(e.__traceback__)
    line = f"\n  at {frame.filename}:{frame.lineno}: {frame.line}" if frame else ""
    what = f"submodule '{sub}' ({type(root.get_submodule(sub)).__name__})" if sub else \
        f"the forward of {type(model).__name__}"
    if not sub:
        hint = "\n  hint: the model's own forward cannot be kept opaque; frontend=\"export\" (CLI: --frontend " \
               "export) captures shape-dependent control flow"
    elif auto:
        hint = ""
    else:
        hint = f"\n  hint: pass leaf_modules=['{sub}'] (CLI: --leaf {sub}), or \"auto\", to keep it opaque (it " \
               f"becomes a barrier)"
    return TraceError(f"cannot trace {what}: {msg}{line}{hint}")


def trace_in_mode(model: nn.Module, leaf_modules=AUTO, train: bool = False, opaque=None,
                  inputs: int | None = None) -> fx.GraphModule:
    """``trace`` of ``model`` itself (no copy) in eval mode, or train mode if ``train``; the model's own
    flags are restored after."""
    flags = [(mod, mod.training) for mod in model.modules()]
    try:
        for mod, _ in flags:
            mod.__dict__["training"] = train  # not Module.__setattr__: its type checks cost more than the trace
        gm = trace(model, leaf_modules=leaf_modules, copy_model=False, opaque=opaque, inputs=inputs)
    finally:
        for mod, flag in flags:
            mod.__dict__["training"] = flag
    gm.training = train  # the root only: the leaves are the model's own modules
    return gm


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


def _normalize_graph(g: fx.Graph, modules: dict) -> dict:
    """Returns {erased node: the node that stands for it now}."""
    position = {n: i for i, n in enumerate(g.nodes)}
    replaced = {}
    for node in list(g.nodes):
        new = None
        if node.op == "call_module":
            m = modules[node.target]
            if type(m) is nn.Identity and len(node.args) == 1 and not node.kwargs:
                # it returns its input itself: an in-place write through either name reaches both
                node.replace_all_uses_with(node.args[0])
                replaced[node] = node.args[0]
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
            replaced[node] = new
            g.erase_node(node)
    g.eliminate_dead_code()
    return replaced
