"""Training plans matched to the discovered groups (DESIGN §4).

A ``Plan`` is data — kind, the groups it acts on, what stays in weight space and why, the
optimizer and schedule defaults of the papers, the model's signature — plus builders:
``plan.optimizer(model)`` returns the torch optimizer (a ``pathfx.optim.PlanSGD``, whose step
ends with the plan's step hook: one ENorm cycle for ENorm plans), ``plan.scheduler(optimizer,
total_steps)`` the learning-rate schedule, ``plan.finalize(model, loader)`` the running statistics
of the trained model. A plan applied to a model with another architecture is an error.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from passes.errors import PathfxError
from passes.groupset import RescalingGroups
from passes.modules import batchnorms, cast_floating, model_dtype

from .nn import PathLayer
from .optim import PlanSGD, unwrap

KINDS = ("enorm", "gsgd", "sgd")


class PlanMismatchError(PathfxError):
    """A plan applied to a model it was not made for."""


# The papers' defaults. ENorm: enorm-iclr2019 §5 (Alg. 2), §6.1 (fully connected), §6.2 (CIFAR-NV),
# §6.3 (ImageNet ResNet-18). G-SGD + P-BN and the SGD + BN baseline: pbn-iclr2020 F.1.
DEFAULTS = {
    "enorm": {
        "optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": False},
        "schedule": {"type": "quadratic", "final_lr": 1e-4, "batch_size": 128, "lr_grid": [0.01, 0.05, 0.1]},
        "enorm": {"p": 2.0, "c": 1.0, "every": 1, "momentum_rescaled": True},
        "sources": ["enorm-iclr2019 §5 Alg. 2: one ENorm cycle after each SGD step, momentum rescaled",
                    "enorm-iclr2019 §6.2: lr in {0.01, 0.05, 0.1} (cross-validated; the default here is the grid's "
                    "smallest), weight decay 1e-3, quadratic decay to 1e-4"],
    },
    "enorm-mlp": {
        "optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.0, "weight_decay": 1e-3, "nesterov": False},
        "schedule": {"type": "linear", "final_lr": 0.0, "batch_size": 256,
                     "lr_grid": [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1]},
        "enorm": {"p": 2.0, "c": 1.2, "every": 1, "momentum_rescaled": True},
        "sources": ["enorm-iclr2019 §6.1: no momentum, batch 256, weight decay 1e-3, linear decay to 0, c = 1.2"],
    },
    "gsgd": {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.0, "weight_decay": 1e-4, "nesterov": False},
        "schedule": {"type": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1, "batch_size": 128,
                     "lr_grid": [0.1, 0.2, 0.5, 1.0]},
        "sources": ["pbn-iclr2020 F.1: lr searched in {0.1, 0.2, 0.5, 1.0}, path-space weight decay 1e-4, "
                    "no momentum, batch 128, lr × 0.1 at 50% and 75% of training"],
    },
    "sgd": {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False},
        "schedule": {"type": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1, "batch_size": 128,
                     "lr_grid": [0.1]},
        "sources": ["pbn-iclr2020 F.1 (He et al. 2016): SGD + BN, lr 0.1, weight decay 1e-4, batch 128"],
    },
}


@dataclass
class Plan:
    kind: str
    mode: str  # the form of model the plan trains: "balance" (weights) or "path" (path values)
    model_name: str
    input_shape: list[int]
    acts_on: list[dict]  # {"group", "width", "producers"} per group the plan rescales / reparameterizes
    weight_space: list[dict]  # {"what", "reason"}: trained as plain weights
    optimizer_settings: dict
    schedule: dict
    enorm: dict | None = None
    signature: dict = field(default_factory=dict)  # {"params": {name: shape}} of the model it was made for
    sources: list[str] = field(default_factory=list)
    # "sgd": SGD on the model's parameters (for a path model: G-SGD on its path values); "basis-scaled":
    # G-SGD with each path value's step scaled by the square of its scale (pathfx.optim.PlanSGD)
    step: str = "sgd"
    final_bn: str = ""  # ENorm plans of convolutional nets: the BatchNorm after the classifier, "kept", "added",
    # or "none: <why>"
    notes: list[str] = field(default_factory=list)  # what the user should know before training with it

    # -- data ---------------------------------------------------------------------------------
    def to_json(self, **kw) -> str:
        return json.dumps(asdict(self), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        if d.get("kind") not in KINDS:
            raise PathfxError(f"not a pathfx plan (kind {d.get('kind')!r}; expected one of {', '.join(KINDS)})")
        return cls(**d)

    def __str__(self) -> str:
        from passes.table import by_reason, table

        opt = self.optimizer_settings
        head = (f"plan {self.kind} for {self.model_name} ({self.mode} form): {opt['name']} lr {opt['lr']} "
                f"momentum {opt['momentum']} weight decay {opt['weight_decay']}; schedule {self.schedule['type']}, "
                f"batch {self.schedule['batch_size']}, lr grid {self.schedule['lr_grid']}")
        if self.enorm:
            head += f"\n  after each step: one ENorm cycle every {self.enorm['every']} step(s), p={self.enorm['p']}, " \
                    f"c={self.enorm['c']}, momentum buffers rescaled"
        if self.final_bn.startswith("none"):
            head += f"\n  no BatchNorm after the classifier ({self.final_bn.removeprefix('none: ')})"
        elif self.final_bn:
            head += f"\n  one BatchNorm after the classifier ({self.final_bn}; enorm-iclr2019 §6.2–6.3)"
        if self.step == "basis-scaled":
            head += "\n  step: G-SGD with each path value's step scaled by the square of its scale — basis values " \
                    "relative to themselves, the others in their layer's units (the bases of a converted model are " \
                    "products of weights: plain G-SGD would explode)"
        head += "".join(f"\n  note: {n}" for n in self.notes)
        width = sum(a["width"] for a in self.acts_on)
        rows = [[len(self.acts_on), width, len(self.weight_space)]]
        out = [head, table(["groups acted on", "variables", "left in weight space"], rows)]
        if self.weight_space:
            out.append(table(["weight-space items", "reason", "at"],
                             [r[1:] for r in by_reason((w["reason"], 1) for w in self.weight_space)]))
        return "\n".join(out)

    # -- builders -----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise PlanMismatchError unless ``model`` has the parameters this plan was made for."""
        model = unwrap(model)
        want = self.signature.get("params", {})
        have = {n: list(p.shape) for n, p in model.named_parameters()}
        if have == want:
            return
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        reshaped = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                 f"{len(reshaped)} with other shapes (e.g. {reshaped[0]})" if reshaped else ""]
        raise PlanMismatchError(f"this {self.kind} plan was made for {self.model_name} ({self.mode} form); the "
                                f"model's parameters differ: {'; '.join(p for p in parts if p)}")

    def optimizer(self, model: nn.Module, example_inputs=None) -> PlanSGD:
        """The torch optimizer of this plan for ``model`` (checked against the plan's signature).

        For ENorm plans its ``step()`` ends with one ENorm cycle (``optimizer.hook``, a
        ``pathfx.optim.ENorm``); ``model`` may be wrapped in DistributedDataParallel: every rank
        steps, and every rank computes the same cycle.
        """
        self.check(model)
        s = self.optimizer_settings
        # for gsgd the trainable weights are the path values V: weight decay acts in path space (pbn F.1)
        params = [p for p in model.parameters() if p.requires_grad]
        enorm = None
        if self.kind == "enorm":
            x = example_inputs if example_inputs is not None else torch.randn(*self.input_shape)
            enorm = {"model": model, "example_inputs": x, "p": self.enorm["p"], "c": self.enorm["c"],
                     "every": self.enorm["every"]}
        path_layers = [m for m in unwrap(model).modules() if isinstance(m, PathLayer)] \
            if self.step == "basis-scaled" else []
        return PlanSGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                       nesterov=s["nesterov"], enorm=enorm, path_layers=path_layers)

    def finalize(self, model: nn.Module, loader) -> nn.Module:
        """The last step of every plan: recompute the running statistics of every BatchNorm — a P-BN's
        too — over ``loader`` (batches of inputs, or (inputs, labels) pairs) with the weights as trained,
        as ``torch.optim.swa_utils.update_bn`` does, and return ``model`` in eval mode. Eval mode reads
        those statistics, and during training they lag behind weights that move fast (a path model
        after a few hundred G-SGD steps: 7.8 % test error with batch statistics, 82.8 % with the
        running ones before this step, 9.0 % after it)."""
        measure_bn(unwrap(model), loader)
        return model.eval()

    def after_step(self) -> None:
        """Nothing left to do: the plan's optimizer runs its step hook (the ENorm cycle) inside its own
        ``step()``. Kept so that loops written as ``opt.step(); plan.after_step()`` read as before."""
        return None

    @classmethod
    def baseline(cls, model: nn.Module, example_inputs, name: str = "") -> "Plan":
        """The SGD + BN baseline plan (pbn F.1) for ``model`` as it is, BatchNorms and all."""
        x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        return make_plan("sgd", "balance", model, None, tuple(x.shape), name=name or type(model).__name__)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """The learning-rate schedule over ``total_steps`` optimizer steps."""
        s, lr0 = self.schedule, self.optimizer_settings["lr"]
        total = max(int(total_steps), 1)
        if s["type"] == "multistep":
            marks = [int(m * total) for m in s["milestones"]]
            factor = lambda t: s["gamma"] ** sum(t >= m for m in marks)  # noqa: E731
        else:
            power = 2.0 if s["type"] == "quadratic" else 1.0
            end = s["final_lr"] / lr0
            factor = lambda t: end + (1 - end) * (1 - min(t, total) / total) ** power  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def measure_bn(model: nn.Module, data) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` (a P-BN's too) as the average over
    ``data`` — a tensor, or an iterable of tensors or (inputs, labels) pairs — the way
    ``torch.optim.swa_utils.update_bn`` does, with the inputs cast to the model's dtype. Returns the number
    of inputs seen (0 when the model has no BatchNorm); leaves ``model`` in eval mode."""
    if not batchnorms(model):
        return 0
    dtype, seen = model_dtype(model), []

    def batches():
        for b in ([data] if torch.is_tensor(data) else data):
            x = b[0] if isinstance(b, (tuple, list)) else b
            seen.append(len(x))
            yield cast_floating((x,), dtype)[0]

    torch.optim.swa_utils.update_bn(batches(), model)
    model.eval()
    return sum(seen)


def acts_on(groups: RescalingGroups, ids=None) -> list[dict]:
    """The plan's record of the groups it acts on: all of ``groups``, or those of ``ids``."""
    chosen = None if ids is None else set(ids)
    return [{"group": g.id, "width": g.width, "producers": [p.weight for p in g.producers]}
            for g in groups.groups if chosen is None or g.id in chosen]


def make_plan(kind: str, mode: str, model: nn.Module, groups: RescalingGroups | None, input_shape, weight_space=(),
              acting=None, name: str = "", step: str = "sgd", final_bn: str = "", notes=()) -> Plan:
    """The plan of ``kind`` for a transformed ``model`` whose analysis gave ``groups`` (None for the
    ``sgd`` baseline, which acts on no group); ``acting`` as ``acts_on`` gives it (default: every group)."""
    if kind not in KINDS:
        raise PathfxError(f"unknown plan '{kind}' (plans: {', '.join(KINDS)})")
    is_mlp = groups is not None and not any("conv" in g.tags for g in groups.groups)
    d = DEFAULTS["enorm-mlp" if kind == "enorm" and is_mlp else kind]
    if acting is None:
        acting = acts_on(groups) if kind != "sgd" else []
    return Plan(kind=kind, mode=mode, model_name=name or (groups.model_name if groups else ""), input_shape=list(input_shape),
                acts_on=acting, weight_space=list(weight_space), optimizer_settings=dict(d["optimizer"]),
                schedule=dict(d["schedule"]), enorm=dict(d["enorm"]) if "enorm" in d else None,
                signature={"params": {n: list(p.shape) for n, p in model.named_parameters()}},
                sources=list(d["sources"]), step=step, final_bn=final_bn, notes=list(notes))
