"""The result of rescaling-group discovery, and how a group's factors act on weights.

A *variable* is one positive factor that may be applied to a set of channel
slots without changing the network's function. A *group* is a connected set of
producer vectors (layer outputs linked by unions); its variables are numbered
0..width-1. Producers are scaled along their rows (and bias), consumers along
the columns that read the group's channels.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

NO_VAR = -1  # a channel that is not a free variable of this group
OPAQUE = "opaque leaf"  # how the reason of an opaque leaf's barrier begins


@dataclass
class Producer:
    node: str
    weight: str
    bias: str | None
    kind: str  # "linear" | "conv" | "affine"
    out_vars: list[int]  # per output channel: variable index, or NO_VAR when frozen


@dataclass
class Consumer:
    node: str
    weight: str
    kind: str
    conv_groups: int
    in_vars: list[int]  # per input channel (per feature after flatten): variable index or NO_VAR


@dataclass
class Group:
    id: int
    width: int
    producers: list[Producer]
    consumers: list[Consumer]
    passthrough: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    frozen: int = 0  # variables of the same producer vectors that had to stay fixed


@dataclass
class Barrier:
    op: str
    node: str
    reason: str
    module: str = ""  # the submodule called at the node, for a module call


@dataclass
class Frozen:
    layers: list[str]  # weights of the producers whose channels are frozen
    count: int
    reason: str


@dataclass
class RescalingGroups:
    groups: list[Group]
    frozen: list[Frozen]
    barriers: list[Barrier]
    model_name: str = ""
    # The analysed (traced, BN-folded) GraphModule the parameter names refer to; not serialised.
    # Read it as ``source``, which first writes the folded weights of a lazy fold (``fold``).
    graph_module: object = field(default=None, repr=False, compare=False)
    fold: object = field(default=None, repr=False, compare=False)  # passes.fold_bn.FoldReport, maybe pending
    _copy: object = field(default=None, repr=False, compare=False)

    @property
    def source(self):
        """The analysed GraphModule. It may share unmodified leaf modules with the caller's model:
        read it, never write it (``module`` is a private copy)."""
        if self.fold is not None and self.fold.pending:
            self.fold.materialize()
        return self.graph_module

    @property
    def module(self):
        """A private copy of the analysed module (made on first use), safe to modify."""
        if self._copy is None and self.source is not None:
            import copy

            self._copy = copy.deepcopy(self.source).train(self.source.training)
        return self._copy

    @property
    def num_free(self) -> int:
        return sum(g.width for g in self.groups)

    @property
    def num_frozen(self) -> int:
        return sum(f.count for f in self.frozen)

    @property
    def opaque(self) -> list[Barrier]:
        """The opaque leaves: submodules called whole (not traced through), each a barrier with its reason."""
        return [b for b in self.barriers if b.reason.startswith(OPAQUE)]

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("graph_module")
        d.pop("fold")
        d.pop("_copy")
        d["num_free"] = self.num_free
        d["num_frozen"] = self.num_frozen
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "RescalingGroups":
        groups = [
            Group(
                id=g["id"], width=g["width"],
                producers=[Producer(**p) for p in g["producers"]],
                consumers=[Consumer(**c) for c in g["consumers"]],
                passthrough=list(g["passthrough"]), tags=list(g["tags"]), frozen=g["frozen"],
            )
            for g in d["groups"]
        ]
        return cls(
            groups=groups,
            frozen=[Frozen(**f) for f in d["frozen"]],
            barriers=[Barrier(**b) for b in d["barriers"]],
            model_name=d.get("model_name", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> "RescalingGroups":
        return cls.from_dict(json.loads(text))

    # -- presentation --------------------------------------------------------------------
    def to_networkx(self):
        import networkx as nx

        g = nx.DiGraph()
        for grp in self.groups:
            gid = f"group{grp.id}"
            g.add_node(gid, label=f"group {grp.id}\\nwidth {grp.width}\\n{','.join(grp.tags)}", shape="ellipse")
            for p in grp.producers:
                g.add_node(p.weight, label=p.weight, shape="box")
                g.add_edge(p.weight, gid)
            for c in grp.consumers:
                g.add_node(c.weight, label=c.weight, shape="box")
                g.add_edge(gid, c.weight)
        return g

    def to_dot(self) -> str:
        import networkx as nx

        return nx.nx_pydot.to_pydot(self.to_networkx()).to_string()

    def barrier_summary(self) -> Counter:
        return Counter(b.op for b in self.barriers)

    def __str__(self) -> str:
        from .table import by_reason, table

        rows = []
        for g in self.groups:
            first = g.producers[0].weight if g.producers else "-"
            more = f" (+{len(g.producers) - 1})" if len(g.producers) > 1 else ""
            rows.append([g.id, g.width, g.frozen, len(g.producers), len(g.consumers),
                         ",".join(g.tags), first + more])
        head = f"{self.model_name or 'model'}: {len(self.groups)} groups, {self.num_free} free variables, " \
               f"{self.num_frozen} frozen, {len(self.barriers)} barriers"
        out = [head, table(["group", "width", "frozen", "producers", "consumers", "tags", "first producer"], rows)]
        if self.frozen:
            out.append(table(["frozen variables", "places", "reason", "at"],
                             by_reason((f.reason, f.count) for f in self.frozen)))
        if self.opaque:
            out.append(table(["opaque leaf", "class", "reason"],
                             [[b.module, b.op, b.reason[len(OPAQUE) + 2:]] for b in self.opaque]))
        if self.barriers:
            out.append(table(["barrier op", "count", "first node"],
                             [[op, n, next(b.node for b in self.barriers if b.op == op)]
                              for op, n in self.barrier_summary().most_common()]))
        return "\n\n".join(out)


# -- how factors act on weights ----------------------------------------------------------

def in_channel_index(kind: str, shape, conv_groups: int = 1) -> np.ndarray:
    """Input channel read by each (row, column) of a weight; shape == weight.shape[:2] ((C,) for affine)."""
    if kind == "affine":
        return np.arange(shape[0])
    out, cin_g = shape[0], shape[1]
    if kind == "linear":
        return np.broadcast_to(np.arange(cin_g), (out, cin_g))
    cout_g = out // conv_groups
    return (np.arange(out)[:, None] // cout_g) * cin_g + np.arange(cin_g)[None, :]


def _expand(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def producer_factor(p: Producer, f: np.ndarray) -> np.ndarray:
    """Per-output-channel factor (1 for frozen channels)."""
    v = np.asarray(p.out_vars)
    out = np.ones(len(v))
    mask = v >= 0
    out[mask] = f[v[mask]]
    return out


def consumer_factor(c: Consumer, f: np.ndarray, shape) -> np.ndarray:
    """Per-(row, column) factor of a consumer's weight (1 where the column is not in the group)."""
    idx = in_channel_index(c.kind, shape, c.conv_groups)
    v = np.asarray(c.in_vars)[idx]
    out = np.ones(v.shape)
    mask = v >= 0
    out[mask] = f[v[mask]]
    return out


@torch.no_grad()
def apply_factors(module: torch.nn.Module, groups: RescalingGroups, factors: dict[int, np.ndarray]) -> None:
    """In place: producer rows and biases × f, consumer columns ÷ f, for every group in ``factors``."""
    by_id = {g.id: g for g in groups.groups}
    for gid, f in factors.items():
        g = by_id[gid]
        for p in g.producers:
            w = module.get_parameter(p.weight)
            d = torch.as_tensor(producer_factor(p, f), dtype=w.dtype, device=w.device)
            w.mul_(d.reshape((-1,) + (1,) * (w.dim() - 1)))
            if p.bias is not None:
                module.get_parameter(p.bias).mul_(d)
        for c in g.consumers:
            w = module.get_parameter(c.weight)
            d = consumer_factor(c, f, tuple(w.shape))
            d = torch.as_tensor(_expand(d, w.dim()), dtype=w.dtype, device=w.device)
            w.div_(d)
