"""Rescaling-group discovery: abstract interpretation of slot ids over an FX graph (DESIGN §1).

``analyze`` walks a shape-annotated GraphModule once, dispatching every node to the
rule table of ``passes.rules`` (anything else is a barrier), then resolves the recorded
unions with connected components into a ``RescalingGroups``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from . import rules, rules_aten  # noqa: F401 (rules_aten: the ATen entries of the table)
from .functional import LAYER_CALLS
from .groupset import NO_VAR, OPAQUE, Barrier, Consumer, Frozen, Group, Producer, RescalingGroups
from .slots import FIXED, NON_TENSOR, Unions, distinct, fixed, is_free

# Non-tensor results computed from tensors that depend only on shapes, not values.
SHAPE_QUERIES = {"method:size", "method:dim", "method:numel", getattr, len}


@dataclass
class _Layer:
    node: str
    weight: str
    bias: str | None
    kind: str
    groups: int
    in_ids: np.ndarray
    out_ids: np.ndarray | None = None


class _Context:
    """What a rule sees: slot values of nodes, shapes, modules, and the recorders."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, object] = {}
        self.unions = Unions()
        self.producers: dict[str, _Layer] = {}
        self.consumers: list[_Layer] = []
        self.barriers: list[Barrier] = []
        self.events: list[tuple[str, str | None, np.ndarray]] = []
        self._dag = None
        self._escaped = self._find_escaped()

    # -- reading the graph
    def value(self, a):
        return self.values.get(a, NON_TENSOR) if isinstance(a, fx.Node) else NON_TENSOR

    def meta(self, node):
        return node.meta.get("tensor_meta")

    def is_tensor(self, node) -> bool:
        return hasattr(self.meta(node), "shape")

    def shape(self, node) -> tuple:
        return tuple(self.meta(node).shape)

    def shapes(self, node) -> list[tuple]:
        return [tuple(t.shape) for t in self.meta(node)]

    def module(self, node):
        return self.modules[node.target] if node.op == "call_module" else None

    def concrete(self, a):
        return fx.node.map_arg(a, lambda n: n.meta.get("value", n))

    def key(self, node):
        if node.op == "call_module":
            return _module_key(self.modules[node.target])
        if node.op == "call_method":
            return f"method:{node.target}"
        t = node.target
        if t in rules.RULES or t in rules.BARRIER_REASONS or t in SHAPE_QUERIES or isinstance(t, torch._ops.OpOverload):
            return t
        return f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"

    def op_name(self, node) -> str:
        k = self.key(node)
        if isinstance(k, torch._ops.OpOverload):
            return str(k)  # aten.relu.default
        return k.__name__ if hasattr(k, "__name__") else str(k).replace("method:", ".")

    def is_ancestor(self, a, b) -> bool:
        if self._dag is None:
            self._dag = nx.DiGraph((i, n) for n in self.gm.graph.nodes for i in n.all_input_nodes)
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self._dag and b in self._dag \
            and nx.has_path(self._dag, a, b)

    def fixed_output(self, node):
        def fix(meta):
            if hasattr(meta, "shape"):
                return fixed(len(meta.shape))
            if isinstance(meta, (tuple, list)):
                return tuple(fix(t) for t in meta)
            return NON_TENSOR
        return fix(self.meta(node))

    # -- recording
    def fix(self, ids, reason: str) -> None:
        if isinstance(ids, (tuple, list)):
            for v in ids:
                self.fix(v, reason)
        elif isinstance(ids, np.ndarray):
            self.unions.fix(ids, reason)

    def barrier(self, node, reason: str) -> None:
        self.barriers.append(Barrier(op=self.op_name(node), node=node.name, reason=reason,
                                     module=node.target if node.op == "call_module" else ""))

    def opaque(self, node) -> bool:
        """A leaf kept opaque (by the caller or because it could not be traced) with no rule for its class."""
        k = self.key(node) if node.op == "call_module" else None
        return "opaque" in node.meta and k not in rules.RULES and k not in rules.BARRIER_REASONS

    def event(self, node, tag, ids) -> None:
        if is_free(ids):
            self.events.append((node.name, tag, ids))

    def escaped(self, weight, bias):
        return next((p for p in (weight, bias) if p in self._escaped), None)

    def layer(self, node, weight, bias, kind, groups, in_ids, c_out) -> np.ndarray:
        rec = _Layer(node.name, weight, bias, kind, groups, np.asarray(in_ids))
        first = self.producers.get(weight)
        if first is not None:  # shared weights: one set of rows, one set of columns
            self.unions.union(first.in_ids, rec.in_ids)
            if bias != first.bias:  # only the first call's bias would be rescaled with the rows
                self.unions.fix(first.out_ids, f"weight {weight} shared by layers with different biases "
                                               f"('{first.node}', '{node.name}')")
            return first.out_ids
        rec.out_ids = self.unions.fresh(c_out)
        self.producers[weight] = rec
        self.consumers.append(rec)
        return rec.out_ids

    def _find_escaped(self) -> set:
        """Parameters read as plain tensors somewhere, so their rows/columns cannot move."""
        # FX caches one get_attr node per parameter, so a weight read both by F.linear and by
        # another op is one node: every use must be a weight/bias slot of a functional layer.
        def layer_use(n, user):
            if not (user.op == "call_function" and user.target in LAYER_CALLS):
                return False
            found = []
            other = (user.args[:1], user.args[3:], {k: v for k, v in user.kwargs.items() if k not in ("weight", "bias")})
            fx.node.map_arg(other, found.append)
            return n not in found

        out = set()
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and not all(layer_use(n, u) for u in n.users):
                out.add(n.target)
                out.update(f"{n.target}.{p}" for p, _ in _named_params(self.gm, n.target))
        # A module called whole without a rule (an opaque leaf) may use, inside, a parameter that a layer
        # of the graph uses too (a shared module): that layer's rows and columns cannot move without
        # changing what the module computes.
        hidden = {id(p) for n in self.gm.graph.nodes if n.op == "call_module" and self.key(n) not in rules.RULES
                  for p in self.modules[n.target].parameters()}
        if hidden:
            out.update(name for name, p in self.gm.named_parameters(remove_duplicate=False) if id(p) in hidden)
        return out


