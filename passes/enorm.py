"""Equi-normalization (ENorm): the function-preserving rescaling of minimal weight p-norm (DESIGN §2).

Objective. Let W be the set of weight tensors of every layer that is a producer or a
consumer of *any* group of the ``RescalingGroups`` (biases excluded). For 1 ≤ p < ∞ ENorm
minimises ``Σ_{w ∈ W} Σ_entries |w|^p`` over the factors of the free variables of the balanced
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

Numbers (``enorm_numbers``). At p = 2 the energies Σ_taps w² and the factors are plain numbers
(the fast path of training, with the compiled loops of ``kernels``) while they stay in the range
where squares lose nothing (checked at the start and after every cycle; a cycle that leaves it
is run again from its start in the log domain). Every other p, and p = 2 outside that range,
works in the log domain: log energies, log-sum-exps, log factors,
``log d_s = (log R_s - log L_s) / 2p``, so p = 1, 64, 1000 are as exact as p = 2.

p = ∞. L_s and R_s become the largest |w| over the same rows and columns, and the update
``d_s = (R_s/L_s)^(1/2)`` gives the channel equal largest incoming and outgoing weights,
sqrt(L_s R_s) (on a conv pair this is torch.ao's cross-layer equalization with max|w| as the
range, see README). What it minimises: the vector of every |w| entry of W sorted in decreasing
order, compared lexicographically; its first term is max|w|, the range of per-tensor
quantization. With the rest fixed, the entries that depend on s are its rows (× t, largest L_s)
and its columns (÷ t, largest R_s); the largest of them, max(L_s t, R_s / t), is smallest only
at t = (R_s/L_s)^(1/2), so that t is the exact lexicographic minimiser over those entries. The
update never makes the whole vector larger: for multisets X, Y, Z, if sorted(Y) ≤ sorted(X)
lexicographically then sorted(Y ∪ Z) ≤ sorted(X ∪ Z) (scanning values from the top, the first
value at or above which X and Y have different counts has more of X, and adding Z adds the same
count to both), and the entries Z that do not depend on s stay as they are. So max|w| never
rises; it is what the report records per cycle (``moved`` shows the progress below it). Sums of
maxima are not monotone under this update (per layer or per channel: a channel with L_s = 1,
R_s = 4 doubles its producer rows, which can raise the maxima of the producer layer and of the
channels those rows read by more than R_s falls), so they are not the objective. Coordinate
descent on a max has no general convergence theorem: ``converged`` says whether a run reached
the fixed point below.

Asymmetric variant (paper §3.7, in the authors' released code's convention): with R and L the
norms (p-th roots of the sums above; the largest |w| at p = ∞) the factor is
``d_s = (R / (L·c))^(1/2)``, c under the root, i.e. ``d_s = (R_s/L_s)^(1/2p) · c^(-1/2)``, the
exact minimiser of ``c^p L_s t^p + R_s t^-p`` (at p = ∞ of ``max(c L_s t, R_s / t)``). On a
layered network (every group's producers at one depth k, its consumers at k+1) this is
coordinate descent on ``Σ_k c^(p(q-k)) ||W_k||_p^p`` (q = last depth; at p = ∞ the largest
``c^(q-k) |w|`` over W_k and k, lexicographically as above): c > 1 moves energy toward the
output. Skip connections make that depth assignment inconsistent; the update then still
preserves the function but minimises no single global objective, and ``weighted_objective``
is None.

Convergence: a fixed point. After each cycle the pass measures how far the cycle moved the
weights, the largest |log(new / old)| over every entry of a balanced weight (row o, column i:
d_o / d_i) and bias (d_o), and stops at the first cycle that moved nothing by more than
``tol``. Re-running ENorm on that result continues from the same point with the same cycle, and
near the fixed point each cycle moves less than the one before (linear convergence: about ×0.93
per cycle on resnet18), so the re-run stops after one cycle having changed no weight by more
than ``tol`` (relative). The default ``tol = 1e-6`` therefore makes a balanced model a fixed
point to 1e-6: balancing it again at the default tolerance moves no weight or bias by more than
1e-6 of itself. A ``tol`` below ``ROUNDING`` (1e-12) counts as ``ROUNDING``: at the fixed point
the computed factors still differ from 1 by rounding, of order 1e-15 (measured on the tests'
chains and MLP at every p; resnet18 reaches 1e-12 at p = 2, 4, ∞).

Dead variables keep factor 1: no path of nonzero weights leads from the input through the
variable to the output (``enorm_reach``, on which weights are exactly zero); along a set of
such variables the objective has no minimum. Every other variable has L_s, R_s > 0. A
non-finite weight, energy or objective is an error (NonFiniteError naming the parameter),
never convergence.

Work is done on the small per-(row, column) energy matrices ``E[o, i] = Σ_kernel |w[o, i]|^p``
(or their logs) with per-row and per-column factor vectors, so a cycle reads each weight once
and writes it once (``Balancer.apply``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch

from . import enorm_reach, kernels
from .enorm_numbers import (INF, LazyLogs, LazySquares, energy_window, factor_window, log_energy, log_scatter, log_sum,
                            mv, power, rescale, rescale_log, work, work_dtype)
from .enorm_report import DeadChannels, ENormReport, LayerEnergy, exp
from .errors import InputError, NonFiniteError
from .finite import is_finite
from .groupset import RescalingGroups, in_channel_index

# Convergence: the largest relative change of a weight or bias in the last cycle (see above).
DEFAULT_TOL = 1e-6
ROUNDING = 1e-12


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
    def taps(self) -> int:  # kernel entries per (row, column)
        return math.prod(self.shape[2:]) if self.kind != "affine" else 1

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
    """Energies at the start of a run and the factors accumulated since.

    Plain (p = 2): E = Σ_taps w², r and k the row and column factors; E·r²/k² is the current
    energy. Log domain (``log``): E = log Σ_taps |w|^p (p = ∞: log max_taps |w|), r and k the
    logs of the factors; E + q·(r - k) is the current log energy (``power``)."""

    E: list  # per weight (blocks, rows, cols), or a lazy weight (LazySquares, LazyLogs)
    masked: dict[tuple[int, int], torch.Tensor]  # (group, weight) -> E without invariant entries
    r: list[torch.Tensor]
    k: list[torch.Tensor]
    p: float
    log: bool
    log_total: float  # log of the objective at the start
    fixed: list[torch.Tensor] = field(default_factory=list)  # per plan: variables cut off from input or output
    dtype: torch.dtype | None = None  # as given to ``start``
    lazy_from: int | None = None
    factors: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> product of its d
    dead: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        """Σ|w|^p (p = ∞: max|w|) over the weights at the start; inf past float64's range."""
        return exp(self.log_total)


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
        self._segments()

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

    def _segments(self):
        """What ``moved`` reduces over: for every row and every column of every weight (concatenated
        in weight order) the number of its block among all blocks, and which rows carry a bias."""
        rseg, kseg, biased, start = [], [], [], 0
        for lay in self.weights:
            block = torch.arange(start, start + lay.blocks)
            rseg.append(block.repeat_interleave(lay.rows))
            kseg.append(block.repeat_interleave(lay.cols))
            biased.append(torch.full((lay.blocks * lay.rows,), lay.bias is not None))
            start += lay.blocks
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
        self.rseg, self.kseg = cat(rseg, torch.long), cat(kseg, torch.long)
        self.biased, self.nseg = cat(biased, torch.bool), start

    def _fixed(self, supports, fulls) -> list[torch.Tensor]:
        """Per plan, its variables that no nonzero path from the input to the output crosses.
        ``supports``: per weight, positive exactly at its nonzero kernels (enorm_reach);
        ``fulls``: their ``enorm_reach.positive_blocks``, None when every block is all nonzero."""
        shapes = [(lay.blocks, lay.rows, lay.cols) for lay in self.weights]
        if fulls is None:
            if self._structural is None:
                full = [np.ones(lay.blocks, dtype=bool) for lay in self.weights]
                self._structural = enorm_reach.live(int(self.offsets[-1]), shapes, self.rvars, self.cvars, supports,
                                                    full)
            live = self._structural
        else:
            live = enorm_reach.live(int(self.offsets[-1]), shapes, self.rvars, self.cvars, supports, fulls)
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
        p = exponent(p)
        st = self._start_squares(dtype, lazy_from) if p == 2 else None
        return st if st is not None else self._start_log(p, dtype, lazy_from)

    def _lazy(self, i: int, w: torch.Tensor, lazy_from) -> bool:
        lay = self.weights[i]
        return lazy_from is not None and w.numel() >= lazy_from and lay.taps == 1 and lay.blocks == 1 \
            and lay.kind != "affine" and all(i not in plan.self_masks for plan in self.plans)

    def _start_squares(self, dtype, lazy_from) -> State | None:
        """The p = 2 state of plain numbers, or None when an energy is outside ``energy_window``."""
        E, mins = [], []
        for i, lay in enumerate(self.weights):
            w = self.params[lay.name].detach()
            if self._lazy(i, w, lazy_from):
                E.append(LazySquares(w.reshape(lay.rows, lay.cols), work_dtype(w, dtype)))
                continue
            w, taps = work(w, dtype), lay.taps
            if taps > 1 and kernels.usable(w):
                e = kernels.energy(w, taps)
            elif taps > 1:  # one batched dot per (row, column): ATen's fastest reduction over a few taps
                v = w.reshape(-1, 1, taps)
                e = torch.bmm(v, v.transpose(1, 2))
            else:
                e = w.square()
            E.append(e.reshape(lay.blocks, lay.rows, lay.cols))
            mins.append(E[-1].reshape(lay.blocks, -1).amin(1))
        totals = torch.stack([e.sum() for e in E]).double() if E else torch.zeros(0, dtype=torch.float64)
        total = float(totals.sum())
        if not math.isfinite(total):
            self._check_weights()
        lo, hi = energy_window(min((e.dtype for e in E), key=lambda t: torch.finfo(t).max, default=torch.float64))
        if not total <= hi:
            return None
        fulls = None  # the usual case: every kernel nonzero, every energy in the window
        if (float(torch.cat(mins).min()) if mins else INF) < lo or \
                any(isinstance(e, LazySquares) and not e.all_nonzero() for e in E):
            fulls, supports = self._square_supports(E, lo)
            if supports is None:
                return None
        if any(isinstance(e, LazySquares) and e.smallest() ** 2 < lo for e in E):
            return None
        ones = lambda n, e: torch.ones(n, dtype=e.dtype)  # noqa: E731
        return State(E, self._masked(E, 0.0), [ones(lay.blocks * lay.rows, e) for lay, e in zip(self.weights, E)],
                     [ones(lay.blocks * lay.cols, e) for lay, e in zip(self.weights, E)], 2.0, False,
                     math.log(total) if total > 0 else -INF, self._fixed(E if fulls is None else supports, fulls),
                     dtype, lazy_from)

    def _square_supports(self, E, lo: float):
        """(``positive_blocks`` per weight, supports) when some energies are 0, from the weights
        themselves, since a square can underflow to 0; (None, None) when a nonzero kernel has an
        energy below ``lo``."""
        fulls, supports = [], []
        for lay, e in zip(self.weights, E):
            full = enorm_reach.positive_blocks(e, lay.blocks)
            support = e if full.all() or isinstance(e, LazySquares) else self._nonzero(lay)
            if not isinstance(e, LazySquares) and bool(((e < lo) & (support > 0)).any()):
                return None, None
            fulls.append(full)
            supports.append(support)
        return fulls, supports

    def _start_log(self, p: float, dtype, lazy_from) -> State:
        E = self._log_energies(p, dtype, lazy_from)
        totals = [log_sum(self._log_rows_of(e, p, None, None), 0, p).double() for e in E]
        total = float(log_sum(torch.stack(totals), 0, p)) if E else -INF
        if math.isnan(total) or total == INF:
            self._check_weights()
        supports = [e if isinstance(e, LazyLogs) else e > -INF for e in E]
        fulls = [enorm_reach.positive_blocks(s, lay.blocks) for s, lay in zip(supports, self.weights)]
        zeros = lambda n, e: torch.zeros(n, dtype=e.dtype)  # noqa: E731
        return State(E, self._masked(E, -INF), [zeros(lay.blocks * lay.rows, e) for lay, e in zip(self.weights, E)],
                     [zeros(lay.blocks * lay.cols, e) for lay, e in zip(self.weights, E)], p, True, total,
                     self._fixed(supports, None if all(f.all() for f in fulls) else fulls), dtype, lazy_from)

    def _log_energies(self, p: float, dtype, lazy_from) -> list:
        E = []
        for i, lay in enumerate(self.weights):
            w = self.params[lay.name].detach()
            if self._lazy(i, w, lazy_from):
                E.append(LazyLogs(w.reshape(lay.rows, lay.cols), p, work_dtype(w, dtype)))
                continue
            w = work(w, dtype)
            E.append(log_energy(w, p, lay.taps).reshape(lay.blocks, lay.rows, lay.cols))
        return E

    def _masked(self, E, fill: float) -> dict:
        return {(i, w): E[w].masked_fill(m, fill) for i, plan in enumerate(self.plans) for w, m in plan.self_masks.items()}

    def _nonzero(self, lay: _Weight) -> torch.Tensor:
        """(blocks, rows, cols): which kernels of the weight hold a nonzero entry."""
        return self.params[lay.name].detach().reshape(lay.blocks, lay.rows, lay.cols, -1).ne(0).any(-1)

    def _check_weights(self) -> None:
        for lay in self.weights:
            for name in (lay.name, lay.bias):
                if name is not None and not is_finite(self.params[name]):
                    raise NonFiniteError(f"parameter '{name}' holds NaN or Inf: cannot balance")

    @torch.no_grad()
    def to_log(self, st: State) -> None:
        """Continue ``st`` in the log domain with the factors it has accumulated (the weights are
        those of ``start``: ``apply`` has not run)."""
        if st.log:
            return
        st.E = self._log_energies(st.p, st.dtype, st.lazy_from)
        st.masked = self._masked(st.E, -INF)
        st.r, st.k = [r.log() for r in st.r], [k.log() for k in st.k]
        st.log = True

    def in_window(self, st: State) -> bool:
        """Whether the factors of a plain state are all within ``factor_window``."""
        if st.log or not st.r:
            return True
        lo, hi = torch.aminmax(torch.cat(st.r + st.k))
        low, high = factor_window(lo.dtype)
        return bool(lo >= low) and bool(hi <= high)

    # -- sums over rows and columns
    def _sums(self, st: State, i: int, plan: _Plan):
        if st.log:
            return self._log_sums(st, i, plan)
        dtype = st.r[0].dtype
        L = torch.zeros(plan.width, dtype=dtype)
        R = torch.zeros(plan.width, dtype=dtype)
        for s in plan.rows:
            row = self._row_sums(st, s.w, st.masked.get((i, s.w)))
            if s.identity:
                L.add_(row)
            else:
                L.index_add_(0, s.var, row[s.pos])
        for s in plan.cols:
            lay, E = self.weights[s.w], st.masked.get((i, s.w), st.E[s.w])
            rp, kp = st.r[s.w].square(), st.k[s.w].square().reciprocal()
            if lay.blocks == 1:
                col = mv(E, rp, transpose=True).mul_(kp)
            else:
                col = torch.matmul(rp.view(lay.blocks, 1, lay.rows), E).view(-1).mul_(kp)
            if s.identity:
                R.add_(col)
            else:
                R.index_add_(0, s.var, col[s.pos])
        return L, R

    def _row_sums(self, st: State, w: int, E=None) -> torch.Tensor:
        lay, E = self.weights[w], st.E[w] if E is None else E
        rp, kp = st.r[w].square(), st.k[w].square().reciprocal()
        if lay.blocks == 1:
            return mv(E, kp).mul_(rp)
        return torch.matmul(E, kp.view(lay.blocks, lay.cols, 1)).view(-1).mul_(rp)

    def _log_rows_of(self, E, p: float, r, k) -> torch.Tensor:
        """Per row of one weight: log of its current energy (r, k: log factors, None for none)."""
        q = power(p)
        if isinstance(E, LazyLogs):
            out = E.rows(torch.zeros(E.w.shape[1], dtype=E.dtype) if k is None else -q * k)
        else:
            x = E if k is None else E - q * k.view(E.shape[0], 1, E.shape[2])
            out = log_sum(x, 2, p).view(-1)
        return out if r is None else out + q * r

    def _log_cols_of(self, E, p: float, r, k) -> torch.Tensor:
        q = power(p)
        if isinstance(E, LazyLogs):
            return E.cols(q * r) - q * k
        return log_sum(E + q * r.view(E.shape[0], E.shape[1], 1), 1, p).view(-1) - q * k

    def _log_sums(self, st: State, i: int, plan: _Plan):
        out = []
        for sides, of in ((plan.rows, self._log_rows_of), (plan.cols, self._log_cols_of)):
            vals, idx = [], []
            for s in sides:
                v = of(st.masked.get((i, s.w), st.E[s.w]), st.p, st.r[s.w], st.k[s.w])
                vals.append(v if s.identity else v[s.pos])
                idx.append(s.var)
            out.append(log_scatter(vals, idx, plan.width, st.p) if vals else
                       torch.full((plan.width,), -INF, dtype=st.r[0].dtype))
        return out

    # -- factors
    def _factors(self, st: State, L, R, c, fixed, only=None):
        """(d, dead) for one step: d the factors (their logs in the log domain), 1 (0) where dead."""
        if st.log:
            dead = fixed | (L == -INF) | (R == -INF)
            d = (R - L).div_(2 * power(st.p))
            if c != 1:
                d.sub_(0.5 * math.log(c))
            d.masked_fill_(dead, 0.0)
            neutral = 0.0
        else:
            d = (R / L).pow_(0.25)  # a live variable has L, R > 0 (module docstring)
            if c != 1:
                d.div_(math.sqrt(c))
            d = torch.where(fixed, 1.0, d)
            dead, neutral = fixed, 1.0
        if only is not None:
            keep = torch.zeros_like(dead)
            keep[only] = True
            d = torch.where(keep, d, torch.full_like(d, neutral))
            dead = dead & keep
        return d, dead

    def _scale(self, st: State, plan: _Plan, d: torch.Tensor):
        for s, vec in [(s, st.r[s.w]) for s in plan.rows] + [(s, st.k[s.w]) for s in plan.cols]:
            if s.identity:
                vec.add_(d) if st.log else vec.mul_(d)
            elif st.log:
                vec[s.pos] += d[s.var]
            else:
                vec[s.pos] *= d[s.var]

    @torch.no_grad()
    def cycle(self, st: State, p: float, c: float = 1.0) -> None:
        """One ENorm cycle on the state: every balanced group once, colour class by colour class.

        A plain state whose factors leave ``factor_window`` in this cycle (its squares may then
        have left float range) goes back to where the cycle began, moves to the log domain and
        runs the cycle there."""
        if exponent(p) != st.p:
            raise InputError(f"the state was started with p={st.p:g}, not p={p!r}")
        if not st.log:
            saved = (torch.cat(st.r), torch.cat(st.k), dict(st.factors), dict(st.dead)) if st.r else None
            self._cycle(st, c)
            if self.in_window(st):
                return
            r, k, st.factors, st.dead = saved
            st.r = list(r.split([len(v) for v in st.r]))
            st.k = list(k.split([len(v) for v in st.k]))
            self.to_log(st)
        self._cycle(st, c)

    def _cycle(self, st: State, c: float) -> None:
        for colour in self.colours:
            steps = []
            for i in colour:  # groups of one colour share no weight: compute all, then apply all
                plan = self.plans[i]
                if plan.classes is None:
                    steps.append((i, self._factors(st, *self._sums(st, i, plan), c, st.fixed[i])))
                    continue
                for vars_ in plan.classes:  # variables sharing an entry go one after another
                    d, dead = self._factors(st, *self._sums(st, i, plan), c, st.fixed[i], only=vars_)
                    self._record(st, plan, d, dead)
            for i, (d, dead) in steps:
                self._record(st, self.plans[i], d, dead)

    def _record(self, st, plan, d, dead):
        self._scale(st, plan, d)
        f = d.exp() if st.log else d
        st.factors[plan.gid] = st.factors[plan.gid] * f if plan.gid in st.factors else f
        st.dead[plan.gid] = st.dead[plan.gid] | dead if plan.gid in st.dead else dead

    # -- what a run reports
    @torch.no_grad()
    def row_logs(self, st: State) -> list[torch.Tensor]:
        """Log of the current energy of every row (output unit) of every weight."""
        if not st.log:
            return [self._row_sums(st, w).log() for w in range(len(self.weights))]
        return [self._log_rows_of(E, st.p, r, k) for E, r, k in zip(st.E, st.r, st.k)]

    def log_objective(self, rows: list[torch.Tensor], p: float, c: float = 1.0) -> tuple[float, float | None]:
        """(log of Σ|w|^p over every weight — p = ∞: of max|w| —, log of the depth-weighted
        objective of the asymmetric variant or None) from ``row_logs``."""
        if not rows:
            return -INF, None
        per_layer = torch.stack([log_sum(r, 0, p).double() for r in rows])
        total = float(log_sum(per_layer, 0, p))
        if c == 1.0 or self.depth_weights is None:
            return total, None
        q = power(p)
        shift = torch.tensor([-q * dpt * math.log(c) for dpt in self.depth_weights], dtype=per_layer.dtype)
        return total, float(log_sum(per_layer + shift, 0, p))

    def log_factors(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The logs of the row and of the column factors of every weight, concatenated."""
        if not self.weights:
            return torch.zeros(0), torch.zeros(0)
        r, k = torch.cat(st.r), torch.cat(st.k)
        return (r, k) if st.log else (r.log(), k.log())

    def moved(self, before, after) -> float:
        """The largest |log(new/old)| over every weight entry (row o, column i of one block:
        Δ log r_o - Δ log k_i) and bias entry (Δ log r_o) between two ``log_factors``."""
        if not self.weights:
            return 0.0
        dr, dk = after[0] - before[0], after[1] - before[1]
        ext = lambda v, seg, how: torch.full((self.nseg,), -how * INF, dtype=v.dtype).scatter_reduce_(  # noqa: E731
            0, seg, v, "amax" if how > 0 else "amin")
        rmax, rmin, kmax, kmin = ext(dr, self.rseg, 1), ext(dr, self.rseg, -1), ext(dk, self.kseg, 1), ext(dk, self.kseg, -1)
        worst = torch.maximum(rmax - kmin, kmax - rmin).max()
        if bool(self.biased.any()):
            worst = torch.maximum(worst, dr[self.biased].abs().max())
        return float(worst)

    @torch.no_grad()
    def apply(self, st: State, states=None) -> None:
        """Write the accumulated factors into the weights (rows and bias × r, columns ÷ k).

        ``states(name)`` lists (tensor, power) of optimizer state to rescale as F**power, F being the
        weight's factor: gradient-like buffers have power -1, squared-gradient ones -2.
        """
        scale = rescale_log if st.log else rescale
        for w, lay in enumerate(self.weights):
            weight = self.params[lay.name]
            scale(weight, lay, st.r[w], st.k[w], 1)
            for t, n in (states(lay.name) if states else ()):
                scale(t, lay, st.r[w], st.k[w], n)
            if lay.bias is not None:
                bias, r = self.params[lay.bias], st.r[w]
                bias.mul_((r.exp() if st.log else r).to(bias.dtype))
                for t, n in (states(lay.bias) if states else ()):
                    t.mul_((r.mul(n).exp() if st.log else r.pow(n)).to(t.dtype))


# -- the pass ------------------------------------------------------------------------------------

# Linear and 1×1-conv weights from this size on keep no float64 energy matrix during ``balance``
# (it would be as large as the weight, twice the bytes of a float32 one): on a large model the
# pass then needs little more memory than the weights it balances.
LAZY_FROM = 1 << 20


def exponent(p) -> float:
    """ENorm's p as a float: a number ≥ 1, or p = ∞ as float('inf') or the string "inf"."""
    if isinstance(p, str) and p.strip().lower() in ("inf", "infinity", "∞"):
        return INF
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p >= 1:
        raise InputError(f"p must be a number ≥ 1 or float('inf') (ENorm balances the p-norm of the weights), "
                         f"got {p!r}")
    return float(p)


def check_options(p, c: float, cycles=None, tol=None) -> float:
    """Refuse options ENorm cannot take; returns p as a float (``exponent``)."""
    p = exponent(p)
    if isinstance(c, bool) or not (isinstance(c, numbers.Real) and c > 0 and math.isfinite(c)):
        raise InputError(f"c must be a positive number, got {c!r}")
    if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0):
        raise InputError(f"cycles must be a non-negative integer, got {cycles!r}")
    if tol is not None and not tol >= 0:
        raise InputError(f"tol must be >= 0, got {tol!r}")
    return p


