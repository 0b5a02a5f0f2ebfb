"""``pathfx.transform``: analyse, rewrite (balance or path form), plan and verify in one call."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from passes.errors import InputError, VerificationError
from passes.groupset import RescalingGroups
from passes.manager import run_pipeline
from passes.modules import batchnorms, cast_floating, float64_copy, model_dtype
from passes.table import table
from passes.verify import Verification, reference, verify_reference

from .plan import Plan, acts_on, make_plan, measure_bn

MODES = {"balance": "enorm", "path": "gsgd"}  # mode -> its matched plan


@dataclass
class TransformResult:
    model: fx.GraphModule
    groups: RescalingGroups
    plan: Plan
    verification: Verification | None
    timings: dict[str, float]
    mode: str
    report: object = None  # passes.enorm.ENormReport or passes.pathmodel.ReparamReport
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


def _param_map(old_names, new: nn.Module, pbn_pairs=()) -> dict[str, str]:
    """Which original parameter each transformed one derives from. A path layer at X holds X's
    weight as ``X.V`` (``X.layer.V`` inside a P-BN) and its bias as ``X.base.bias``; a P-BN at X
    holds the BatchNorm that followed X as ``X.bn``."""
    old = set(old_names)
    bn_after = dict(pbn_pairs)
    out = {}
    for name, _ in new.named_parameters():
        mod, _, leaf = name.rpartition(".")
        cands = [name]
        if mod.endswith("bn") and mod.rpartition(".")[0] in bn_after:
            cands.append(f"{bn_after[mod.rpartition('.')[0]]}.{leaf}")
        for wrapper in (".layer.base", ".base", ".layer"):
            if mod.endswith(wrapper):
                cands.append(f"{mod[:-len(wrapper)]}.{leaf}")
        if leaf == "V":
            cands.append(f"{mod.removesuffix('.layer')}.weight")
        hit = next((c for c in cands if c in old), None)
        if hit is not None:
            out[name] = hit
    return out


def _check_cast(gm: nn.Module, ref, dtype: torch.dtype, mode: str) -> None:
    """The result verified in float64; cast back to the model's dtype a path form can leave its range
    (path and basis values are products along paths: below float16's smallest number, and on deep
    networks such as ShuffleNet outside even float32's): refuse it rather than hand back a model
    that outputs NaN or Inf."""
    label, args = ref.inputs[0]
    want = [t for t in tree_flatten(ref.outputs[label])[0] if torch.is_tensor(t)]
    try:
        with torch.no_grad():
            got = gm(*cast_floating(args, dtype))
    except Exception:  # an op without a kernel for this dtype here: the caller's own model has the same
        return
    got = [t for t in tree_flatten(got)[0] if torch.is_tensor(t)]
    if all(bool(w.isfinite().all()) <= bool(g.isfinite().all()) for w, g in zip(want, got)):
        return
    tiny = min((float(p.detach().abs()[p != 0].min()) for p in gm.parameters() if bool((p != 0).any())), default=0.0)
    raise VerificationError(f"the {mode} form verified in float64 but outputs NaN or Inf in {dtype}: its values "
                            f"leave {dtype}'s range (smallest nonzero |parameter| {tiny:.1e}, smallest normal "
                            f"{torch.finfo(dtype).tiny:.1e}); use a wider dtype{' (float32)' if dtype != torch.float32 else ' (float64)'}")


def transform(model: nn.Module, example_inputs=None, mode: str = "path", plan: str | None = None,
              verify: bool = True, rtol: float = 1e-10, name: str = "", n_random: int = 8,
              copy_model: bool = True, calibration=None, **pass_options) -> TransformResult:
    """Rewrite a copy of ``model`` into balanced (``mode="balance"``, ENorm) or path form
    (``mode="path"``, path reparameterization with P-BN), with the matched training plan.

    ``plan``: ``"enorm"`` (balance), ``"gsgd"`` (path) or ``"sgd"`` (baseline on the
    transformed model); by default the one matched to the mode. ``verify``: compare the
    result with the original in float64 (eval mode) on ``example_inputs`` and ``n_random`` random
    inputs of the same shapes, and raise VerificationError over ``rtol``.
    ``pass_options`` go to the passes that declare them (``p``, ``c``, ``cycles``, ``tol``,
    ``policy``, ``init``, ``leaf_modules`` (default ``"auto"``: submodules that symbolic tracing cannot
    follow are kept opaque, as barriers), ``frontend`` (``"fx"``, the default, or ``"export"``:
    ``torch.export``'s ATen graph)...). The caller's model is never modified, unless
    ``copy_model=False``: then it is converted to float64 and rewritten in place (its weights become
    the result's), for a caller that built the model only to transform it — on a large model that
    saves the memory of one copy.
    ``calibration``: inputs (a tensor, or batches as a DataLoader yields them) on which every BatchNorm's
    running statistics are measured before the rewrite; the result then computes what the model computes
    with those statistics, and is verified against that. For a model about to be trained from scratch
    with the ENorm plan, whose BatchNorms fold away: statistics that never saw data (mean 0, variance 1)
    fold into a network whose signal can vanish with depth (torchvision's mobilenet_v2: logits varying by
    ~1e-10 across a batch), while statistics measured on data fold into a data-dependent initialisation
    in which every folded layer's output starts normalised.
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
    # is handed back in the model's own dtype. The original's outputs are computed first, then
    # the float64 copy is handed to the pipeline, which rewrites it in place: one copy of the
    # weights is alive at a time, not one per pass.
    dtype = model_dtype(model)
    training, names = model.training, [n for n, _ in model.named_parameters()]
    work = float64_copy(model).eval() if copy_model else model.to(torch.float64).eval()
    bns = {n: int(m.num_batches_tracked) for n, m in batchnorms(work).items() if m.track_running_stats}
    fresh, trained = [n for n, t in bns.items() if t == 0], any(bns.values())
    measured = measure_bn(work, calibration) if calibration is not None else 0
    args = cast_floating(args, torch.float64)
    ref = reference(work, args, n_random=n_random) if verify else None
    if mode == "path":  # the float64 copy is reparameterized for the dtype the result is handed back in
        pass_options.setdefault("value_dtype", dtype)
    pass_options.setdefault("name", name or type(model).__name__)
    if mode == "balance" and kind == "enorm":  # ENorm §6.2–6.3: convolutional nets train with one BN after the classifier
        # but a trained model being fine-tuned keeps its function in training mode too: none is added to it
        # (one it has is kept); a fresh BatchNorm on its logits costs ~2 points in the first epoch
        convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        pass_options.setdefault("final_bn", "keep" if convs and trained else convs)
    del model
    state = run_pipeline(mode, work, args, copy=False, **pass_options).state
    del work
    gm, groups = state.gm, state.groups
    report = state.enorm_report or state.reparam_report
    verification = None
    if verify:
        gm.eval()
        verification = verify_reference(ref, gm, rtol=rtol)
        verification.raise_if_failed()
        if hasattr(report, "max_rel_error"):
            report.max_rel_error = verification.max_rel
    if mode == "path":  # a path model is handed back in the caller's mode, as reparameterize does
        gm.train(training)
    gm = gm.to(dtype)
    if verify and dtype != torch.float64:
        _check_cast(gm, ref, dtype, mode)
    weight_space = _weight_space(mode, groups, report)
    chosen = acts_on(groups, report.reparameterized_groups) if mode == "path" and report is not None else None
    # a converted model's bases are products of its weights: a plan for its path values scales each step by them
    step = "basis-scaled" if mode == "path" and pass_options.get("init", "preserve") == "preserve" else "sgd"
    notes = _notes(state.restored_bns, measured, fresh if mode == "balance" and kind == "enorm" else [])
    made = make_plan(kind, mode, gm, groups, tuple(args[0].shape), weight_space, chosen, groups.model_name, step,
                     final_bn=state.final_bn or "", notes=notes)
    return TransformResult(model=gm, groups=groups, plan=made, verification=verification,
                           timings=dict(state.timings), mode=mode, report=report,
                           param_map=_param_map(names, gm, state.pbn_layers or ()))


def _notes(restored: list | None, measured: int, fresh: list) -> list[str]:
    """What the plan tells its user: BatchNorms kept behind barriers, the calibration, or its absence
    where ``fresh`` BatchNorms (never saw data) were folded."""
    notes = []
    if restored:
        notes.append(f"{len(restored)} BatchNorms kept, as the identity in eval mode, after the layers whose "
                     f"channels no group reaches (behind barriers, e.g. {restored[0]}): ENorm cannot act "
                     "there, and they train with the normalisation they were built with")
    if measured:
        notes.append(f"BatchNorm statistics measured on {measured} calibration inputs before the rewrite")
    elif fresh:
        notes.append(f"{len(fresh)} BatchNorms (e.g. {fresh[0]}) never saw data and were folded at mean 0, variance 1: "
                     "to train from scratch, transform with calibration=<training inputs> (a data-dependent start)")
    return notes


def _weight_space(mode, groups, report) -> list[dict]:
    out = [{"what": f"{f.count} variables of {', '.join(f.layers[:3])}{' …' if len(f.layers) > 3 else ''}",
            "reason": f"frozen: {f.reason}"} for f in groups.frozen]
    if mode == "path" and report is not None:
        out += [{"what": f"{n} variables", "reason": reason} for reason, n in report.weight_space.items()]
    return out