def _named_params(gm, target):
    try:
        return gm.get_submodule(target).named_parameters()
    except AttributeError:
        return []


def _module_key(mod):
    """Exact class, or a base class when the subclass does not override forward."""
    for cls in type(mod).__mro__:
        if cls in rules.RULES or cls in rules.BARRIER_REASONS:
            return cls
        if "forward" in cls.__dict__:
            return type(mod)
    return type(mod)


def _step(ctx: _Context, node: fx.Node):
    if node.op in ("placeholder", "get_attr"):
        return ctx.fixed_output(node)
    if node.op == "output":
        ctx.fix(tree_map(lambda a: ctx.value(a) if isinstance(a, fx.Node) else None, node.args[0]), "graph output")
        return None
    tensor_in = bool(rules._tensor_args(ctx, node))
    k = ctx.key(node)
    if ctx.opaque(node):
        return rules.barrier(ctx, node, f"{OPAQUE}: {node.meta['opaque']}")
    if ctx.meta(node) is None:  # a Python value out
        if tensor_in and k not in SHAPE_QUERIES:
            rules.barrier(ctx, node, "tensor turned into a Python value")
        return NON_TENSOR
    if not tensor_in and node.op != "call_module":
        return ctx.fixed_output(node)  # a constant built in forward (torch.zeros, arange...)
    if k in rules.BARRIER_REASONS:
        return rules.barrier(ctx, node, rules.BARRIER_REASONS[k])
    fn = rules.RULES.get(k)
    if fn is None:
        what = "opaque leaf module" if node.op == "call_module" else "op"
        return rules.barrier(ctx, node, f"unknown {what}: no rule in the table")
    return fn(ctx, node)


def analyze(gm: fx.GraphModule, name: str = "", fold=None) -> RescalingGroups:
    """Discover the rescaling groups of a shape-annotated (``passes.shapes``) GraphModule.
    ``fold``: the FoldReport of a lazy fold of ``gm``, whose weights the result writes when read."""
    ctx = _Context(gm)
    for node in gm.graph.nodes:
        ctx.values[node] = _step(ctx, node)
    return _resolve(ctx, gm, name, fold)


# -- resolution ---------------------------------------------------------------------------