def _check_rows(bal: Balancer, rows: list[torch.Tensor], cycle: int) -> None:
    """Log energies are finite or −∞ (a zero row); NaN or +∞ is an error naming the weight."""
    if not rows or float(torch.cat(rows).nan_to_num(nan=INF, posinf=INF).max()) < INF:
        return
    for lay, r in zip(bal.weights, rows):
        if bool(torch.isnan(r).any()) or bool((r == INF).any()):
            raise NonFiniteError(f"parameter '{lay.name}': its energy is not finite after ENorm cycle {cycle}")


@torch.no_grad()
def balance(module: torch.nn.Module, groups: RescalingGroups, p: float = 2, c: float = 1.0, cycles: int | None = None,
            tol: float = DEFAULT_TOL, select=None, max_cycles: int = 10_000) -> ENormReport:
    """Balance ``module``'s weights in place over ``groups`` (param names as in ``groups.module``).

    ``p``: any number ≥ 1, or float('inf') (also "inf"). ``cycles`` given: exactly that many
    cycles. Otherwise cycles run until one moves no weight or bias by more than ``tol`` (as
    |log(new/old)|; at most ``max_cycles``): the default 1e-6 leaves a model that balancing again
    at the default tolerance changes by at most 1e-6 relative (module docstring). ``converged``
    says whether the last cycle met that criterion, also when ``cycles`` fixed their number.
    The factors are accumulated in float64 and written into the weights once at the end.
    """
    p = check_options(p, c, cycles, tol)
    params = dict(module.named_parameters())
    for name, t in params.items():
        if not is_finite(t):
            raise NonFiniteError(f"parameter '{name}' holds NaN or Inf: cannot balance")
    bal = Balancer(groups, params, select)
    st = bal.start(p, dtype=torch.float64, lazy_from=LAZY_FROM)
    rows = rows0 = bal.row_logs(st)
    obj, wobj = bal.log_objective(rows0, p, c)
    objective, weighted, moved = [obj], ([wobj] if wobj is not None else None), []
    limit = cycles if cycles is not None else max_cycles
    stop = max(tol, ROUNDING)
    while len(moved) < limit:
        before = bal.log_factors(st)
        bal.cycle(st, p, c)
        rows = bal.row_logs(st)
        _check_rows(bal, rows, len(moved) + 1)
        obj, wobj = bal.log_objective(rows, p, c)
        objective.append(obj)
        if weighted is not None:
            weighted.append(wobj)
        moved.append(bal.moved(before, bal.log_factors(st)))
        if cycles is None and moved[-1] <= stop:
            break
    bal.apply(st)
    for lay in bal.weights:
        for name in (lay.name, lay.bias):
            if name is not None and not is_finite(params[name]):
                raise NonFiniteError(f"parameter '{name}' is not finite after ENorm (p={p:g}): its balanced "
                                     "values leave the range of its dtype")
    layers = [LayerEnergy(lay.name, exp(lb), exp(la), a.exp().tolist(), b.exp().tolist(), lb, la)
              for lay, a, b in zip(bal.weights, rows0, rows)
              for lb, la in [(float(log_sum(a, 0, p)), float(log_sum(b, 0, p)))]]
    dead = [DeadChannels(gid, torch.nonzero(m).view(-1).tolist()) for gid, m in st.dead.items() if bool(m.any())]
    return ENormReport(p=p, c=float(c), tol=stop, cycles=len(moved), converged=bool(moved) and moved[-1] <= stop,
                       objective=[exp(x) for x in objective], log_objective=objective, moved=moved,
                       weighted_objective=None if weighted is None else [exp(x) for x in weighted],
                       log_weighted_objective=weighted, layers=layers, groups=[plan.gid for plan in bal.plans],
                       colours=[[bal.plans[i].gid for i in col] for col in bal.colours], dead=dead)
