"""The path model: a traced network rewritten in path coordinates, with P-BN (DESIGN §3).

Route (the path pipeline of ``passes.manager``). The model is traced once with its BatchNorms
(eval mode). A BN-folded graph over the same leaves gives the rescaling groups and, through
``passes.reparam``, the reparameterized folded weights u (layers keep their names when folded in
place, so names match). ``build`` turns the unfolded trace into the path model:

- every conv/linear of a reparameterized group replaced by a ``PathLayer`` holding V = u · b;
- every BatchNorm that was folded into such a layer re-set so that its eval map is
  x + folded bias (running mean 0, running var 1, γ = sqrt(1 + eps)), the layer carrying
  the folded weight; with ``pbn=True`` a layer that carries red weights and such a BN become
  one ``PBN`` (λ = 1); every other BN keeps ordinary batch normalization;
- every BatchNorm that acts as a diagonal layer in the analysis (not after a layer)
  re-set to the rescaled affine map.

``fuse_pbn`` then fuses each path layer that carries red weights with its BatchNorm into one P-BN.
The eval-mode output then equals the original model's (``init="preserve"``). ``init="paper"``
re-initializes every path layer for training from scratch: He normal u, times 0.1 off the
red entries (red = ±1), biases 0, γ = 1, β = 0, fresh running statistics, λ = 0.1 when the
model has residual streams, else 1. Layers outside the reparameterized groups keep their
weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError
from .fold_bn import BATCHNORMS, ChannelAffine, FoldReport
from .groupset import RescalingGroups, in_channel_index
from .modules import model_dtype
from .pathnn import PathLayer
from .pbn import insert_pbn
from .reparam import STREAM_TAGS, reds_by_weight, solve

INITS = ("preserve", "paper")


@dataclass
class ReparamReport:
    policy: str
    pbn: bool
    init: str
    groups: int  # rescaling groups found
    reparameterized_groups: list[int]
    variables: int  # free variables reparameterized
    red_weights: int
    no_red: int  # variables with no red weight (dead, or consumed only by BatchNorms)
    weight_space: dict[str, int]  # variables kept in weight space, by reason
    path_layers: list[str] = field(default_factory=list)
    pbn_layers: list[str] = field(default_factory=list)
    bn_layers: list[str] = field(default_factory=list)  # BatchNorms kept as ordinary BN and re-set
    lam: float = 1.0
    max_rel_error: float | None = None  # eval-mode output vs the original (float64), preserve only

    def __str__(self) -> str:
        kept = ", ".join(f"{n} ({r})" for r, n in self.weight_space.items()) or "none"
        err = "n/a" if self.max_rel_error is None else f"{self.max_rel_error:.2e}"
        return (f"path reparameterization ({self.policy}, init {self.init}, P-BN {'on' if self.pbn else 'off'}): "
                f"{len(self.reparameterized_groups)}/{self.groups} groups, {self.variables} variables, "
                f"{self.red_weights} red weights, {self.no_red} without red weight; kept in weight space: {kept}\n"
                f"{len(self.path_layers)} path layers, {len(self.pbn_layers)} P-BN, {len(self.bn_layers)} BN re-set, "
                f"lambda {self.lam}; eval output rel. error {err}")


@torch.no_grad()
def bn_scale(bn: nn.Module) -> torch.Tensor:
    """The per-channel scale of an eval-mode BatchNorm (or of the affine a frozen one became), float64."""
    if isinstance(bn, ChannelAffine):
        return bn.weight.detach().double()
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    return a * bn.weight.detach().double() if bn.weight is not None else a


def _slots(solver, plan, weight: str, shape, groups: int):
    """Per (row, column) basis references of a layer, as (slot tensor, [(source weight, flat indices)])."""
    if len(shape) == 2:
        ch = np.arange(shape[1])[None, :]
    else:
        ch = in_channel_index("conv", shape[:2], groups)
        if groups == 1:
            ch = ch[:1]
    refs: dict[int, tuple] = {}
    for c in np.unique(ch):
        key = solver.column_var(weight, int(c))
        refs[int(c)] = plan.basis.get(key) if key is not None else None
    sources: dict[str, list[int]] = {}
    slot_of: dict[tuple, int] = {}
    for ref in refs.values():
        if ref is not None and ref not in slot_of:
            sources.setdefault(ref[0], []).append(ref[1])
    base = 1
    for w, idx in sources.items():
        for i in idx:
            slot_of[(w, i)] = base
            base += 1
    slot = np.vectorize(lambda c: 0 if refs[int(c)] is None else slot_of[refs[int(c)]])(ch)
    return torch.as_tensor(slot, dtype=torch.long), [(w, torch.tensor(i, dtype=torch.long))
                                                      for w, i in sources.items()]


def build(gm: fx.GraphModule, groups: RescalingGroups, fold_report: FoldReport, policy: str = "per-block",
          init: str = "preserve", value_dtype: torch.dtype | None = None) -> tuple[fx.GraphModule, ReparamReport]:
    """Rewrite ``gm`` — the unfolded, shape-annotated eval-mode trace — in place into the path model.

    ``groups`` and ``fold_report`` are the analysis of its BN-folded graph (over the same leaves).
    ``value_dtype``: the dtype the path model is meant to run in (default: ``gm``'s); groups are
    kept in weight space where path values would leave its range (``passes.reparam.solve``).
    """
    if init not in INITS:
        raise InputError(f"unknown init '{init}': expected one of {', '.join(INITS)}")
    # A layer that feeds a BN and other nodes exists twice in the analysis (as it is, and folded
    # into a copy) but once in the model: the groups of both stay in weight space.
    modules = dict(gm.named_modules())
    avoid = frozenset(fold_report.copied) | {name for name, _ in fold_report.folded if name not in modules}
    dtype = model_dtype(gm)
    # "paper" sets fresh path values: only the converted ones of "preserve" can leave the range
    plan, rmod, solver = solve(groups, policy, value_dtype=(value_dtype or dtype) if init == "preserve" else None,
                               avoid=avoid)
    bn_after = {layer: bn for layer, bn in fold_report.folded}
    sel = [g for g in groups.groups if g.id in plan.selected]
    layer_names, affine_names = [], set()
    for g in sel:
        for lay in [p for p in g.producers] + [c for c in g.consumers]:
            name = lay.weight.rpartition(".")[0]
            if lay.kind == "affine":
                affine_names.add(name)
            elif name not in layer_names:
                layer_names.append(name)
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    layer_names.sort(key=lambda n: order.get(n, 0))
    report = ReparamReport(policy=policy, pbn=False, init=init, groups=len(groups.groups),
                           reparameterized_groups=list(plan.selected),
                           variables=sum(g.width for g in sel), red_weights=len(plan.reds),
                           no_red=len(plan.dead), weight_space=plan.weight_space)
    rparams = dict(rmod.named_parameters())
    reds_of = reds_by_weight(plan.reds.values())
    paths: dict[str, PathLayer] = {}
    links = {}
    with torch.no_grad():
        for name in layer_names:
            weight = f"{name}.weight"
            u = rparams[weight].detach()
            old = modules[name]
            slot, sources = _slots(solver, plan, weight, tuple(u.shape), getattr(old, "groups", 1))
            bvals = torch.tensor([1.0] + [solver.value_of_ref((w, int(i))) for w, idx in sources for i in idx],
                                 dtype=torch.float64)
            red = torch.zeros_like(u)
            if weight in reds_of:
                red[reds_of[weight]] = u[reds_of[weight]]
            # the weight is replaced by V (not copied); the bias stays in the network's units
            base = copy.deepcopy(old, {id(old.weight): None})
            out_scale = solver.row_factors(plan, weight, u.shape[0])
            if name in bn_after:  # the BatchNorm folded into u stays a module of its own, as it was
                a = bn_scale(modules[bn_after[name]])
                # a channel the BatchNorm zeroes (γ = 0) has zero rows in u: its rows keep the folded units
                out_scale = out_scale * torch.where(a != 0, a, torch.ones_like(a))
                report.bn_layers.append(bn_after[name])
            in_scale = solver.column_factors(plan, weight, u.shape[1] * getattr(old, "groups", 1))
            if base.bias is not None:  # the layer's own bias, in the path form's units (the BN keeps its shift)
                base.bias = nn.Parameter(base.bias.detach() * out_scale.to(base.bias))
            v = u * bvals[slot.reshape(slot.shape + (1,) * (u.dim() - slot.dim()))]
            layer = PathLayer(base, v.to(dtype), red.to(dtype), slot, in_scale=in_scale, out_scale=out_scale)
            paths[name] = layer
            links[name] = sources
            gm.set_submodule(name, layer)
        report.bn_layers += sorted(affine_names)
    for name, sources in links.items():
        paths[name].link([(paths[w.rpartition(".")[0]], idx) for w, idx in sources])
    report.path_layers = list(layer_names)
    has_streams = any(t in g.tags for g in groups.groups for t in STREAM_TAGS)
    report.lam = 0.1 if init == "paper" and has_streams else 1.0
    if init == "paper":
        _paper_init(gm, paths)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report


def fuse_pbn(gm: fx.GraphModule, report: ReparamReport, fold_report: FoldReport) -> list[tuple[str, str]]:
    """In place: every path layer with red weights and the BatchNorm after it become one P-BN;
    returns the fused (layer, BatchNorm) pairs and updates ``report``."""
    paths = {n: m for n, m in gm.named_modules() if isinstance(m, PathLayer)}
    # the analysis folded each BN into the layer before it: those (layer, BN) pairs are P-BN candidates
    bn_after = {layer: bn for layer, bn in fold_report.folded if bn in report.bn_layers}
    modules = dict(gm.named_modules())
    # a converted layer's red term keeps the scale the folded BatchNorm gave it; a fresh one has none
    red_scale = {} if report.init == "paper" else {layer: bn_scale(modules[bn]) for layer, bn in bn_after.items()}
    fused = insert_pbn(gm, paths, bn_after, lam=report.lam, red_scale=red_scale)
    gm.delete_all_unused_submodules()
    gm.recompile()
    report.pbn = True
    report.pbn_layers = [layer for layer, _ in fused]
    report.bn_layers = [b for b in report.bn_layers if b not in {bn for _, bn in fused}]
    return fused


# pathfx's choice for init="paper" (the papers say only "small random values", pbn §5.2 and D.3): the
# off-red entries of a layer with red weights are He-normal (std sqrt(2 / fan_in)) times this factor.
# With it the σ that P-BN normalises rises with depth and passes 1 within the first third of a 50-layer
# stack (pbn §5.2's observation; 0.1 never reaches 1 there); docs/experiments.md §2 shows the curve.
OFFDIAG_SCALE = 0.3


@torch.no_grad()
def _paper_init(gm: fx.GraphModule, paths) -> None:
    """Fresh weights for training from scratch (pbn §5.2, D.3; Thm 3.1 assumes positive diagonals):
    every red (diagonal) weight +1, so the red term carries the activation forward unchanged; the other
    entries of a layer with red weights He-normal times OFFDIAG_SCALE; a layer without red weights
    (the first) He-normal; biases 0; BN γ = 1, β = 0, fresh statistics. Entries whose |V| is a
    downstream basis value are +1: were they small random values too, the bases would shrink
    geometrically along the skeleton and the gradients w.r.t. V (∝ 1/b) explode. So every basis value
    is 1 and u = V at the start.
    The rescaled model's own weights are no starting point: the scale solve multiplies each layer's
    rows by products of red weights along the path to the output, vanishing in a deep net."""
    sources = {id(layer): torch.zeros(layer.V.numel(), dtype=torch.bool) for layer in paths.values()}
    for layer in paths.values():
        for i, src in enumerate(layer.sources):
            sources[id(src)][layer.source_index(i)] = True
    for layer in paths.values():  # graph order: upstream bases are final first
        layer.in_scale.fill_(1.0)  # fresh weights in fresh units
        layer.out_scale.fill_(1.0)
        layer.set_red(layer.red.abs())
        fan_in = layer.red[0].numel()
        u = torch.randn_like(layer.V) * math.sqrt(2.0 / fan_in) * (OFFDIAG_SCALE if layer.has_red else 1.0)
        is_source = sources[id(layer)].view_as(u)
        u = torch.where(is_source, torch.ones_like(u), u)
        layer.V.copy_(u * layer.basis()[layer.col_slot] * layer.free)
        if layer.bias is not None:
            layer.bias.zero_()
    for m in gm.modules():
        if isinstance(m, BATCHNORMS):
            m.reset_parameters()
