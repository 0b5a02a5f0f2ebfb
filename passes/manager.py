"""A small pass manager: named passes with declared inputs and outputs, run as pipelines.

A pass reads named values from a state (a dict) and returns new ones. A pipeline checks,
before running anything, that every input a pass declares is either given or produced by
an earlier pass, then runs the passes in order and times each one. Options are plain
keyword arguments, routed to every pass that declares them.

State keys used by the standard passes:
  model           the user's nn.Module (or GraphModule), never modified
  example_inputs  one call's arguments
  gm              the current GraphModule
  shapes          {node name: output shape}, present once ``gm`` is shape-annotated
  fold_report     passes.fold_bn.FoldReport
  groups          passes.groupset.RescalingGroups of ``gm``
  enorm_report    passes.enorm.ENormReport (``gm`` is then the balanced module)
  reparam_report  pathfx.reparam.ReparamReport (``gm`` is then the path model)
  pbn_layers      the (layer, BatchNorm) pairs fused into P-BN
  owned           True when the caller hands ``model`` over (``transform``'s own float64 copy): passes
                  then work on it and on each other's results in place instead of copying, so a
                  pipeline over a large model holds one copy of its weights, not one per pass
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from .errors import InputError
from .table import table


@dataclass
class Pass:
    name: str
    fn: Callable[..., dict]  # fn(state, **options) -> {output name: value}
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    doc: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)

    def run(self, gm_or_model, example_inputs=None, **options) -> "PipelineResult":
        """Run this pass alone on a GraphModule (or a model, for ``trace``)."""
        return Pipeline(self.name, [self]).run(gm_or_model, example_inputs, **options)


@dataclass
class PipelineResult:
    pipeline: str
    state: dict
    timings: dict[str, float]  # pass name -> wall seconds, in run order

    def __getitem__(self, key):
        return self.state[key]

    @property
    def gm(self) -> fx.GraphModule:
        return self.state["gm"]

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())

    def __str__(self) -> str:
        rows = [[name, f"{sec:.3f}"] for name, sec in self.timings.items()]
        rows.append(["total", f"{self.total_seconds:.3f}"])
        return f"pipeline {self.pipeline}\n" + table(["pass", "seconds"], rows)


@dataclass
class Pipeline:
    name: str
    passes: list[Pass] = field(default_factory=list)

    @property
    def options(self) -> set[str]:
        return {o for p in self.passes for o in p.options}

    def check(self, available) -> None:
        have = set(available)
        for p in self.passes:
            missing = [k for k in p.inputs if k not in have]
            if missing:
                raise InputError(f"pipeline '{self.name}': pass '{p.name}' needs {', '.join(missing)}, which no "
                                 f"earlier pass produces and was not given (available: {', '.join(sorted(have))})")
            have |= set(p.outputs)

    def run(self, gm_or_model: nn.Module, example_inputs=None, owned: bool = False, **options) -> PipelineResult:
        """``owned``: ``gm_or_model`` is the caller's to give away (see ``owned`` above); it may be changed."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise InputError(f"pipeline '{self.name}' has no option {', '.join(unknown)} "
                             f"(options: {', '.join(sorted(self.options)) or 'none'})")
        state = initial_state(gm_or_model, example_inputs)
        self.check(state)
        state["owned"] = owned
        timings = {}
        for i, p in enumerate(self.passes):
            # an owned model that no later pass reads as a function may be rewritten by this one
            state["model_free"] = owned and not any("model" in q.inputs for q in self.passes[i + 1:])
            start = time.perf_counter()
            out = p.fn(state, **{k: v for k, v in options.items() if k in p.options})
            timings[p.name] = time.perf_counter() - start
            undeclared = set(out) - set(p.outputs)
            if undeclared:
                raise RuntimeError(f"pass '{p.name}' returned undeclared outputs {sorted(undeclared)}")
            state.update(out)
        return PipelineResult(self.name, state, timings)


def _shapes(gm: fx.GraphModule) -> dict | None:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if nodes and all("tensor_meta" in n.meta or "value" in n.meta for n in nodes):
        return {n.name: n.meta.get("shape") for n in nodes}
    return None


def initial_state(gm_or_model: nn.Module, example_inputs=None) -> dict:
    if not isinstance(gm_or_model, nn.Module):
        raise InputError(f"expected an nn.Module or GraphModule, got {type(gm_or_model).__name__}")
    state = {"model": gm_or_model}
    if example_inputs is not None:
        state["example_inputs"] = example_inputs
    if isinstance(gm_or_model, fx.GraphModule):
        state["gm"] = gm_or_model
        shapes = _shapes(gm_or_model)
        if shapes is not None:
            state["shapes"] = shapes
    return state


# -- the standard passes ------------------------------------------------------------------------

def _trace(state, *, leaf_modules=(), train=False):
    from .trace import check_trace, trace

    # a traced copy unless owned: the caller's flags stay
    gm = trace(state["model"], leaf_modules=leaf_modules, copy_model=not state.get("owned"))
    if "example_inputs" in state:
        check_trace(state["model"], gm, state["example_inputs"])
    return {"gm": gm.train(train)}


