"""Which submodule's traced graph does not compute what its forward computes.

The lockstep run of ``passes.replay`` compares the model's outputs with the graph's. When they differ
and the trace was made with automatic leaves, ``retrace_around`` looks for the submodule to blame:
the model runs once more with the calls of every module the trace went through recorded (inputs
and output), and the graph runs once keeping the values of the nodes the trace noted for each such
call (``gm.meta["module_calls"]``). The first call to complete (inner calls complete first) whose
inputs in the graph equal the recorded ones while its output does not is the culprit: that
submodule becomes an opaque leaf and the model is traced again. The pipeline checks the new graph
as it checked the first, so a wrong guess costs one more trace, never a wrong graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .replay import _Eval, mismatch
from .trace import AUTO, trace_in_mode

DIFFERS = "its traced graph does not compute what its forward computes"


def _clone(value) -> list:
    return [t.detach().clone() if isinstance(t, torch.Tensor) else None for t in tree_leaves(value)]


def _eager_calls(model, names: set, args: tuple) -> dict[str, list]:
    """{qualified name: [(inputs, output), ...] per call, in call order} over one eager forward."""
    found: dict[str, list] = {q: [] for q in names}
    modules = {q: model.get_submodule(q) for q in names}
    with _Eval(list(model.modules())), torch.no_grad():  # hooks registered here are dropped on exit
        for q, m in modules.items():
            m.register_forward_pre_hook(lambda mod, a, kw, q=q: found[q].append([_clone((a, kw)), None]),
                                        with_kwargs=True)
            m.register_forward_hook(lambda mod, a, kw, out, q=q: found[q][-1].__setitem__(1, _clone(out)),
                                    with_kwargs=True)
        model(*[a.clone() for a in args])
    return found


class _Keep(fx.Interpreter):
    """Runs the graph and keeps a copy of the named nodes' values as they are produced."""

    def __init__(self, gm, names: set):
        super().__init__(gm)
        self.names, self.kept = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.kept[n.name] = _clone(out)
        return out


def _agree(want: list, names: list, kept: dict) -> bool | None:
    """Do the graph's values (by node name) equal the recorded tensors? None when they cannot be compared."""
    if len(want) != len(names):
        return None
    pairs = [(w, kept.get(n)) for w, n in zip(want, names) if w is not None and n is not None]
    if not pairs or any(g is None or len(g) != 1 or g[0] is None for _, g in pairs):
        return None
    return not mismatch([w for w, _ in pairs], [g[0] for _, g in pairs])


def culprit(model, gm: fx.GraphModule, args: tuple) -> tuple[str, str] | None:
    """(qualified name, how its output differs) of the submodule to blame, or None."""
    calls = gm.meta.get("module_calls") or []
    if not calls:
        return None
    eager = _eager_calls(model, {q for q, _, _ in calls}, args)
    names = {n for _, ins, outs in calls for n in ins + outs if n is not None}
    keep = _Keep(gm, names)
    with _Eval(list(gm.modules())), torch.no_grad():
        keep.run(*[a.clone() for a in args])
    seen: dict[str, int] = {}
    for q, ins, outs in calls:  # in completion order, as the eager calls
        k = seen[q] = seen.get(q, -1) + 1
        if k >= len(eager[q]) or eager[q][k][1] is None:
            continue
        want_in, want_out = eager[q][k]
        if _agree(want_in, ins, keep.kept) and _agree(want_out, outs, keep.kept) is False:
            got = [keep.kept[n][0] for w, n in zip(want_out, outs) if w is not None and n is not None]
            return q, mismatch([w for w in want_out if w is not None], got)
    return None


def retrace_around(model, gm: fx.GraphModule, example_inputs) -> fx.GraphModule | None:
    """The model traced again with the submodule to blame for ``gm``'s difference from the forward kept
    opaque, when ``gm`` was traced with automatic leaves and the culprit is found; else None."""
    leaves = gm.meta.get("leaves")
    if not leaves or not leaves["auto"]:
        return None
    args = tuple(example_inputs)
    found = culprit(model, gm, args)
    if found is None or found[0] in leaves["opaque"]:
        return None
    name, how = found
    opaque = {**leaves["opaque"], name: f"{DIFFERS} ({how})"}
    return trace_in_mode(model, (AUTO, *leaves["chosen"]), gm.training, opaque=opaque, inputs=leaves["inputs"])
