"""The traced graph checked against the model's own forward, in one real run that also gives the shapes.

torch.fx records what a forward does to proxies, which is not always what it computes: an in-place
write to a tensor that another name also refers to (``z = y.view(...)``, then ``y *= 2``) or control
flow on tensor values is lost. So the model runs once, eagerly, and the graph runs once on real
tensors; their outputs must agree.

Running the graph would cost a second forward. It does not need to: the graph's leaf modules are the
model's own modules, so while the model runs, every call of a leaf module records its inputs and its
output. When the graph calls that module with *the same values*, the recorded output is what the
call would compute, and the graph takes it; only the operations between modules (adds, reshapes,
concatenations) run again. The graph runs in lockstep with the model: after each module call of the
model it advances as far as the calls recorded so far allow, so a recorded output is taken while it
is fresh and nothing is kept alive longer than the model itself keeps it. "The same values" is
decided without trusting the trace:

- the graph's input tensor is the very tensor object the eager call received and neither has been
  written to since (``Tensor._version``, shared by every view of a storage), or else it compares
  equal (``torch.equal``) to the recorded input, which has not been written to since;
- the recorded output has not been written to since the call (an eager ``out += identity`` after the
  call changes it; then the graph computes the call itself).

A call that fails either test runs for real, so a graph that lost a write computes the wrong values
downstream and the final comparison catches it. Should the model write in place into a tensor the
graph still holds (``Tensor._version`` again), the graph is run once more on its own. Modules must be
functions of their inputs (eval mode, no randomness), which is what an analysis in eval mode assumes
anyway.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_leaves

from .errors import GraphMismatch, TraceError


@dataclass
class _Call:
    inputs: list  # flattened positional and keyword arguments
    versions: list  # Tensor._version of each tensor input when the call began
    output: object = None
    out_versions: list = field(default_factory=list)


def _version(t) -> int | None:
    return t._version if isinstance(t, torch.Tensor) else None


class Recording:
    """The calls of ``modules`` during one forward, per module in call order."""

    def __init__(self, modules, on_call=None):
        self.modules = {id(m): m for m in modules}
        self.calls: dict[int, list[_Call]] = {k: [] for k in self.modules}
        self.completed: dict[int, int] = {k: 0 for k in self.modules}  # calls whose output is recorded
        self._open: dict[int, list[_Call]] = {k: [] for k in self.modules}
        self._used: dict[int, int] = {k: 0 for k in self.modules}
        self.on_call = on_call  # called after each recorded call (the lockstep's advance)
        self.paused = False  # the graph itself is calling modules: those calls are not the model's

    def hooks(self):
        def pre(mod, args, kwargs):
            if self.paused:
                return
            flat = tree_leaves((args, kwargs))
            call = _Call(flat, [_version(t) for t in flat])
            self.calls[id(mod)].append(call)
            self._open[id(mod)].append(call)

        def post(mod, args, kwargs, out):
            if self.paused:
                return
            call = self._open[id(mod)].pop()
            call.output = out
            call.out_versions = [_version(t) for t in tree_leaves(out)]
            self.completed[id(mod)] += 1
            if self.on_call is not None:
                self.on_call()

        return pre, post

    def waiting(self, mod) -> bool:
        """Has the model not yet made the call of ``mod`` that the graph's next call would take?"""
        key = id(mod)
        return key in self.calls and self.completed[key] <= self._used[key]

    def take(self, mod, args, kwargs, seen: dict):
        """The output recorded for this call of ``mod`` (the next one in order) if it holds for these
        arguments, else None. ``seen``: the version of each of the graph's tensors as the graph last
        left it (the model may have written into one since, as an in-place activation does)."""
        key = id(mod)
        if key not in self.calls:
            return None
        i = self._used[key]
        self._used[key] = i + 1
        if i >= self.completed[key]:
            return None
        call = self.calls[key][i]
        self.calls[key][i] = None  # taken: the recording keeps it alive no longer
        outs = tree_leaves(call.output)
        if any(_version(t) != v for t, v in zip(outs, call.out_versions)):
            return None
        if not any(isinstance(t, torch.Tensor) for t in outs):
            return None
        flat = tree_leaves((args, kwargs))
        if len(flat) != len(call.inputs):
            return None
        for got, want, v in zip(flat, call.inputs, call.versions):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    return None
                if got is want and seen.get(id(got), got._version) == v:
                    continue  # the very tensor the model's call read, as it was then
                if want._version != v or got._version != seen.get(id(got), got._version):
                    return None
                if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
                    return None
            elif isinstance(got, torch.Tensor) or not _same(got, want):
                return None
        return call.output


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value without a plain equality: not the same for our purpose
        return False