def _shapes_pass(state):
    from .shapes import propagate

    gm = propagate(state["gm"], state["example_inputs"])
    return {"gm": gm, "shapes": _shapes(gm)}


def _fold_bn(state):
    from .fold_bn import FoldReport, fold_bn

    if state["gm"].training:  # training-mode BatchNorms normalise by batch statistics: nothing to fold
        return {"fold_report": FoldReport()}
    gm, report = fold_bn(state["gm"], inplace=state.get("owned", False),
                         reuse_layers=state.get("model_free", False))
    return {"gm": gm, "fold_report": report}


def _groups(state, *, name=""):
    from .groups import analyze

    return {"groups": analyze(state["gm"], name=name or type(state["model"]).__name__)}


def _enorm(state, *, p=2, c=1.0, cycles=None, tol=1e-6, select=None, max_cycles=10_000):
    from .enorm import balance

    gm = state["gm"] if state.get("owned") else copy.deepcopy(state["gm"])  # names as in groups.module
    report = balance(gm, state["groups"], p=p, c=c, cycles=cycles, tol=tol, select=select, max_cycles=max_cycles)
    return {"gm": gm, "enorm_report": report}


def _reparam(state, *, policy="per-block", init="preserve", leaf_modules=(), value_dtype=None):
    # pathfx.reparameterize traces the unfolded model itself: a path model keeps its BatchNorms
    from pathfx.reparam import reparameterize

    owned = state.get("owned", False)  # then the caller verifies: no check of its own
    gm, report = reparameterize(state["model"], state["example_inputs"], policy=policy, pbn=False, init=init,
                                leaf_modules=leaf_modules, copy_model=not owned, check=not owned,
                                value_dtype=value_dtype)
    return {"gm": gm, "reparam_report": report}


def _pbn(state):
    from pathfx.nn import PathLayer

    from .pbn import insert_pbn

    owned = state.get("owned", False)
    gm = state["gm"] if owned else copy.deepcopy(state["gm"])
    report = state["reparam_report"] if owned else copy.deepcopy(state["reparam_report"])
    paths = {n: m for n, m in gm.named_modules() if isinstance(m, PathLayer)}
    # the analysis folded each BN into the layer before it: those (layer, BN) pairs are P-BN candidates
    bn_after = {layer: bn for layer, bn in state["fold_report"].folded if bn in report.bn_layers}
    fused = insert_pbn(gm, paths, bn_after, lam=report.lam)
    gm.delete_all_unused_submodules()
    gm.recompile()
    report.pbn = True
    report.pbn_layers = [layer for layer, _ in fused]
    report.bn_layers = [b for b in report.bn_layers if b not in {bn for _, bn in fused}]
    return {"gm": gm, "reparam_report": report, "pbn_layers": fused}


# The one registration table: name -> (function, declared inputs, declared outputs, description).
PASSES: dict[str, Pass] = {p.name: p for p in [
    Pass("trace", _trace, ("model",), ("gm",), "symbolic trace of a copy, op spellings normalised"),
    Pass("shapes", _shapes_pass, ("gm", "example_inputs"), ("gm", "shapes"), "shape propagation (meta device)"),
    Pass("fold_bn", _fold_bn, ("gm",), ("gm", "fold_report"), "fold eval-mode BatchNorms"),
    Pass("groups", _groups, ("gm", "shapes"), ("groups",), "rescaling-group discovery"),
    Pass("enorm", _enorm, ("gm", "groups"), ("gm", "enorm_report"), "Equi-normalization of a copy"),
    Pass("reparam", _reparam, ("model", "example_inputs"), ("gm", "reparam_report"),
         "path reparameterization (PathLayers, BatchNorms re-set)"),
    Pass("pbn", _pbn, ("gm", "reparam_report", "fold_report"), ("gm", "reparam_report", "pbn_layers"),
         "fuse path layers and their BatchNorms into P-BN"),
]}

PIPELINES: dict[str, list[str]] = {
    "analyze": ["trace", "shapes", "fold_bn", "groups"],
    "balance": ["trace", "shapes", "fold_bn", "groups", "enorm"],
    "path": ["trace", "shapes", "fold_bn", "groups", "reparam", "pbn"],
}


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        raise InputError(f"unknown pass '{name}' (passes: {', '.join(PASSES)})")
    return PASSES[name]


def pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise InputError(f"unknown pipeline '{name}' (pipelines: {', '.join(PIPELINES)})")
    return Pipeline(name, [PASSES[p] for p in PIPELINES[name]])


def run_pipeline(name: str, gm_or_model: nn.Module, example_inputs=None, owned: bool = False,
                 **options) -> PipelineResult:
    return pipeline(name).run(gm_or_model, example_inputs, owned=owned, **options)


def run_pass(name: str, gm: nn.Module, example_inputs=None, **options) -> PipelineResult:
    return get_pass(name).run(gm, example_inputs, **options)