def _resolve(ctx: _Context, gm, name, fold=None) -> RescalingGroups:
    u = ctx.unions
    comp = u.components()
    pre = u.components(with_fixes=False)  # variables as they were before being frozen
    fixed_label = comp[FIXED]
    layers = list(ctx.producers.values())

    # producer vectors sharing a (free) class form one group: components of the bipartite
    # graph layer -- class
    n = len(layers)
    lay_idx = np.concatenate([np.full(len(lay.out_ids), i) for i, lay in enumerate(layers)] or [np.zeros(0, int)])
    lab = np.concatenate([comp[lay.out_ids] for lay in layers] or [np.zeros(0, int)])
    keep = lab != fixed_label
    link = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (lay_idx[keep], n + lab[keep])),
                      shape=(n + len(comp), n + len(comp)))
    layer_comp = connected_components(link, directed=False)[1][:n]
    components: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(layer_comp.tolist()):
        components[c].append(i)
    reasons = {"fixed": 0}  # reason of each frozen variable (by its label before freezing): the first recorded
    reason_of = np.zeros(len(pre), dtype=np.int64)
    for ids, reason in u.fixes:
        labels = distinct(pre[ids])
        unset = labels[reason_of[labels] == 0]
        if unset.size:
            reason_of[unset] = reasons.setdefault(reason, len(reasons))
    reasons = list(reasons)

    groups, frozen = [], []
    entry_of = np.full(len(pre), -1)  # a frozen variable spanning producers of several groups counts once
    group_of = np.full(len(comp), NO_VAR)  # class label -> group id / variable index
    index_of = np.full(len(comp), NO_VAR)
    for members in components.values():  # in order of their first layer
        labels = np.concatenate([comp[layers[i].out_ids] for i in members])
        labels = labels[labels != fixed_label]
        _, first = np.unique(labels, return_index=True)
        order = labels[np.sort(first)]  # the group's classes, in order of first appearance
        held = [distinct(pre[ids[comp[ids] == fixed_label]]) for ids in (layers[i].out_ids for i in members)]
        P = np.concatenate(held)  # frozen variables of each member, member by member
        L = np.repeat(np.asarray(members), [len(h) for h in held])
        n_frozen = len(distinct(P))
        R = reason_of[P]
        _, first = np.unique(R, return_index=True)
        for r in R[np.sort(first)]:  # reasons in order of first appearance
            Pr, Lr = P[R == r], L[R == r]
            old = entry_of[Pr] >= 0
            for e, i in set(zip(entry_of[Pr[old]].tolist(), Lr[old].tolist())):
                if layers[i].weight not in frozen[e].layers:
                    frozen[e].layers = sorted(frozen[e].layers + [layers[i].weight])
            new = distinct(Pr[~old])
            if new.size:
                frozen.append(Frozen(layers=sorted({layers[i].weight for i in distinct(Lr[~old]).tolist()}),
                                     count=len(new), reason=reasons[r]))
                entry_of[new] = len(frozen) - 1
        if not len(order):
            continue
        gid = len(groups)
        group_of[order], index_of[order] = gid, np.arange(len(order))
        prods = [Producer(node=layers[i].node, weight=layers[i].weight, bias=layers[i].bias, kind=layers[i].kind,
                          out_vars=index_of[comp[layers[i].out_ids]].tolist()) for i in members]
        tags = set()
        for i in members:
            tags.add(layers[i].kind if layers[i].kind != "affine" else "affine")
        groups.append(Group(id=gid, width=len(order), producers=prods, consumers=[], tags=sorted(tags),
                            frozen=n_frozen))

    seen = set()
    for lay in ctx.consumers:
        if lay.weight in seen:
            continue
        seen.add(lay.weight)
        labels = comp[lay.in_ids]
        gl, il = group_of[labels], index_of[labels]
        by_group = np.argsort(gl, kind="stable")  # input channels sorted by their group
        bounds = np.searchsorted(gl[by_group], distinct(gl), side="right")
        start = 0
        for gid, end in zip(distinct(gl).tolist(), bounds.tolist()):
            sel, start = by_group[start:end], end
            if gid < 0:
                continue
            in_vars = np.full(len(labels), NO_VAR)
            in_vars[sel] = il[sel]
            in_vars = in_vars.tolist()
            groups[gid].consumers.append(Consumer(node=lay.node, weight=lay.weight, kind=lay.kind,
                                                  conv_groups=lay.groups, in_vars=in_vars))

    for node_name, tag, ids in ctx.events:
        for gid in distinct(group_of[comp[distinct(ids)]]).tolist():
            if gid >= 0:
                g = groups[gid]
                if not g.passthrough or g.passthrough[-1] != node_name:
                    g.passthrough.append(node_name)
                if tag and tag not in g.tags:
                    g.tags.append(tag)
    for g in groups:
        g.tags.sort()
    return RescalingGroups(groups=groups, frozen=frozen, barriers=ctx.barriers, model_name=name,
                           graph_module=gm, fold=fold)
