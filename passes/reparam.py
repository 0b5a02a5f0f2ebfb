"""Path reparameterization: red (skeleton) weights, scale solve, basis values (DESIGN §3).

Works on the rescaling groups of a BN-folded, eval-mode GraphModule.

Red weights. A *selected* group is one the policy reparameterizes ("per-block": every group
except residual streams, tagged identity-skip / learned-skip; "global": all). Unselected
groups and frozen channels keep factor 1 and act as sinks. The distance d(G) of a selected
group is 1 + the smallest distance of the output of one of its consumers (sinks are 0). The red weight of variable k is chosen in a consumer Q with d(out(Q)) < d(G): this
is what forbids a cycle through a residual stream (a block's first conv feeds the block,
whose last conv feeds the stream back), so under "global" a stream's red weights sit in the
next stage's downsample conv or in the classifier. Among eligible consumers the closest to
the output comes first, then graph order. The entry is the generalized diagonal
Q[o, c mod cin_g, centre] with c the input channel of k (for a flattened input the middle
feature of k's features), o = c mod C_out inside c's conv group; when that entry is 0, the
largest entry of the column (all rows of the group, all taps). A variable whose columns are
zero in every eligible consumer is dead: factor 1, no red weight.

Scale solve. In increasing d: s_k = |Q[red]| · s_o (s_o: factor of Q's output row, already
solved because its group is closer to the output, 1 for sinks). Rows × s, columns ÷ s makes
every red entry exactly its sign.

Affine consumers (BatchNorms that do not follow a layer) never carry red weights: a
BatchNorm in training mode normalises its input scale away, so a constant ±1 there would
be meaningless. Variables consumed only by such layers stay in weight space (DenseNet's
concatenated features).

Basis values. b_k is the path value of the skeleton path into k, read from k's first
producer at its entry [row, row mod cin_g, centre]: b_k = b_src if that entry is the red
weight of its source variable, else |v| of that entry (v = u · b of the entry's column; 1
for a column that is not a reparameterized variable). If that entry is 0, the largest
non-red entry of the row; if the producer is an affine (a BatchNorm in the path model) or
the row is zero, b_k = 1. A basis is therefore always one trainable path value (or 1), so
the runtime reads it as |V| of a single entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .fold_bn import LAYERS, ChannelAffine
from .groupset import Consumer, RescalingGroups, apply_factors, in_channel_index
from .modules import float64_copy

STREAM_TAGS = ("identity-skip", "learned-skip")
POLICIES = ("per-block", "global")
ONE = None  # basis value 1: the column is not a reparameterized variable


@dataclass
class ReparamPlan:
    """What the runtime needs: factors, red entries and basis references."""
    selected: list[int]
    factors: dict[int, np.ndarray]
    reds: dict[tuple[int, int], tuple[str, tuple]]  # (gid, var) -> (weight name, index)
    basis: dict[tuple[int, int], tuple[str, int] | None]  # (gid, var) -> (weight, flat index) or ONE
    dead: list[tuple[int, int]] = field(default_factory=list)
    weight_space: dict[str, int] = field(default_factory=dict)  # reason -> variables kept
    distance: dict[int, int] = field(default_factory=dict)


def _centre(shape) -> tuple:
    return tuple(s // 2 for s in shape[2:])


SHARED_BN = "a layer of the group feeds a BatchNorm and other nodes (the BN is folded into a copy)"
OUT_OF_RANGE = "path values would leave"  # how the reasons of ``solve``'s range cuts begin


def select_groups(groups: RescalingGroups, policy: str, module,
                  avoid: frozenset = frozenset()) -> tuple[list[int], dict[str, int]]:
    """Groups the policy reparameterizes; every group whose layers are not conv/linear/affine
    modules, or touch a layer named in ``avoid``, is left out."""
    from .errors import InputError
    if policy not in POLICIES:
        raise InputError(f"unknown policy '{policy}': expected one of {', '.join(POLICIES)}")
    modules = dict(module.named_modules())
    kept, out = {}, []
    for g in groups.groups:
        layers = [p.weight for p in g.producers] + [c.weight for c in g.consumers]
        if any(w.rpartition(".")[0] in avoid for w in layers):
            reason = SHARED_BN
        elif policy == "per-block" and any(t in g.tags for t in STREAM_TAGS):
            reason = "residual stream (policy per-block)"
        elif any(type(modules.get(w.rpartition(".")[0])) not in LAYERS + (ChannelAffine,)
                 or w.rpartition(".")[2] != "weight" for w in layers):
            reason = "a layer of the group is not a conv/linear module (functional conv/linear)"
        else:
            out.append(g.id)
            continue
        kept[reason] = kept.get(reason, 0) + g.width
    return out, kept


class _Solver:
    def __init__(self, groups: RescalingGroups, selected, weights: dict[str, np.ndarray]):
        self.groups = {g.id: g for g in groups.groups}
        self.selected = set(selected)
        self.w = weights
        self.prod = {}  # weight -> (gid, out_vars)
        self.cons = {}  # weight -> [(gid, Consumer)]
        for g in groups.groups:
            for p in g.producers:
                self.prod[p.weight] = (g.id, np.asarray(p.out_vars))
            for c in g.consumers:
                self.cons.setdefault(c.weight, []).append((g.id, c))
        order = {}
        for g in groups.groups:
            for c in g.consumers:
                order.setdefault(c.weight, len(order))
        self.order = order

    def out_group(self, weight):
        gid, _ = self.prod.get(weight, (None, None))
        return gid if gid in self.selected else None

    def distances(self) -> dict[int, int]:
        d = {gid: np.inf for gid in self.selected}
        for _ in range(len(d) + 1):
            changed = False
            for gid in self.selected:
                best = min((0 if self.out_group(c.weight) is None else d[self.out_group(c.weight)]
                            for c in self.groups[gid].consumers), default=np.inf)
                if best + 1 < d[gid]:
                    d[gid], changed = best + 1, True
            if not changed:
                break
        return d

    def red_entry(self, c: Consumer, channels: list[int]):
        """Generalized-diagonal entry of the variable reading ``channels`` of consumer ``c``, or None."""
        w = self.w[c.weight]
        ch = channels[len(channels) // 2]
        if c.kind == "linear":
            o, col, rows = ch % w.shape[0], ch, np.arange(w.shape[0])
        else:
            cin_g, cout_g = w.shape[1], w.shape[0] // c.conv_groups
            gi = ch // cin_g
            o, col = gi * cout_g + ch % cout_g, ch % cin_g
            rows = np.arange(gi * cout_g, (gi + 1) * cout_g)
        idx = (o, col) + _centre(w.shape)
        if w[idx] != 0:
            return idx
        block = np.abs(w[rows][:, col])  # (rows, *taps)
        if not block.any():
            return None
        flat = np.unravel_index(int(np.argmax(block)), block.shape)
        return (int(rows[flat[0]]), col) + tuple(int(i) for i in flat[1:])

    def solve(self) -> ReparamPlan:
        dist = self.distances()
        plan = ReparamPlan(selected=[g for g in sorted(self.selected) if np.isfinite(dist[g])], factors={},
                           reds={}, basis={}, distance={g: int(d) for g, d in dist.items() if np.isfinite(d)})
        for gid in sorted(plan.selected, key=lambda g: dist[g]):
            g = self.groups[gid]
            eligible = sorted(
                [c for c in g.consumers if c.kind != "affine" and
                 (0 if self.out_group(c.weight) is None else dist[self.out_group(c.weight)]) < dist[gid]],
                key=lambda c: (0 if self.out_group(c.weight) is None else dist[self.out_group(c.weight)],
                               self.order[c.weight]))
            columns = []
            for c in eligible:
                pos: dict[int, list[int]] = {}
                for ch, v in enumerate(c.in_vars):
                    if v >= 0:
                        pos.setdefault(v, []).append(ch)
                columns.append(pos)
            f = np.ones(g.width)
            for k in range(g.width):
                for c, pos in zip(eligible, columns):
                    idx = self.red_entry(c, pos[k]) if k in pos else None
                    if idx is None:
                        continue
                    f[k] = abs(self.w[c.weight][idx]) * self.row_factor(plan, c.weight, idx[0])
                    plan.reds[(gid, k)] = (c.weight, idx)
                    break
                else:
                    plan.dead.append((gid, k))
            plan.factors[gid] = f
        return plan

    def row_factor(self, plan, weight, row) -> float:
        gid, out_vars = self.prod.get(weight, (None, None))
        if gid is None or gid not in plan.factors or out_vars[row] < 0:
            return 1.0
        return float(plan.factors[gid][out_vars[row]])

    def row_factors(self, plan, weight, rows: int) -> torch.Tensor:
        """The rescaling factor of each output channel of ``weight`` (1 outside the selected groups)."""
        gid, out_vars = self.prod.get(weight, (None, None))
        out = torch.ones(rows, dtype=torch.float64)
        if gid in plan.factors:
            v = torch.as_tensor(out_vars)
            out[v >= 0] = torch.as_tensor(plan.factors[gid], dtype=torch.float64)[v[v >= 0]]
        return out

    def column_factors(self, plan, weight, channels: int) -> torch.Tensor:
        """The rescaling factor of each input channel (feature) of ``weight``."""
        out = torch.ones(channels, dtype=torch.float64)
        for gid, c in self.cons.get(weight, []):
            if gid in plan.factors:
                v = torch.as_tensor(c.in_vars)
                out[v >= 0] = torch.as_tensor(plan.factors[gid], dtype=torch.float64)[v[v >= 0]]
        return out

    # -- basis values on the reparameterized weights
    def column_var(self, weight, ch) -> tuple[int, int] | None:
        for gid, c in self.cons.get(weight, []):
            if gid in self.selected and c.in_vars[ch] >= 0:
                return gid, c.in_vars[ch]
        return None

    def bases(self, plan: ReparamPlan) -> None:
        """Fill ``plan.basis`` for every variable of the selected groups (on the rescaled weights)."""
        self._red_at = {(w, idx): key for key, (w, idx) in plan.reds.items()}
        self._red_in_row: dict[tuple[str, int], list] = {}
        for (rw, ridx) in self._red_at:
            self._red_in_row.setdefault((rw, ridx[0]), []).append(ridx[1:])
        self._first_row: dict[int, dict] = {}  # gid -> {variable: (first producer writing it, its first row)}
        self._basis: dict = {}
        self._values: dict = {}
        for gid in plan.selected:
            for k in range(self.groups[gid].width):
                plan.basis[(gid, k)] = self._basis_of((gid, k))

    def value_of_ref(self, ref) -> float:
        """The path value |v| of a basis reference (weight, flat index): |u| times its column's basis."""
        w = self.w[ref[0]]
        return abs(w.reshape(-1)[ref[1]]) * self._col_value(ref[0], np.unravel_index(ref[1], w.shape))

    def _producer_row(self, gid, k):
        if gid not in self._first_row:
            rows: dict = {}
            for p in self.groups[gid].producers:
                for r, v in enumerate(p.out_vars):
                    rows.setdefault(v, (p, r))
            self._first_row[gid] = rows
        return self._first_row[gid][k]

    def _entry_channel(self, weight, idx) -> int:
        w = self.w[weight]
        if w.ndim <= 2:
            return int(idx[-1] if w.ndim == 2 else idx[0])
        groups = next((c.conv_groups for _, c in self.cons.get(weight, [])), 1)
        return int((idx[0] // (w.shape[0] // groups)) * w.shape[1] + idx[1])

    def _col_value(self, weight, idx) -> float:
        key = self.column_var(weight, self._entry_channel(weight, idx))
        return 1.0 if key is None else self._value(key)

    def _value(self, key) -> float:
        if key not in self._values:
            ref = self._basis_of(key)
            self._values[key] = 1.0 if ref is None else self.value_of_ref(ref)
        return self._values[key]

    def _basis_of(self, key):
        if key in self._basis:
            return self._basis[key]
        gid, k = key
        p, row = self._producer_row(gid, k)
        w = self.w[p.weight]
        ref = None
        if p.kind != "affine":
            idx = (row, row % w.shape[1]) + _centre(w.shape)
            src = self._red_at.get((p.weight, idx))
            if src is not None:
                ref = self._basis_of(src)
            elif w[idx] != 0 and self._col_value(p.weight, idx) > 0:
                ref = (p.weight, int(np.ravel_multi_index(idx, w.shape)))
            else:  # the largest non-red entry of the row
                mag = np.abs(w[row]).copy()
                for rest in self._red_in_row.get((p.weight, row), ()):
                    mag[rest] = 0
                if mag.any():
                    j = np.unravel_index(int(np.argmax(mag)), mag.shape)
                    ref = (p.weight, int(np.ravel_multi_index((row,) + tuple(j), w.shape)))
        self._basis[key] = ref
        return ref


def reds_by_weight(entries) -> dict[str, tuple]:
    """{weight: index tuple of LongTensors} for an iterable of (weight, entry index) pairs."""
    out: dict[str, list] = {}
    for weight, idx in entries:
        out.setdefault(weight, []).append(idx)
    return {w: tuple(torch.as_tensor(np.asarray(c, dtype=np.int64)) for c in zip(*idx)) for w, idx in out.items()}


def _attempt(groups: RescalingGroups, selected: list[int], kept: dict[str, int]):
    module = float64_copy(groups.source)  # source is read only; this copy is the one rescaled
    weights = {n: p.detach().numpy() for n, p in module.named_parameters()}
    solver = _Solver(groups, selected, weights)
    plan = solver.solve()
    plan.weight_space = dict(kept)
    lost = sorted(set(selected) - set(plan.selected))
    if lost:
        plan.weight_space["no path to the output"] = \
            sum(solver.groups[g].width for g in lost)
    solver.selected = set(plan.selected)
    apply_factors(module, groups, {g: plan.factors[g] for g in plan.selected})
    params = dict(module.named_parameters())
    for weight, idx in reds_by_weight(plan.reds.values()).items():  # exact ±1, not 1 ± an ulp
        w = params[weight]
        w[idx] = torch.sign(w[idx])
    solver.w = {n: p.detach().numpy() for n, p in module.named_parameters()}
    solver.bases(plan)
    return plan, module, solver


def _magnitudes(plan: ReparamPlan, module, solver) -> np.ndarray:
    """Every nonzero magnitude the path model holds or computes with: the factors (hidden
    activations scale by them), the rescaled weights, biases and affines, the basis values and
    the path values V = |u| · b(column) of every layer of a reparameterized group."""
    out = [np.abs(f) for f in plan.factors.values()]
    value = {key: 1.0 if ref is None else solver.value_of_ref(ref) for key, ref in plan.basis.items()}
    out.append(np.fromiter(value.values(), dtype=np.float64, count=len(value)))
    layers = {lay.weight: (lay.kind, lay) for gid in plan.selected for lay in
              [*solver.groups[gid].producers, *solver.groups[gid].consumers]}
    params = dict(module.named_parameters())
    for weight, (kind, _) in layers.items():
        u = np.abs(solver.w[weight])
        bias = params.get(weight.rpartition(".")[0] + ".bias")
        if bias is not None:
            out.append(np.abs(bias.detach().numpy()))
        if kind == "affine" or u.ndim < 2:
            out.append(u)
            continue
        groups = next((c.conv_groups for _, c in solver.cons.get(weight, [])), 1)
        ch = in_channel_index("conv", u.shape[:2], groups) if u.ndim > 2 else np.arange(u.shape[1])[None, :]
        keys = [solver.column_var(weight, int(c)) for c in range(int(ch.max()) + 1)]
        b = np.array([1.0 if k is None else value.get(k, 1.0) for k in keys])[ch]
        out.append((u * b.reshape(b.shape + (1,) * (u.ndim - 2))).ravel())
    flat = np.concatenate([o.ravel() for o in out]) if out else np.zeros(0)
    return flat[flat > 0]


def in_range(plan: ReparamPlan, module, solver, dtype: torch.dtype) -> bool:
    """Do the path model's values, and the product of any two of them, fit ``dtype`` with a margin of 2^10 at
    both ends? Training multiplies them in pairs: the gradient through u = V / b carries 1 / b, the units
    of a converted layer (passes.pathnn) multiply by a factor and divide by another."""
    info = torch.finfo(dtype)
    mags = _magnitudes(plan, module, solver)
    return not mags.size or (mags.min() >= (info.tiny * 2 ** 10) ** 0.5 and mags.max() <= (info.max * 2 ** -10) ** 0.5)


@torch.no_grad()
def solve(groups: RescalingGroups, policy: str = "per-block", value_dtype: torch.dtype | None = None,
          avoid: frozenset = frozenset()):
    """(plan, reparameterized float64 copy of ``groups.module``, basis-value function).

    ``value_dtype``: the dtype the path model will run in. Path values are products of weights
    along whole paths and hidden activations scale by products of red weights, so on a deep
    network they leave even float32's range; then every k-th selected group by distance to the
    output (k = 32, 16, …, 1, the largest that fits) stays in weight space, which restarts those
    products there.
    """
    selected, kept = select_groups(groups, policy, groups.source, avoid)
    plan, module, solver = _attempt(groups, selected, kept)
    if value_dtype is None or value_dtype == torch.float64 or in_range(plan, module, solver, value_dtype):
        return plan, module, solver
    dist = plan.distance
    k = 1 << int(np.log2(max(dist.values(), default=1)))
    while True:
        cut = [g for g in selected if dist.get(g, 0) % k == 0]
        reason = f"{OUT_OF_RANGE} {str(value_dtype).replace('torch.', '')}'s range " \
                 f"(every {k}{'st' if k == 1 else 'th'} group by distance to the output)"
        plan, module, solver = _attempt(groups, [g for g in selected if g not in cut],
                                        {**kept, reason: sum(solver.groups[g].width for g in cut)})
        if k == 1 or in_range(plan, module, solver, value_dtype):
            return plan, module, solver
        k //= 2
