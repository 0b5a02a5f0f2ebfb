"""ENorm during training (ENorm paper Alg. 2): one balancing cycle after optimizer steps, and the
plans' optimizer, whose step ends with that cycle.

The cycle runs in place on the live model, and the optimizer state follows the weights into
the new parameterisation. With W̃_k = D_{k-1}^{-1} W_k D_k (paper eq. 2, W_k of shape
n_{k-1} × n_k), gradients transform as ∂L/∂W̃_k = D_{k-1} ∂L/∂W_k D_k^{-1} (paper eq. 10): in
torch's (out, in) layout a row scaled by d has its gradient row divided by d, a column divided
by d has its gradient column multiplied by d. So:

- SGD (with or without momentum, dampening, nesterov, weight decay): ``momentum_buffer``
  transforms like a gradient (rows ÷ d, columns × d; bias ÷ d).
- Adam / AdamW: ``exp_avg`` like a gradient; ``exp_avg_sq`` and ``max_exp_avg_sq`` (amsgrad)
  like a squared gradient (rows ÷ d², columns × d²).

Other optimizers are refused: their state would silently stop matching the weights.
In training mode a BatchNorm is a barrier (DESIGN §1), so groups that exist in eval mode
(BN folded) may be partly or wholly frozen here; ``report.left_out`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from passes.enorm import Balancer, check_options
from passes.errors import InputError
from passes.table import table

from .analysis import find_groups

# optimizer state entry -> power of the weight's factor it is multiplied by
STATE_POWERS = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}
SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class LeftOut:
    group: int  # id in the eval-mode (BN-folded) analysis
    width: int
    free_in_training: int
    first_producer: str
    reason: str


@dataclass
class ENormTrainingReport:
    optimizer: str
    groups: list[int]  # ids (training-mode analysis) balanced every cycle
    num_free: int
    left_out: list[LeftOut] = field(default_factory=list)
    steps: int = 0
    cycles: int = 0
    objective: float | None = None  # Σ|w|^p (p = ∞: max|w|) over the groups' layers before the last cycle
    dead: dict[int, int] = field(default_factory=dict)  # group -> dead variables in the last cycle

    def __str__(self) -> str:
        head = (f"ENorm in training ({self.optimizer}): {len(self.groups)} groups, {self.num_free} free variables; "
                f"{self.cycles} cycles in {self.steps} steps")
        if not self.left_out:
            return head
        rows = [[g.group, g.width, g.free_in_training, g.first_producer, g.reason] for g in self.left_out]
        return head + "\n" + table(["eval group", "width", "free in training", "first producer", "reason"], rows)


def _left_out(model, example_inputs, leaf_modules, train_groups) -> list[LeftOut]:
    """Eval-mode groups whose variables are not (all) free in training mode, and why."""
    eval_groups = find_groups(model, example_inputs, leaf_modules=leaf_modules)
    free_rows = {p.weight: np.asarray(p.out_vars) >= 0 for g in train_groups.groups for p in g.producers}
    bn = [b for b in train_groups.barriers if "BatchNorm" in b.reason]
    reason = f"BatchNorm is a barrier in training ({len(bn)} BatchNorm barriers)" if bn else "frozen in training"
    out = []
    for g in eval_groups.groups:
        free = set()
        for p in g.producers:
            mask = free_rows.get(p.weight)
            if mask is not None and len(mask) == len(p.out_vars):
                free.update(v for v, ok in zip(p.out_vars, mask) if v >= 0 and ok)
        if len(free) < g.width:
            first = g.producers[0].weight if g.producers else "-"
            out.append(LeftOut(g.id, g.width, len(free), first, reason))
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper: the same parameters under
    their own names, and a forward that traces."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class ENorm:
    """``ENorm(model, optimizer, example_inputs).step()`` after each ``optimizer.step()``.

    Under DistributedDataParallel pass the wrapper or its ``.module`` and step on every rank:
    the replicas hold the same weights after each synchronised step, so each computes the same
    factors and they stay identical without communication.

    Every ``every`` steps it runs one ENorm cycle on ``model`` in place (train-mode groups) and
    rescales the optimizer state of every rescaled weight and bias. ``last_factors`` holds the
    last cycle's factor per group variable (``{group id: array}``, as ``passes.groupset.apply_factors`` takes).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs, p: float = 2,
                 c: float = 1.0, every: int = 1, groups=None, leaf_modules="auto"):
        check_options(p, c)
        if not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        if not isinstance(optimizer, SUPPORTED):
            raise InputError(f"ENorm rescales the state of SGD, Adam and AdamW only, not {type(optimizer).__name__}")
        model = unwrap(model)
        self.model, self.optimizer, self.p, self.c, self.every = model, optimizer, p, c, every
        self.groups = find_groups(model, example_inputs, leaf_modules=leaf_modules, train=True)
        self.params = dict(model.named_parameters())
        self.balancer = Balancer(self.groups, self.params, groups)
        selected = {plan.gid for plan in self.balancer.plans}
        self.report = ENormTrainingReport(
            optimizer=type(optimizer).__name__, groups=sorted(selected),
            num_free=sum(g.width for g in self.groups.groups if g.id in selected),
            left_out=_left_out(model, example_inputs, leaf_modules, self.groups))
        self.last_factors: dict[int, np.ndarray] = {}

    def _states(self, name):
        state = self.optimizer.state.get(self.params[name])
        if not state:
            return ()
        return [(t, power) for key, power in STATE_POWERS.items()
                if isinstance(t := state.get(key), torch.Tensor)]

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; run a cycle when it is due. True when a cycle ran."""
        self.report.steps += 1
        if self.report.steps % self.every:
            return False
        bal = self.balancer
        st = bal.start(self.p)
        bal.cycle(st, self.p, self.c)
        bal.apply(st, self._states)
        self.report.cycles += 1
        self.report.objective = st.objective
        self.report.dead = {gid: int(m.sum()) for gid, m in st.dead.items() if bool(m.any())}
        self.last_factors = {gid: d.double().numpy() for gid, d in st.factors.items()}
        return True


class PlanSGD(torch.optim.SGD):
    """SGD whose ``step()`` ends with the plan's step hook: for an ENorm plan, ``hook`` is the
    ``ENorm`` cycle (built from ``enorm``: model, example_inputs, p, c, every), else None.

    ``path_layers``: the PathLayers whose path values V take the *basis-scaled* G-SGD step
    Δv = −lr · (k² · ∂L/∂v + wd · v), with k the scale of v:

    - a path value that is a basis value downstream: k = |v|, a step relative to the value itself (it
      divides a whole column of the next layer; on its own weight's scale, its coupling term
      Σ ∂L/∂w · w / w_src² would explode where that weight is small);
    - any other: k = b · s_out / s_in, b the basis value of v's column and s_out, s_in the layer's units
      (``PathLayer.step_scale``). ∂L/∂v = ∂L/∂w / k for the layer's effective weight w = v / k, so
      G-SGD's own step moves w by lr / k² times SGD's — on a converted model, whose basis values are
      products of weights along skeleton paths (1e-30 and less on a deep plain net), it explodes —
      while this one is SGD's step on w, whatever the bases.

    With every basis value and unit 1 — the papers' initialisation, where the basis entries are 1 — this
    is G-SGD exactly.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, enorm: dict | None = None, path_layers=()):
        self.path_layers = list(path_layers)
        scaled = {id(layer.V) for layer in self.path_layers} | \
            {id(layer.bias) for layer in self.path_layers if layer.bias is not None}
        params = list(params)
        # the path values' weight decay is applied in step(), scaled with their gradient
        groups = [{"params": [p for p in params if id(p) not in scaled]},
                  {"params": [p for p in params if id(p) in scaled], "weight_decay": 0.0}]
        self.path_decay = weight_decay
        super().__init__([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov)
        self.hook = None if enorm is None else ENorm(optimizer=self, **enorm)
        # entries whose |V| is a basis value downstream
        self.sources = {id(layer): torch.zeros_like(layer.V, dtype=torch.bool) for layer in self.path_layers}
        for layer in self.path_layers:
            for i, src in enumerate(layer.sources):
                if id(src) in self.sources:
                    self.sources[id(src)].view(-1)[layer.source_index(i)] = True

    def step(self, closure=None):
        with torch.no_grad():
            for layer in self.path_layers:
                # the decay is added after the scaling: V = k · w entry by entry, so wd · V decays the effective
                # weight w by wd as SGD would; added before, it was scaled by k² too and decayed w by wd · k²
                # (k reaches 1e7 on densenet121's converted dense layers: the first step threw them off)
                g = layer.V.grad
                if g is not None:
                    k = torch.where(self.sources[id(layer)], layer.V.abs(), layer.step_scale())
                    g.mul_(k).mul_(k)  # in two products: k² alone underflows float32 where k is 1e-20
                    if self.path_decay:
                        g.add_(layer.V, alpha=self.path_decay)
                b = layer.bias
                if b is not None and b.grad is not None:  # the bias too steps in the network's units
                    b.grad.mul_(layer.out_scale).mul_(layer.out_scale)
                    if self.path_decay:
                        b.grad.add_(b, alpha=self.path_decay)
        loss = super().step(closure)
        if self.hook is not None:
            self.hook.step()
        return loss
