"""``pathfx.transform``: analyse, rewrite (balance or path form), plan and verify in one call."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from passes.errors import InputError
from passes.groupset import RescalingGroups
from passes.manager import run_pipeline
from passes.table import table
from passes.verify import Verification, verify as verify_models

from .plan import Plan, make_plan

MODES = {"balance": "enorm", "path": "gsgd"}  # mode -> its matched plan


@dataclass
class TransformResult:
    model: fx.GraphModule
    groups: RescalingGroups
    plan: Plan
    verification: Verification | None
    timings: dict[str, float]
    mode: str
    report: object = None  # passes.enorm.ENormReport or pathfx.reparam.ReparamReport
    param_map: dict[str, str] = field(default_factory=dict)  # transformed parameter -> original parameter

    def __str__(self) -> str:
        g = self.groups
        lines = [f"transform {g.model_name} → {self.mode} form: {len(g.groups)} groups, {g.num_free} free variables, "
                 f"{g.num_frozen} frozen, {len(g.barriers)} barriers"]
        if hasattr(self.report, "objective"):
            r = self.report
            lines.append(f"ENorm (p={r.p:g}, c={r.c:g}): {r.cycles} cycles, Σ|w|^p {r.before:.6g} → {r.after:.6g}")
        elif self.report is not None:
            lines.append(str(self.report).splitlines()[0])
        if self.verification is not None:
            v = self.verification
            lines.append(f"verification (float64): max abs error {v.max_abs:.2e}, max rel error {v.max_rel:.2e} "
                         f"→ {'ok' if v.ok else 'FAILED'}")
        lines.append(str(self.plan).splitlines()[0])
        lines.append(table(["pass", "seconds"], [[k, f"{s:.3f}"] for k, s in self.timings.items()]))
        return "\n".join(lines)


def default_inputs(model: nn.Module):
    from zoo.registry import default_input_shape

    shape = default_input_shape(model)
    if shape is None:
        raise InputError(f"{type(model).__name__} is not a known torchvision or zoo model: pass example_inputs "
                         f"(e.g. torch.randn(1, 3, 224, 224))")
    return torch.randn(*shape)


def _param_map(model: nn.Module, new: nn.Module) -> dict[str, str]:
    """Which original parameter each transformed one derives from (same qualified module path)."""
    old = {n for n, _ in model.named_parameters()}
    out = {}
    for name, _ in new.named_parameters():
        mod, _, leaf = name.rpartition(".")
        for cand in (name, f"{mod.rsplit('.', 1)[0]}.weight" if leaf == "V" else None,
                     f"{mod.removesuffix('.base')}.{leaf}"):
            if cand in old:
                out[name] = cand
                break
    return out


def transform(model: nn.Module, example_inputs=None, mode: str = "path", plan: str | None = None,
              verify: bool = True, rtol: float = 1e-10, name: str = "", **pass_options) -> TransformResult:
    """Rewrite a copy of ``model`` into balanced (``mode="balance"``, ENorm) or path form
    (``mode="path"``, path reparameterization with P-BN), with the matched training plan.

    ``plan``: ``"enorm"`` (balance), ``"gsgd"`` (path) or ``"sgd"`` (baseline on the
    transformed model); by default the one matched to the mode. ``verify``: compare the
    result with the original in float64 (eval mode) and raise VerificationError over ``rtol``.
    ``pass_options`` go to the passes that declare them (``p``, ``c``, ``cycles``, ``tol``,
    ``policy``, ``init``, ``leaf_modules``...). The caller's model is never modified.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}' (modes: {', '.join(MODES)})")
    kind = plan or MODES[mode]
    if kind != "sgd" and kind != MODES[mode]:
        raise InputError(f"plan '{kind}' does not match mode '{mode}' (use mode "
                         f"'{next(m for m, k in MODES.items() if k == kind)}' or plan 'sgd')")
    x = example_inputs if example_inputs is not None else default_inputs(model)
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    # The rewrite runs in float64, so that the verified function is the exact one; the result
    # is handed back in the model's own dtype.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    work = copy.deepcopy(model).double()
    args = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    result = run_pipeline(mode, work, args, **pass_options)
    gm, groups = result.gm, result["groups"]
    groups.model_name = name or groups.model_name
    report = result.state.get("enorm_report") or result.state.get("reparam_report")
    verification = None
    if verify:
        verification = verify_models(work, gm, inputs=args, rtol=rtol, names=("original", "transformed"))
        verification.raise_if_failed()
    gm = gm.to(dtype)
    weight_space = _weight_space(mode, groups, report)
    acts_on = None
    if mode == "path" and report is not None:
        chosen = set(report.reparameterized_groups)
        acts_on = [{"group": g.id, "width": g.width, "producers": [p.weight for p in g.producers]}
                   for g in groups.groups if g.id in chosen]
    made = make_plan(kind, mode, gm, groups, tuple(args[0].shape), weight_space, acts_on, groups.model_name)
    return TransformResult(model=gm, groups=groups, plan=made, verification=verification,
                           timings=dict(result.timings), mode=mode, report=report, param_map=_param_map(model, gm))


def _weight_space(mode, groups, report) -> list[dict]:
    out = [{"what": f"{f.count} variables of {', '.join(f.layers[:3])}{' …' if len(f.layers) > 3 else ''}",
            "reason": f"frozen: {f.reason}"} for f in groups.frozen]
    if mode == "path" and report is not None:
        out += [{"what": f"{n} variables", "reason": reason} for reason, n in report.weight_space.items()]
    return out
