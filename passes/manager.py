"""A small pass manager: named passes over one typed pipeline state, run as pipelines.

A pass takes the ``PipelineState`` and returns it, having set the fields it declares as outputs
(a user's pass may instead return a dict of new values). A pipeline checks, before running
anything, that every field a pass declares as input is either given or produced by an earlier
pass, then runs the passes in order and times each one. Options are keyword arguments, routed to
every pass that declares them; a pipeline may fix defaults of its own (``PIPELINE_OPTIONS``).

The model's way through the standard pipelines::

    model ──trace──▶ gm (the traced graph, its leaves the model's modules; or torch.export's ATen graph)
          ──shapes─▶ gm annotated by one real run, checked against model's own forward
          ──fold_bn─▶ gm with eval BatchNorms folded (path: the unfolded trace kept as ``traced``)
          ──groups──▶ groups of gm
          ──enorm───▶ gm balanced in place                                    (balance)
          ──reparam─▶ gm = the path model built on ``traced``                   (path)
          ──pbn─────▶ gm with (path layer, BN) pairs fused into P-BN            (path)

Copies. A pipeline whose passes rewrite weights (enorm, reparam, pbn) works on a copy of the
model made once, at the entry — unless the caller hands its model over (``copy=False``, as
``transform`` does with its own float64 copy). The analysis passes never write to the model:
folding sets new modules into the graph module, so ``find_groups`` needs no copy at all. A field
that no later pass reads (the model, the unfolded trace) is let go as soon as the last pass that
reads it has run, so a pipeline over a large model holds one set of weights at a time.
"""
from __future__ import annotations

import copy as copy_module
import inspect
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from .errors import GraphMismatch, InputError
from .fold_bn import FoldReport
from .groupset import RescalingGroups
from .table import table
from .trace import AUTO

FRONTENDS = ("fx", "export")


@dataclass
class PipelineState:
    """Everything a pipeline knows about one model at a point of its run."""

    model: nn.Module | None = None  # the model the pipeline was given (or its copy), until no pass reads it
    example_inputs: tuple | None = None  # one call's arguments
    gm: fx.GraphModule | None = None  # the current graph module
    shapes: dict | None = None  # {node name: output shape}, once gm is shape-annotated
    traced: fx.GraphModule | None = None  # the unfolded trace, kept for the path builder
    fold_report: FoldReport | None = None
    groups: RescalingGroups | None = None  # of gm (names as in gm)
    enorm_report: object = None  # passes.enorm.ENormReport: gm is then the balanced module
    reparam_report: object = None  # passes.pathmodel.ReparamReport: gm is then the path model
    pbn_layers: list | None = None  # (layer, BatchNorm) pairs fused into P-BN
    final_bn: str | None = None  # the BatchNorm after the classifier: "kept", "added", or why none
    restored_bns: list | None = None  # BatchNorms given back to layers behind barriers (ENorm plan)
    timings: dict[str, float] = field(default_factory=dict)  # pass name -> wall seconds, in run order
    outputs: dict = field(default_factory=dict)  # values of passes outside this table (a user's own)

    # A user's pass reads and writes the state by name, as ``state["groups"]``.
    def __getitem__(self, key):
        if key in _FIELDS and key not in ("timings", "outputs"):
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.outputs[key]

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def available(self) -> set[str]:
        return {k for k in _FIELDS if k not in ("timings", "outputs") and getattr(self, k) is not None} | \
            set(self.outputs)

    def update(self, values: dict) -> None:
        for key, value in values.items():
            if key in _FIELDS:
                setattr(self, key, value)
            else:
                self.outputs[key] = value


_FIELDS = {f.name for f in fields(PipelineState)}


@dataclass
class Pass:
    name: str
    fn: Callable  # fn(state, **options) -> state, or a dict of the outputs it declares
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    doc: str = ""
    writes: bool = False  # rewrites the model's weights or modules in place: its pipeline works on a copy

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
    state: PipelineState

    def __getitem__(self, key):
        return self.state[key]

    @property
    def gm(self) -> fx.GraphModule:
        return self.state.gm

    @property
    def timings(self) -> dict[str, float]:
        return self.state.timings

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())

    def __str__(self) -> str:
        rows = [[name, f"{sec:.3f}"] for name, sec in self.timings.items()]
        rows.append(["total", f"{self.total_seconds:.3f}"])
        return f"pipeline {self.pipeline}\n" + table(["pass", "seconds"], rows)