def _tensors(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def mismatch(want: list, got: list) -> str:
    """How two lists of output tensors differ ('' when they agree; NaN matches NaN)."""
    if len(want) != len(got):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i}: other values"
            continue
        tol = 1e-10 if a.dtype == torch.float64 else 1e-4
        finite = a[a.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        same = ((a - b).abs() <= tol * max(scale, 1e-30)) | (a == b) | (a.isnan() & b.isnan())
        if not bool(same.all()):
            return f"output {i}: values off by up to {float((a - b).abs()[~same].max()):.3g}"
    return ""


class _Eval:
    """Every module of ``mods`` in eval mode with its hooks set aside, restored on exit: nothing of
    the caller's model changes, and the caller's loggers and counters do not fire."""

    def __init__(self, mods):
        self.mods = mods

    # Written straight into each module's __dict__: nn.Module.__setattr__ checks every value against
    # Parameter and Module, which over thousands of modules costs more than a forward.
    def __enter__(self):
        self.saved = [(m, {a: m.__dict__[a] for a in _STATE if a in m.__dict__}) for m in self.mods]
        for m, saved in self.saved:
            d = m.__dict__
            d["training"] = False
            for a in _HOOKS:
                if a in saved:
                    d[a] = type(saved[a])()
        return self

    def __exit__(self, *exc):
        for m, saved in self.saved:
            m.__dict__.update(saved)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called")
_STATE = ("training",) + _HOOKS


class Abandon(Exception):
    """The lockstep run cannot go on: ``wrote`` (the graph wrote into a tensor of the model's) or
    ``stale`` (the model wrote into a tensor the graph still reads)."""


class Lockstep:
    """Runs ``prop`` (an fx Interpreter over the traced graph) alongside the model's eager forward:
    ``execute`` is its node step; ``advance`` runs nodes until the next module call the model has
    not made yet."""

    def __init__(self, prop, rec: Recording, args: tuple):
        self.prop, self.rec, self.nodes, self.i = prop, rec, list(prop.graph.nodes), 0
        prop.env, prop.args_iter = {}, iter(args)
        self.eager_done = False
        self.error: Exception | None = None
        self.abandoned = ""  # why, when the lockstep run stopped early
        self.output = None
        self.seen: dict[int, int] = {}  # id -> version of each tensor as the graph last left it
        self.borrowed: list = []  # weak references to the model's tensors the graph took

    def advance(self) -> None:
        if self.error is not None or self.abandoned or self.i == len(self.nodes):
            return
        prop = self.prop
        self.rec.paused = True
        try:
            while self.i < len(self.nodes):
                n = self.nodes[self.i]
                if n.op == "call_module" and not self.eager_done and self.rec.waiting(prop.submodules[n.target]):
                    return
                prop.env[n] = prop.run_node(n)
                for used in prop.user_to_last_uses.get(n, ()):
                    del prop.env[used]
                self.i += 1
                if n.op == "output":
                    self.output = prop.env[n]
        except Abandon as e:
            self.abandoned = str(e)
        except Exception as e:  # raised again once the model has returned, not through its forward
            self.error = e
        finally:
            self.rec.paused = False

    def execute(self, n):
        prop = self.prop
        with prop._set_current_node(n):
            args, kwargs = prop.fetch_args_kwargs_from_env(n)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if n.op == "call_module":
            out = self.rec.take(prop.submodules[n.target], args, kwargs, self.seen)
            if out is not None:
                outs = _tensors(out)
                self.borrowed += [weakref.ref(t) for t in outs]
                self._saw(outs)
                return out
        if any(t._version != self.seen.get(id(t), t._version) for t in tensors):
            raise Abandon("stale")
        before = [t._version for t in tensors]
        out = getattr(prop, n.op)(n.target, args, kwargs)
        written = [t for t, v in zip(tensors, before) if t._version != v]
        if written and self._borrowed(written):
            raise Abandon("wrote")
        self._saw(tensors)
        self._saw(_tensors(out))
        return out

    def _saw(self, tensors) -> None:
        for t in tensors:
            self.seen[id(t)] = t._version

    def _borrowed(self, written) -> bool:
        """Does one of the tensors the graph just wrote into share memory with a tensor of the model's?"""
        mine = {_storage(t) for t in written}
        return any(t is not None and _storage(t) in mine for t in (r() for r in self.borrowed))


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # a tensor without storage (sparse, meta subclasses): never the model's
        return -1


def run_checked(model, gm: fx.GraphModule, prop, args: tuple):
    """Run ``model`` eagerly and ``prop`` (a ``passes.shapes`` interpreter over ``gm``) in lockstep;
    returns the graph's output after checking it against the model's (TraceError when they differ)."""
    leaves = {id(m): m for n in gm.graph.nodes if n.op == "call_module" for m in [gm.get_submodule(n.target)]}
    rec = Recording(leaves.values())
    step = Lockstep(prop, rec, tuple(a.clone() for a in args))
    rec.on_call = step.advance
    pre, post = rec.hooks()
    mods = list({id(m): m for m in [*model.modules(), *gm.modules()]}.values())
    with _Eval(mods), torch.no_grad():
        prop.lockstep = step
        handles = [h for m in leaves.values() for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                                        m.register_forward_hook(post, with_kwargs=True))]
        try:
            want = _tensors(model(*[a.clone() for a in args]))
        except Exception:  # the graph's own run names the node that fails
            want = None
        finally:
            for h in handles:
                h.remove()
        step.eager_done = True
        step.advance()
        prop.lockstep = None
        if step.error is not None and want is not None:
            raise step.error
        if step.abandoned == "wrote":  # the model's run is no reference any more: both run again, apart
            want = _tensors(model(*[a.clone() for a in args]))
        if want is None or step.abandoned:
            out = prop.run(*[a.clone() for a in args])
        else:
            out = step.output
    if want is not None:
        compare(model, want, out, args)
    return out


def compare(model, want: list, got_out, args: tuple) -> None:
    """Raise TraceError when the graph's outputs ``got_out`` differ from the model's ``want``."""
    bad = mismatch(want, _tensors(got_out))
    if not bad:
        return
    with _Eval(list(model.modules())), torch.no_grad():
        again = _tensors(model(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
    if mismatch(want, again):
        raise TraceError(f"{type(model).__name__} gives different outputs on two calls with the same "
                         f"input in eval mode (random operations in its forward?): it is not a function "
                         f"of its input, and no rewrite of it can be verified")
    raise GraphMismatch(
        f"the traced graph of {type(model).__name__} does not compute what its forward computes "
        f"({bad}): torch.fx does not capture an in-place write to a tensor that another "
        f"name also refers to (a view, a slice, an alias), nor control flow on tensor values; write "
        f"that operation out of place, or keep its submodule opaque with leaf_modules=[...] (\"auto\" "
        f"does so where it can tell which submodule differs)")


