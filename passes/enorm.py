"""Equi-normalization (ENorm): the function-preserving rescaling of minimal weight p-norm (DESIGN §2).

Objective. Let W be the set of weight tensors of every layer that is a producer or a
consumer of *any* group of the ``RescalingGroups`` (biases excluded). ENorm minimises
``Σ_{w ∈ W} Σ_entries |w|^p`` over the factors of the free variables of the balanced
groups (all groups, or the ``groups=`` subset; frozen rows and columns are constants).

Update. For variable s of a group: L_s = Σ |w|^p over its producers' rows (a conv row is
C_in/groups × k × k entries, an affine row its single entry), R_s = Σ |w|^p over its
consumers' columns (a flattened channel counts all of its H·W columns). With the rest
fixed the objective in s is ``L_s t^p + R_s t^-p``, minimised by ``d_s = (R_s/L_s)^(1/2p)``:
rows and bias × d_s, columns ÷ d_s. Variables of one group share no weight entry unless a
layer is both a producer and a consumer of the group (a shared layer called twice, an
affine whose input and output are in one group): there an entry whose row and column are
the same variable never changes and is left out of L and R, and variables that share an
entry are updated in turn (a colouring of the group's variables), so each step is still
an exact minimisation and the objective never increases. Groups that share no weight
tensor are updated together (a colouring of the conflict graph); one cycle visits every
group once.

Asymmetric variant (paper §3.7): ``d_s = (R_s/L_s)^(1/2p) / c``, the exact minimiser of
``c^2p L_s t^p + R_s t^-p``. On a layered network (every group's producers at one depth k,
its consumers at k+1) this is coordinate descent on ``Σ_k c^(2p(q-k)) ||W_k||_p^p``
(q = last depth): c > 1 moves energy toward the output. Skip connections make that depth
assignment inconsistent; the update then still preserves the function but minimises no
single global objective, and ``weighted_objective`` is None.

Dead variables keep factor 1: L or R is 0, or, more generally, no path of nonzero weights
leads from the input through the variable to the output (``enorm_reach``); along a set of
such variables the objective has no minimum.

Work is done on the small per-(row, column) energy matrices ``E[o, i] = Σ_kernel |w[o, i]|^p``
with per-row and per-column factor vectors, so a cycle reads each weight once and writes
it once (``Balancer.apply``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np
import torch

from . import enorm_reach, kernels
from .errors import InputError, NonFiniteError
from .groupset import RescalingGroups, in_channel_index
from .table import table


# -- report --------------------------------------------------------------------------------

@dataclass
class LayerEnergy:
    name: str
    before: float  # Σ|w|^p of the layer's weight
    after: float
    rows_before: list[float]  # per output unit: Σ|w|^p of its incoming weights (the paper's columns)
    rows_after: list[float]


@dataclass
class DeadChannels:
    group: int
    variables: list[int]  # no nonzero path from the input through them to the output: left at factor 1


@dataclass
class ENormReport:
    p: float
    c: float
    tol: float | None
    cycles: int
    converged: bool
    objective: list[float]  # [0] before, [i] after cycle i: Σ over all layers of any group of Σ|w|^p
    weighted_objective: list[float] | None  # c != 1 on a layered network, else None
    layers: list[LayerEnergy]
    groups: list[int]  # balanced group ids
    colours: list[list[int]]  # group ids updated together, in cycle order
    dead: list[DeadChannels] = field(default_factory=list)

    @property
    def before(self) -> float:
        return self.objective[0]

    @property
    def after(self) -> float:
        return self.objective[-1]

    @property
    def num_dead(self) -> int:
        return sum(len(d.variables) for d in self.dead)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = table(["", "value"], [
            ["p, c", f"{self.p:g}, {self.c:g}"],
            ["groups balanced", f"{len(self.groups)} in {len(self.colours)} colour classes"],
            ["cycles", f"{self.cycles}" + (" (converged)" if self.converged else "")],
            ["objective before", f"{self.before:.6g}"],
            ["objective after", f"{self.after:.6g}"],
            ["dead channels", self.num_dead],
        ])
        rows = [[lay.name, f"{lay.before:.4g}", f"{lay.after:.4g}", f"{lay.after / lay.before:.3f}"
                 if lay.before else "-"] for lay in self.layers]
        return head + "\n\n" + table(["layer", "energy before", "energy after", "ratio"], rows)


# -- precomputed index maps ------------------------------------------------------------------

@dataclass
class _Weight:
    name: str
    bias: str | None
    kind: str
    shape: tuple
    blocks: int  # conv groups (C for affine)
    rows: int  # rows per block
    cols: int  # columns (input channels or features) per block

    @property
    def view(self) -> tuple:  # (out, in/groups) or (C,), broadcast over kernel dims
        return self.shape[:1] if self.kind == "affine" else self.shape[:2] + (1,) * (len(self.shape) - 2)


@dataclass
class _Side:
    w: int  # weight index
    pos: torch.Tensor  # rows (producer) or columns (consumer) that are variables of the group
    var: torch.Tensor  # their variable
    identity: bool = False  # row/column j is variable j, for all j: no gather or scatter needed


def _side(w: int, v: np.ndarray, width: int) -> _Side:
    pos = np.flatnonzero(v >= 0)
    return _Side(w, _long(pos), _long(v[pos]), len(v) == width and bool((v == np.arange(width)).all()))


@dataclass
class _Plan:
    gid: int
    width: int
    rows: list[_Side]
    cols: list[_Side]
    self_masks: dict[int, torch.Tensor]  # weight index -> entries whose row and column are one variable
    classes: list[torch.Tensor] | None  # variables updated in turn; None: all at once


@dataclass
class State:
    """Energies at the start of a run and the factors accumulated since: E·r^p/k^p is the current energy."""

    E: list[torch.Tensor]  # per weight (blocks, rows, cols)
    masked: dict[tuple[int, int], torch.Tensor]  # (group, weight) -> E without invariant entries
    r: list[torch.Tensor]
    k: list[torch.Tensor]
    totals: torch.Tensor | None = None  # Σ E per weight at the start
    fixed: list[torch.Tensor] = field(default_factory=list)  # per plan: variables cut off from input or output
    factors: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> product of its d
    dead: dict[int, torch.Tensor] = field(default_factory=dict)


def _long(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def _colour_classes(graph: nx.Graph) -> list[list]:
    colour = nx.greedy_color(graph, strategy="largest_first")
    classes: dict[int, list] = {}
    for node in graph.nodes:  # insertion order keeps the classes deterministic
        classes.setdefault(colour[node], []).append(node)
    return [classes[c] for c in sorted(classes)]


class Balancer:
    """ENorm over ``groups`` acting on the parameters ``params`` (name -> tensor)."""

    def __init__(self, groups: RescalingGroups, params: dict, select=None):
        self.params = params
        chosen = [g.id for g in groups.groups] if select is None else list(select)
        by_id = {g.id: g for g in groups.groups}
        missing = [gid for gid in chosen if gid not in by_id]
        if missing:
            raise InputError(f"unknown group id(s) {missing}: the model has groups 0..{len(groups.groups) - 1}")
        self.weights: list[_Weight] = []
        self.index: dict[str, int] = {}
        conv_groups = {c.weight: c.conv_groups for g in groups.groups for c in g.consumers}
        for g in groups.groups:
            for layer in [(p.weight, p.bias, p.kind) for p in g.producers] + \
                         [(c.weight, None, c.kind) for c in g.consumers]:
                self._add_weight(*layer, conv_groups.get(layer[0], 1))
        self.plans = [self._plan(by_id[gid]) for gid in chosen]
        conflict = nx.Graph()
        conflict.add_nodes_from(range(len(self.plans)))
        users: dict[int, list[int]] = {}
        for i, plan in enumerate(self.plans):
            for w in {s.w for s in plan.rows + plan.cols}:
                for j in users.setdefault(w, []):
                    conflict.add_edge(i, j)
                users[w].append(i)
        self.colours = _colour_classes(conflict)
        self.depth_weights = self._depths()
        self._variables()

    def _variables(self):
        """Global numbering of the balanced variables and, per weight, the variable of each row and column."""
        self.offsets = np.cumsum([0] + [plan.width for plan in self.plans])
        self.rvars = [np.full(lay.blocks * lay.rows, -1) for lay in self.weights]
        self.cvars = [np.full(lay.blocks * lay.cols, -1) for lay in self.weights]
        for off, plan in zip(self.offsets, self.plans):
            for sides, out in ((plan.rows, self.rvars), (plan.cols, self.cvars)):
                for s in sides:
                    out[s.w][s.pos.numpy()] = s.var.numpy() + off
        self._structural = None  # live variables when every entry is nonzero, the usual case

    def _fixed(self, E) -> list[torch.Tensor]:
        """Per plan, its variables that no nonzero path from the input to the output crosses."""
        fulls = [enorm_reach.positive_blocks(e, lay.blocks) for e, lay in zip(E, self.weights)]
        shapes = [(lay.blocks, lay.rows, lay.cols) for lay in self.weights]
        if all(f.all() for f in fulls):
            if self._structural is None:
                self._structural = enorm_reach.live(int(self.offsets[-1]), shapes, self.rvars, self.cvars, E, fulls)
            live = self._structural
        else:
            live = enorm_reach.live(int(self.offsets[-1]), shapes, self.rvars, self.cvars, E, fulls)
        return [torch.as_tensor(~live[a:b]) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    # -- construction
    def _add_weight(self, name, bias, kind, conv_groups):
        if name in self.index:
            if bias is not None:
                self.weights[self.index[name]].bias = bias
            return
        if name not in self.params:
            raise InputError(f"parameter '{name}' of the groups is not a parameter of the model")
        shape = tuple(self.params[name].shape)
        if kind == "affine":
            blocks, rows, cols = shape[0], 1, 1
        else:
            blocks = conv_groups if kind == "conv" else 1
            rows, cols = shape[0] // blocks, shape[1]
        self.index[name] = len(self.weights)
        self.weights.append(_Weight(name, bias, kind, shape, blocks, rows, cols))

    def _plan(self, g) -> _Plan:
        rows, cols = [], []
        row_var, col_var = {}, {}
        for p in g.producers:
            row_var[self.index[p.weight]] = v = np.asarray(p.out_vars)
            rows.append(_side(self.index[p.weight], v, g.width))
        for c in g.consumers:
            col_var[self.index[c.weight]] = v = np.asarray(c.in_vars)
            cols.append(_side(self.index[c.weight], v, g.width))
        masks, pairs = {}, nx.Graph()
        for w in row_var.keys() & col_var.keys():  # a layer both producing and consuming this group
            lay = self.weights[w]
            chan = in_channel_index(lay.kind, lay.shape[:1] if lay.kind == "affine" else lay.shape[:2], lay.blocks)
            a = np.broadcast_to(row_var[w].reshape(-1, *([1] * (chan.ndim - 1))), chan.shape)
            b = col_var[w][chan]
            same = (a >= 0) & (a == b)
            masks[w] = torch.as_tensor(same.reshape(lay.blocks, lay.rows, lay.cols).copy())
            coupled = (a >= 0) & (b >= 0) & (a != b)
            pairs.add_edges_from(zip(a[coupled].tolist(), b[coupled].tolist()))
        classes = None
        if pairs.number_of_edges():
            pairs.add_nodes_from(range(g.width))
            classes = [_long(sorted(c)) for c in _colour_classes(pairs)]
        return _Plan(g.id, g.width, rows, cols, masks, classes)

    def _depths(self):
        """Per-weight depth when every group has producers at one depth and consumers one deeper, else None."""
        graph = nx.DiGraph()
        graph.add_nodes_from(range(len(self.weights)))
        for plan in self.plans:
            for pr in plan.rows:
                for co in plan.cols:
                    graph.add_edge(pr.w, co.w)
        depth = {}
        for comp in nx.weakly_connected_components(graph):
            start = min(comp)
            depth[start] = 0
            und = graph.subgraph(comp).to_undirected(as_view=True)
            for u, v in nx.bfs_edges(und, start):
                depth[v] = depth[u] + (1 if graph.has_edge(u, v) else -1)
            if any(depth[v] != depth[u] + 1 for u, v in graph.subgraph(comp).edges):
                return None
            top = max(depth[n] for n in comp)
            for n in comp:
                depth[n] -= top  # the deepest layer gets weight 1, as in the paper
        return [depth[i] for i in range(len(self.weights))]

    # -- one run
    @torch.no_grad()
    def start(self, p: float, dtype=None, lazy_from: int | None = None) -> State:
        """Energies of the current weights; raises NonFiniteError naming a parameter with NaN/Inf.

        ``lazy_from``: an ungrouped kernel-less weight (linear, 1×1 conv) with at least this many
        entries keeps no energy matrix (as large as the weight itself) but is re-read in chunks
        whenever a sum needs it; the weights must then stay unchanged until ``apply``.
        """
        masked_w = {w for plan in self.plans for w in plan.self_masks}
        E = []
        for i, lay in enumerate(self.weights):
            w = self.params[lay.name].detach()
            taps = w[0, 0].numel() if w.dim() > 2 else 1
            if lazy_from is not None and w.numel() >= lazy_from and taps == 1 and lay.blocks == 1 \
                    and lay.kind != "affine" and i not in masked_w:
                E.append(_Powers(w.reshape(lay.rows, lay.cols), p, dtype or w.dtype))
                continue
            w = w if dtype is None or w.dtype == dtype else w.to(dtype)
            if taps > 1 and p == 2 and kernels.usable(w):
                e = kernels.energy(w, taps)
            elif taps > 1 and p == 2:  # one batched dot per (row, column): ATen's fastest reduction over a few taps
                v = w.reshape(-1, 1, taps)
                e = torch.bmm(v, v.transpose(1, 2))
            elif taps > 1:  # a fused norm over the kernel: no |w|^p temporary
                e = torch.linalg.vector_norm(w, p, dim=tuple(range(2, w.dim()))).pow_(p)
            else:
                e = w.square() if p == 2 else w.abs().pow(p)
            E.append(e.reshape(lay.blocks, lay.rows, lay.cols))
        totals = torch.stack([e.sum() for e in E]) if E else torch.zeros(0, dtype=dtype or torch.float64)
        if not bool(torch.isfinite(totals).all()):
            for lay, t in zip(self.weights, totals.tolist()):
                if not np.isfinite(t):
                    w = self.params[lay.name]
                    what = "holds NaN or Inf" if not bool(torch.isfinite(w).all()) else \
                        f"overflows when raised to the power p={p} (use float64 or a smaller p)"
                    raise NonFiniteError(f"parameter '{lay.name}' {what}: cannot balance")
        masked = {(i, w): E[w].masked_fill(m, 0) for i, plan in enumerate(self.plans)
                  for w, m in plan.self_masks.items()}
        ones = lambda n, e: torch.ones(n, dtype=e.dtype)  # noqa: E731
        r = [ones(lay.blocks * lay.rows, e) for lay, e in zip(self.weights, E)]
        k = [ones(lay.blocks * lay.cols, e) for lay, e in zip(self.weights, E)]
        return State(E, masked, r, k, totals, self._fixed(E))

    @staticmethod
    def _powers(st: State, w: int, p: float):
        r, k = st.r[w], st.k[w]
        return (r.square(), k.square().reciprocal()) if p == 2 else (r.pow(p), k.pow(-p))

    def _sums(self, st: State, i: int, plan: _Plan, p: float):
        dtype = st.E[0].dtype
        L = torch.zeros(plan.width, dtype=dtype)
        R = torch.zeros(plan.width, dtype=dtype)
        for s in plan.rows:
            row = self._row_sums(st, s.w, p, st.masked.get((i, s.w)))
            if s.identity:
                L.add_(row)
            else:
                L.index_add_(0, s.var, row[s.pos])
        for s in plan.cols:
            lay, E = self.weights[s.w], st.masked.get((i, s.w), st.E[s.w])
            rp, kp = self._powers(st, s.w, p)
            if lay.blocks == 1:
                col = _mv(E, rp, transpose=True).mul_(kp)
            else:
                col = torch.matmul(rp.view(lay.blocks, 1, lay.rows), E).view(-1).mul_(kp)
            if s.identity:
                R.add_(col)
            else:
                R.index_add_(0, s.var, col[s.pos])
        return L, R

    def _row_sums(self, st: State, w: int, p: float, E=None) -> torch.Tensor:
        lay, E = self.weights[w], st.E[w] if E is None else E
        rp, kp = self._powers(st, w, p)
        if lay.blocks == 1:
            return _mv(E, kp).mul_(rp)
        return torch.matmul(E, kp.view(lay.blocks, lay.cols, 1)).view(-1).mul_(rp)

    def _factors(self, L, R, p, c, fixed, only=None):
        dead = (L <= 0) | (R <= 0) | fixed
        d = (R / L).pow_(1 / (2 * p))  # R/L of a dead channel is never used
        d = torch.where(dead, 1.0, d if c == 1 else d.div_(c))
        if only is not None:
            keep = torch.zeros_like(dead)
            keep[only] = True
            d = torch.where(keep, d, torch.ones_like(d))
            dead = dead & keep
        return d, dead

    def _scale(self, st: State, plan: _Plan, d: torch.Tensor):
        for s, vec in [(s, st.r[s.w]) for s in plan.rows] + [(s, st.k[s.w]) for s in plan.cols]:
            if s.identity:
                vec.mul_(d)
            else:
                vec[s.pos] *= d[s.var]

    @torch.no_grad()
    def cycle(self, st: State, p: float, c: float = 1.0) -> None:
        """One ENorm cycle on the state: every balanced group once, colour class by colour class."""
        for colour in self.colours:
            steps = []
            for i in colour:  # groups of one colour share no weight: compute all, then apply all
                plan = self.plans[i]
                if plan.classes is None:
                    steps.append((i, self._factors(*self._sums(st, i, plan, p), p, c, st.fixed[i])))
                    continue
                for vars_ in plan.classes:  # variables sharing an entry go one after another
                    d, dead = self._factors(*self._sums(st, i, plan, p), p, c, st.fixed[i], only=vars_)
                    self._record(st, plan, d, dead)
            for i, (d, dead) in steps:
                self._record(st, self.plans[i], d, dead)

    def _record(self, st, plan, d, dead):
        self._scale(st, plan, d)
        st.factors[plan.gid] = st.factors[plan.gid] * d if plan.gid in st.factors else d
        st.dead[plan.gid] = st.dead[plan.gid] | dead if plan.gid in st.dead else dead

    @torch.no_grad()
    def row_energies(self, st: State, p: float) -> list[torch.Tensor]:
        """Current Σ|w|^p of every row (output unit) of every weight."""
        return [self._row_sums(st, w, p) for w in range(len(self.weights))]

    def objective(self, rows: list[torch.Tensor], c: float = 1.0, p: float = 2.0):
        """(Σ|w|^p over every weight, the depth-weighted objective of the asymmetric variant or None)."""
        per_layer = torch.stack([r.sum() for r in rows]).double() if rows else torch.zeros(0, dtype=torch.float64)
        total = float(per_layer.sum())
        if c == 1.0 or self.depth_weights is None:
            return total, None
        scale = torch.tensor([c ** (-2 * p * dpt) for dpt in self.depth_weights], dtype=torch.float64)
        return total, float((scale * per_layer).sum())

    @torch.no_grad()
    def apply(self, st: State, states=None) -> None:
        """Write the accumulated factors into the weights (rows and bias × r, columns ÷ k).

        ``states(name)`` lists (tensor, power) of optimizer state to rescale as F**power, F being the
        weight's factor: gradient-like buffers have power -1, squared-gradient ones -2.
        """
        for w, lay in enumerate(self.weights):
            weight = self.params[lay.name]
            _rescale(weight, lay, st.r[w], st.k[w], 1)
            for t, power in (states(lay.name) if states else ()):
                _rescale(t, lay, st.r[w], st.k[w], power)
            if lay.bias is not None:
                bias = self.params[lay.bias]
                bias.mul_(st.r[w].to(bias.dtype))
                for t, power in (states(lay.bias) if states else ()):
                    t.mul_(st.r[w].to(t.dtype).pow(power))


class _Powers:
    """|w|^p of a large 2-D weight, never stored whole: summed straight from the weight by the
    compiled loops (p = 2 in the weight's dtype), else computed a block of rows at a time."""

    def __init__(self, w: torch.Tensor, p: float, dtype: torch.dtype):
        self.w, self.p, self.dtype = w, p, dtype
        self.fast = p == 2 and w.dtype == dtype and kernels.usable(w)
        self.zeros: int | None = None  # entries equal to 0, once ``sum`` has counted them

    def blocks(self):
        step = max(1, (1 << 18) // max(1, self.w.shape[1]))
        for s in range(0, self.w.shape[0], step):
            c = self.w[s:s + step].to(self.dtype)
            yield s, (c.square() if self.p == 2 else c.abs().pow(self.p))

    def mv(self, vec: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if self.fast:
            return (kernels.colsq if transpose else kernels.rowsq)(self.w, vec.contiguous())
        if not transpose:
            return torch.cat([torch.mv(e, vec) for _, e in self.blocks()])
        out = torch.zeros(self.w.shape[1], dtype=self.dtype)
        for s, e in self.blocks():
            out.addmv_(e.t(), vec[s:s + len(e)])
        return out

    def sum(self) -> torch.Tensor:
        if self.fast:
            total, self.zeros = kernels.sumsq(self.w)
            return torch.tensor(total, dtype=self.dtype)
        return torch.stack([e.sum() for _, e in self.blocks()]).sum()

    def all_nonzero(self) -> bool:
        return (self.zeros if self.zeros is not None else self.w.numel() - int(torch.count_nonzero(self.w))) == 0


def _mv(E, vec: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Row sums (or column sums) of an ungrouped energy matrix, weighted by ``vec``."""
    if isinstance(E, _Powers):
        return E.mv(vec, transpose)
    return torch.mv(E[0].t() if transpose else E[0], vec)


def _rescale(t: torch.Tensor, lay: _Weight, r: torch.Tensor, k: torch.Tensor, power: int) -> None:
    """t × (r_row / k_column)**power: one pass of the compiled loop, or else (an ungrouped layer)
    two ATen passes with long contiguous runs (rows by a scalar each, columns by k repeated over
    the kernel taps): several times faster on a CPU than one pass broadcasting a factor over runs
    as short as a 3 × 3 kernel."""
    if lay.kind != "affine" and kernels.usable(t):
        v = t.view(lay.shape[0], -1)
        cols = k.to(t.dtype).pow(-power)
        kernels.scale(v, r.to(t.dtype).pow(power), cols.repeat_interleave(v.shape[1] // lay.cols), lay.blocks)
        return
    if lay.blocks == 1 and lay.kind != "affine" and t.is_contiguous():
        v = t.view(lay.shape[0], -1)
        cols = k.to(t.dtype).pow(-power)
        v.mul_(cols.repeat_interleave(v.shape[1] // lay.cols) if v.shape[1] > lay.cols else cols)
        v.mul_(r.to(t.dtype).pow(power).view(-1, 1))
        return
    F = (r.view(lay.blocks, lay.rows, 1) / k.view(lay.blocks, 1, lay.cols)).reshape(lay.view)
    t.mul_(F.to(t.dtype).pow(power) if power != 1 else F.to(t.dtype))


# -- the pass ------------------------------------------------------------------------------------

# Linear and 1×1-conv weights from this size on keep no float64 energy matrix during ``balance``
# (it would be as large as the weight, twice the bytes of a float32 one): on a large model the
# pass then needs little more memory than the weights it balances.
LAZY_FROM = 1 << 20


def check_options(p: float, c: float, cycles=None, tol=None) -> None:
    if not (isinstance(p, (int, float)) and p > 0 and np.isfinite(p)):
        raise InputError(f"p must be a positive number, got {p!r}")
    if not (isinstance(c, (int, float)) and c > 0 and np.isfinite(c)):
        raise InputError(f"c must be a positive number, got {c!r}")
    if cycles is not None and (not isinstance(cycles, int) or cycles < 0):
        raise InputError(f"cycles must be a non-negative integer, got {cycles!r}")
    if tol is not None and not tol >= 0:
        raise InputError(f"tol must be >= 0, got {tol!r}")


@torch.no_grad()
def balance(module: torch.nn.Module, groups: RescalingGroups, p: float = 2, c: float = 1.0, cycles: int | None = None,
            tol: float = 1e-6, select=None, max_cycles: int = 10_000) -> ENormReport:
    """Balance ``module``'s weights in place over ``groups`` (param names as in ``groups.module``).

    ``cycles`` given: exactly that many cycles. Otherwise cycles run until the relative decrease
    of the objective in one cycle is ≤ ``tol`` (at most ``max_cycles``). The factors are
    accumulated in float64 and written into the weights once at the end.
    """
    check_options(p, c, cycles, tol)
    params = dict(module.named_parameters())
    for name, t in params.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"parameter '{name}' holds NaN or Inf: cannot balance")
    bal = Balancer(groups, params, select)
    st = bal.start(p, dtype=torch.float64, lazy_from=LAZY_FROM)
    rows0 = bal.row_energies(st, p)
    obj, wobj = bal.objective(rows0, c, p)
    objective, weighted = [obj], ([wobj] if wobj is not None else None)
    limit = cycles if cycles is not None else max_cycles
    done, converged = 0, False
    while done < limit:
        bal.cycle(st, p, c)
        done += 1
        rows = bal.row_energies(st, p)
        obj, wobj = bal.objective(rows, c, p)
        objective.append(obj)
        if weighted is not None:
            weighted.append(wobj)
        if cycles is None and objective[-2] - obj <= tol * abs(objective[-2]):
            converged = True
            break
    rows = bal.row_energies(st, p)
    bal.apply(st)
    layers = [LayerEnergy(lay.name, float(a.sum()), float(b.sum()), a.tolist(), b.tolist())
              for lay, a, b in zip(bal.weights, rows0, rows)]
    dead = [DeadChannels(gid, torch.nonzero(m).view(-1).tolist()) for gid, m in st.dead.items() if bool(m.any())]
    return ENormReport(p=float(p), c=float(c), tol=None if cycles is not None else tol, cycles=done,
                       converged=converged, objective=objective, weighted_objective=weighted, layers=layers,
                       groups=[plan.gid for plan in bal.plans],
                       colours=[[bal.plans[i].gid for i in col] for col in bal.colours], dead=dead)