# Fields a pass may leave behind that no later pass needs: let go as soon as possible.
RELEASABLE = ("model", "traced")


@dataclass
class Pipeline:
    name: str
    passes: list[Pass] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)  # options this pipeline fixes unless the caller sets them

    @property
    def options(self) -> set[str]:
        return {o for p in self.passes for o in p.options}

    @property
    def writes(self) -> bool:
        return any(p.writes for p in self.passes)

    def check(self, available) -> None:
        have = set(available)
        for p in self.passes:
            missing = [k for k in p.inputs if k not in have]
            if missing:
                raise InputError(f"pipeline '{self.name}': pass '{p.name}' needs {', '.join(missing)}, which no "
                                 f"earlier pass produces and was not given (available: {', '.join(sorted(have))})")
            have |= set(p.outputs)

    def run(self, gm_or_model: nn.Module, example_inputs=None, copy: bool = True, **options) -> PipelineResult:
        """Run the passes on ``gm_or_model``. A pipeline that rewrites weights works on a copy of it,
        made here, unless ``copy=False``: then the caller hands the model over and it is rewritten."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise InputError(f"pipeline '{self.name}' has no option {', '.join(unknown)} "
                             f"(options: {', '.join(sorted(self.options)) or 'none'})")
        options = {**{k: v for k, v in self.defaults.items() if k in self.options}, **options}
        state = initial_state(gm_or_model, example_inputs)
        self.check(state.available())
        if copy and self.writes:
            state = initial_state(copy_module.deepcopy(gm_or_model), example_inputs)
        del gm_or_model
        for i, p in enumerate(self.passes):
            start = time.perf_counter()
            out = p.fn(state, **{k: v for k, v in options.items() if k in p.options})
            seconds = time.perf_counter() - start
            if isinstance(out, dict):
                undeclared = set(out) - set(p.outputs)
                if undeclared:
                    raise RuntimeError(f"pass '{p.name}' returned undeclared outputs {sorted(undeclared)}")
                state.update(out)
            elif out is not state:
                raise RuntimeError(f"pass '{p.name}' returned {type(out).__name__}, not the pipeline state")
            state.timings[p.name] = seconds
            later = {k for q in self.passes[i + 1:] for k in q.inputs}
            for key in RELEASABLE:
                if key not in later and key not in p.outputs:
                    setattr(state, key, None)
        return PipelineResult(self.name, state)


def _shapes(gm: fx.GraphModule) -> dict | None:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if nodes and all("tensor_meta" in n.meta or "value" in n.meta for n in nodes):
        return {n.name: n.meta.get("shape") for n in nodes}
    return None


def initial_state(gm_or_model: nn.Module, example_inputs=None) -> PipelineState:
    if not isinstance(gm_or_model, nn.Module):
        raise InputError(f"expected an nn.Module or GraphModule, got {type(gm_or_model).__name__}")
    from .shapes import as_tuple

    state = PipelineState(model=gm_or_model,
                          example_inputs=as_tuple(example_inputs) if example_inputs is not None else None)
    if isinstance(gm_or_model, fx.GraphModule):
        state.gm = gm_or_model
        state.shapes = _shapes(gm_or_model)
    return state


# -- the standard passes ------------------------------------------------------------------------

def _trace(state: PipelineState, *, leaf_modules=AUTO, train=False, frontend="fx") -> PipelineState:
    """The graph of the model, in eval mode unless ``train``: by symbolic tracing (``frontend="fx"``;
    ``leaf_modules``: see ``passes.trace.trace``) or by ``torch.export`` (``frontend="export"``,
    ``passes.export``). A GraphModule without leaves to keep is not traced again: the pipeline takes
    its graph (a copy of it: folding edits graphs)."""
    from .finite import check_finite
    from .trace import leaf_choice, trace_in_mode

    if frontend not in FRONTENDS:
        raise InputError(f"unknown frontend '{frontend}' (front ends: {', '.join(FRONTENDS)})")
    model = state.model
    if frontend == "export":
        from .export import export_graph

        if leaf_choice(leaf_modules)[1]:
            raise InputError("leaf_modules name submodules for the fx front end; torch.export captures every "
                             "submodule (use frontend=\"fx\" to keep some opaque)")
        state.gm = export_graph(model, state.example_inputs, train=train)
    elif isinstance(model, fx.GraphModule) and not leaf_choice(leaf_modules)[1]:
        check_finite(model)
        state.gm = fx.GraphModule(model, copy_module.deepcopy(model.graph), type(model).__name__)
        state.gm.training = train
    else:
        inputs = len(state.example_inputs) if state.example_inputs is not None else None
        state.gm = trace_in_mode(model, leaf_modules, train, inputs=inputs)
    return state


def _shapes_pass(state: PipelineState) -> PipelineState:
    from .locate import retrace_around
    from .shapes import propagate

    # a graph traced here runs against the model's own forward; a GraphModule given is its own reference
    traced_here = state.model is not None and state.model is not state.gm and \
        not isinstance(state.model, fx.GraphModule)
    while True:
        try:
            propagate(state.gm, state.example_inputs, reference=state.model if traced_here else None)
            break
        except GraphMismatch:  # with automatic leaves, the submodule whose graph differs becomes one
            gm = retrace_around(state.model, state.gm, state.example_inputs) if traced_here else None
            if gm is None:
                raise
            state.gm = gm
    state.shapes = _shapes(state.gm)
    return state


def _fold_bn(state: PipelineState, *, reuse_layers=False, keep_unfolded=False, lazy_weights=False,
             final_bn=False) -> PipelineState:
    """``keep_unfolded``: fold a second graph over the same leaves and keep the unfolded trace as
    ``traced`` (the path model is built on it). ``reuse_layers``: rewrite a layer that feeds only
    its BN in place (the pipeline's own copy: a large model then never holds two copies of its
    conv weights). ``lazy_weights``: write the folded weights only when the groups' ``source`` is
    first read (``find_groups``: most callers read only the groups). ``final_bn``: a BatchNorm after the
    classifier is not folded (the ENorm plan trains with it: passes/final_bn.py)."""
    from .fold_bn import fold_bn
    from .functional import modularize

    if state.gm.training:  # training-mode BatchNorms normalise by batch statistics: nothing to fold
        state.fold_report = FoldReport()
        return state
    gm = state.gm
    if keep_unfolded:
        modularize(gm)  # the path model keeps the module spellings that the analysis folds
        state.traced = gm
        gm = fx.GraphModule(gm, copy_module.deepcopy(gm.graph), type(gm).__name__)
        gm.training = state.traced.training
    from .final_bn import final_bn_name

    keep = [final_bn_name(gm)] if final_bn and final_bn_name(gm) else []
    state.gm, state.fold_report = fold_bn(gm, inplace=True, reuse_layers=reuse_layers and not keep_unfolded,
                                          lazy=lazy_weights, keep=keep)
    return state


def _groups(state: PipelineState, *, name="") -> PipelineState:
    from .groups import analyze

    state.groups = analyze(state.gm, name=name or type(state.gm).__name__,  # a trace is named after its model
                           fold=state.fold_report)
    return state


def _enorm(state: PipelineState, *, p=2, c=1.0, cycles=None, tol=1e-6, select=None,
           max_cycles=10_000) -> PipelineState:
    from .enorm import balance

    state.enorm_report = balance(state.gm, state.groups, p=p, c=c, cycles=cycles, tol=tol, select=select,
                                 max_cycles=max_cycles)
    return state


def _final_bn(state: PipelineState, *, final_bn=False) -> PipelineState:
    """With ``final_bn``: the balanced model keeps, or gets, one BatchNorm after the classifier, and the
    layers whose channels no group reaches get theirs back ("keep": only keeps one it has, adds none)."""
    from .final_bn import add_final_bn, restore_behind_barriers

    state.final_bn = add_final_bn(state.gm, add=final_bn != "keep") if final_bn else None
    state.restored_bns = restore_behind_barriers(state.gm, state.groups, state.fold_report.folded) \
        if final_bn is True and state.fold_report is not None else []
    return state


def _reparam(state: PipelineState, *, policy="per-block", init="preserve", value_dtype=None) -> PipelineState:
    from .pathmodel import build

    state.gm, state.reparam_report = build(state.traced, state.groups, state.fold_report, policy=policy,
                                           init=init, value_dtype=value_dtype)
    state.traced = None
    return state


def _pbn(state: PipelineState, *, pbn=True) -> PipelineState:
    """``pbn=False`` keeps conventional BatchNorms after the path layers (G-SGD + BN, the papers' ablation)."""
    from .pathmodel import fuse_pbn

    state.pbn_layers = fuse_pbn(state.gm, state.reparam_report, state.fold_report) if pbn else []
    return state


# The one registration table: name -> (function, declared inputs, declared outputs, description).
PASSES: dict[str, Pass] = {p.name: p for p in [
    Pass("trace", _trace, ("model",), ("gm",), "symbolic trace (opaque leaves where it fails) or torch.export"),
    Pass("shapes", _shapes_pass, ("gm", "example_inputs", "model"), ("gm", "shapes"),
         "one real run that annotates shapes and checks the graph against the model's forward"),
    Pass("fold_bn", _fold_bn, ("gm",), ("gm", "fold_report", "traced"), "fold eval-mode BatchNorms"),
    Pass("groups", _groups, ("gm", "shapes"), ("groups",), "rescaling-group discovery"),
    Pass("enorm", _enorm, ("gm", "groups"), ("gm", "enorm_report"), "Equi-normalization in place", writes=True),
    Pass("final_bn", _final_bn, ("gm", "groups"), ("gm", "final_bn", "restored_bns"),
         "one BatchNorm after the classifier (ENorm §6.2–6.3), and theirs to layers behind barriers", writes=True),
    Pass("reparam", _reparam, ("traced", "groups", "fold_report"), ("gm", "reparam_report", "traced"),
         "path reparameterization of the unfolded trace (PathLayers, BatchNorms re-set)", writes=True),
    Pass("pbn", _pbn, ("gm", "reparam_report", "fold_report"), ("gm", "reparam_report", "pbn_layers"),
         "fuse path layers and their BatchNorms into P-BN", writes=True),
]}

PIPELINES: dict[str, list[str]] = {
    "prepare": ["trace", "shapes", "fold_bn"],
    "analyze": ["trace", "shapes", "fold_bn", "groups"],
    "balance": ["trace", "shapes", "fold_bn", "groups", "enorm", "final_bn"],
    "path": ["trace", "shapes", "fold_bn", "groups", "reparam", "pbn"],
}

# What a pipeline fixes: balance rewrites its own copy, so folding may reuse the layers; the path
# builder needs the unfolded trace (the path model keeps its BatchNorms).
PIPELINE_OPTIONS: dict[str, dict] = {
    "balance": {"reuse_layers": True},
    "path": {"keep_unfolded": True},
}


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        raise InputError(f"unknown pass '{name}' (passes: {', '.join(PASSES)})")
    return PASSES[name]


def pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise InputError(f"unknown pipeline '{name}' (pipelines: {', '.join(PIPELINES)})")
    return Pipeline(name, [PASSES[p] for p in PIPELINES[name]], dict(PIPELINE_OPTIONS.get(name, {})))


def run_pipeline(which: str, gm_or_model: nn.Module, example_inputs=None, copy: bool = True,
                 **options) -> PipelineResult:
    """Run the standard pipeline named ``which`` (``options`` may include a pass's own ``name``)."""
    return pipeline(which).run(gm_or_model, example_inputs, copy=copy, **options)


def run_pass(which: str, gm: nn.Module, example_inputs=None, **options) -> PipelineResult:
    return get_pass(which).run(gm, example_inputs, **options)


def prepare(model: nn.Module, example_inputs, leaf_modules=AUTO, train: bool = False,
            frontend: str = "fx") -> fx.GraphModule:
    """Trace ``model`` (in eval mode unless ``train``), annotate shapes, fold eval BatchNorms.

    The caller's model is not modified; the result may share untouched leaf modules with it: copy
    it before writing to it.
    """
    return run_pipeline("prepare", model, example_inputs, leaf_modules=leaf_modules, train=train,
                        frontend=frontend).gm
