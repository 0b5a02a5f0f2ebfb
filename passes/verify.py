"""Function-equivalence check of two models (DESIGN §5).

Both models run on float64 copies in eval mode, on the user's inputs and on random inputs
of the same shapes. Per output: the largest absolute difference and the relative error
``max|a - b| / max|a|`` (relative to the output's scale, as in ``passes.soundness``), with
the input and element where it is worst. ``compare`` is the engine, shared with the ONNX
check (torch vs onnxruntime in float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import InputError, PathfxError, ShapeError, VerificationError
from .modules import cast_floating, float64_copy
from .table import table


@dataclass
class OutputError:
    """The worst case of one output over all inputs."""
    output: int
    shape: tuple
    max_abs: float
    max_rel: float
    input: str  # label of the input where the relative error is largest
    index: tuple  # worst element (largest |a - b|) on that input
    a_value: float
    b_value: float
    note: str = ""  # a structural mismatch (shape, count, non-finite values)


@dataclass
class Verification:
    names: tuple[str, str]
    rtol: float
    atol: float
    inputs: list[str]
    outputs: list[OutputError] = field(default_factory=list)
    # outputs of the first model that vary across the inputs by no more than 10 × rtol of their
    # size: a rewrite that breaks the function could pass unseen (dead ReLUs at initialisation)
    insensitive: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self._passes(o) for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def _passes(self, o: OutputError) -> bool:
        return not o.note and (o.max_rel <= self.rtol or o.max_abs <= self.atol)

    def failures(self) -> list[OutputError]:
        return [o for o in self.outputs if not self._passes(o)]

    def __str__(self) -> str:
        a, b = self.names
        head = (f"{a} vs {b}: {len(self.outputs)} output(s) on {len(self.inputs)} input(s), "
                f"rtol {self.rtol:g}: {'ok' if self.ok else 'FAILED'}")
        rows = [[o.output, "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs:.2e}", f"{o.max_rel:.2e}",
                 o.input, "ok" if self._passes(o) else (o.note or "FAILED")] for o in self.outputs]
        note = f"\nnote: output(s) {', '.join(map(str, self.insensitive))} of {a} barely change from input to " \
               f"input (by ≤ 10 × rtol): this comparison checks little" if self.insensitive else ""
        return head + "\n" + table(["output", "shape", "max abs", "max rel", "worst input", "status"], rows) + note

    def diff(self) -> str:
        """The failing outputs, one paragraph each: which input, how far, the worst element."""
        a, b = self.names
        lines = []
        for o in self.failures():
            if o.note:
                lines.append(f"output {o.output}: {o.note} (input {o.input})")
                continue
            idx = ", ".join(map(str, o.index))
            lines.append(f"output {o.output} (shape {'x'.join(map(str, o.shape)) or 'scalar'}): max rel error "
                         f"{o.max_rel:.3e} > rtol {self.rtol:g} (max abs {o.max_abs:.3e}) on {o.input}\n"
                         f"  worst element [{idx}]: {a} = {o.a_value:.10g}, {b} = {o.b_value:.10g}")
        return "\n".join(lines)

    def raise_if_failed(self) -> "Verification":
        if not self.ok:
            a, b = self.names
            raise VerificationError(f"{a} and {b} differ beyond tolerance over {len(self.inputs)} input(s):\n"
                                    + self.diff())
        return self


# -- inputs -------------------------------------------------------------------------------------

def input_sets(inputs) -> list[tuple]:
    """One call's arguments (a Tensor, or a tuple of arguments), or a list of such tuples."""
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, list) and inputs and all(isinstance(x, tuple) for x in inputs):
        return [tuple(x) for x in inputs]
    if isinstance(inputs, (tuple, list)):
        return [tuple(inputs)]
    raise InputError(f"inputs must be a Tensor, a tuple of arguments or a list of tuples, "
                     f"got {type(inputs).__name__}")


def _placeholder_example(*models) -> tuple | None:
    """Zero inputs shaped like a GraphModule's placeholders, when shape propagation annotated them."""
    for m in models:
        if not isinstance(m, fx.GraphModule):
            continue
        metas = [n.meta.get("tensor_meta") for n in m.graph.nodes if n.op == "placeholder"]
        if metas and all(hasattr(t, "shape") for t in metas):
            return tuple(torch.zeros(t.shape, dtype=t.dtype) for t in metas)
    return None


def random_like(example: tuple, n: int, seed: int = 0) -> list[tuple]:
    """``n`` argument tuples: floating tensors replaced by standard normal ones, everything else as given."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
                  if torch.is_tensor(x) and x.is_floating_point() else x for x in example) for _ in range(n)]


def labelled_inputs(inputs, n_random: int, seed: int, *models) -> list[tuple[str, tuple]]:
    given = input_sets(inputs) if inputs is not None else []
    if not given:
        shapes = _placeholder_example(*models)
        if shapes is None:
            raise InputError("no inputs given and the models carry no input shapes: pass inputs=")
        return [(f"random input {i}", x) for i, x in enumerate(random_like(shapes, max(n_random, 1), seed))]
    labelled = [(f"input {i}" if len(given) > 1 else "the given input", x) for i, x in enumerate(given)]
    return labelled + [(f"random input {i}", x) for i, x in enumerate(random_like(given[0], n_random, seed))]


# -- comparison ---------------------------------------------------------------------------------

def _flat(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, (torch.Tensor, np.ndarray))]


def _one(i: int, label: str, x, y) -> OutputError:
    x = torch.as_tensor(x).double()
    y = torch.as_tensor(y).double()
    shape = tuple(x.shape)
    if x.shape != y.shape:
        return OutputError(i, shape, math.inf, math.inf, label, (), math.nan, math.nan,
                           note=f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.numel() == 0:
        return OutputError(i, shape, 0.0, 0.0, label, (), 0.0, 0.0)
    d = (x - y).abs()
    both_nan = x.isnan() & y.isnan()
    d = torch.where(both_nan, torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf))
    flat = int(torch.argmax(d))
    idx = tuple(int(k) for k in np.unravel_index(flat, shape)) if shape else ()
    ab = float(d.reshape(-1)[flat])
    scale = float(torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).max())
    rel = ab / scale if scale > 0 else (0.0 if ab == 0 else math.inf)
    note = "non-finite values differ" if ab == math.inf else \
        "NaN in both outputs: equal NaNs verify nothing" if bool(both_nan.any()) else ""
    return OutputError(i, shape, ab, rel, label, idx, float(x.reshape(-1)[flat]), float(y.reshape(-1)[flat]), note)


def run_checked(run, args, name, label):
    try:
        return run(args)
    except PathfxError:
        raise
    except Exception as e:  # the user's model or input: say which side failed on which input
        msg = str(e).strip().splitlines()
        shapes = ", ".join("x".join(map(str, x.shape)) for x in args if torch.is_tensor(x))
        raise ShapeError(f"{name} failed on {label} (shape {shapes}): {msg[0] if msg else type(e).__name__}") from None


def compare(run_a: Callable | dict, run_b: Callable, inputs: list[tuple[str, tuple]], rtol: float,
            atol: float = 0.0, names: tuple[str, str] = ("a", "b")) -> Verification:
    """Run both callables on every labelled input; keep each output's worst case.
    ``run_a`` may instead be the outputs already computed, by input label (a ``Reference``'s)."""
    res = Verification(names=names, rtol=rtol, atol=atol, inputs=[lbl for lbl, _ in inputs])
    worst: dict[int, OutputError] = {}
    first, varies = None, set()
    for label, args in inputs:
        xs = _flat(run_a[label] if isinstance(run_a, dict) else run_checked(run_a, args, names[0], label))
        ys = _flat(run_checked(run_b, args, names[1], label))
        first = xs if first is None else first
        varies |= {i for i, (x, x0) in enumerate(zip(xs, first)) if not _alike(x, x0, 10 * rtol)}
        if len(xs) != len(ys):
            worst[-1] = OutputError(-1, (), math.inf, math.inf, label, (), math.nan, math.nan,
                                    note=f"{names[0]} returns {len(xs)} outputs, {names[1]} {len(ys)}")
        for i, (x, y) in enumerate(zip(xs, ys)):
            e = _one(i, label, x, y)
            old = worst.get(i)
            if old is None or (e.note and not old.note) or (e.max_rel, e.max_abs) > (old.max_rel, old.max_abs):
                worst[i] = e
    res.outputs = [worst[k] for k in sorted(worst)]
    if len(inputs) > 1:
        res.insensitive = [i for i in range(len(first)) if i not in varies]
    return res


def _alike(x, x0, rtol: float) -> bool:
    """Within rtol of each other relative to x0's largest magnitude (non-float outputs: equal)."""
    if not (torch.is_tensor(x) and torch.is_tensor(x0)) or x.shape != x0.shape:
        return not torch.is_tensor(x) and x == x0
    if not x.is_floating_point() or not x.numel():
        return bool(torch.equal(x, x0))
    scale = float(x0.abs().max())
    return bool(((x - x0).abs() <= rtol * scale).all()) if math.isfinite(scale) else bool(torch.equal(x, x0))


def _float64(model: nn.Module) -> nn.Module:
    return float64_copy(model).eval()


def _runner(model: nn.Module, dtype: torch.dtype) -> Callable:
    def run(args):
        with torch.no_grad():
            return model(*cast_floating(args, dtype))
    return run


def verify(a: nn.Module, b: nn.Module, inputs=None, n_random: int = 8, rtol: float = 1e-10, seed: int = 0,
           atol: float = 0.0, names: tuple[str, str] = ("a", "b")) -> Verification:
    """Compare ``a`` and ``b`` in float64 (eval mode) on ``inputs`` and ``n_random`` random inputs.

    ``inputs``: a Tensor or a tuple of arguments (one call), or a list of tuples (several);
    None uses the input shapes recorded on a shape-annotated GraphModule. Neither model is
    modified: both run as float64 copies. An output passes when its relative error is
    ≤ ``rtol`` (or its absolute error ≤ ``atol``).
    """
    labelled = labelled_inputs(inputs, n_random, seed, a, b)
    return compare(_runner(_float64(a), torch.float64), _runner(_float64(b), torch.float64), labelled,
                   rtol=rtol, atol=atol, names=names)


@dataclass
class Reference:
    """A float64 model's outputs on labelled inputs, kept so that the model itself can be let go
    (``transform`` rewrites its own float64 copy in place and checks the result against these)."""
    inputs: list[tuple[str, tuple]]
    outputs: dict[str, object]


def reference(model: nn.Module, inputs=None, n_random: int = 8, seed: int = 0) -> Reference:
    """Outputs of ``model`` as it is (the caller makes it float64 and eval) on the inputs ``verify`` uses."""
    labelled = labelled_inputs(inputs, n_random, seed, model)
    labelled = [(lbl, cast_floating(args, torch.float64)) for lbl, args in labelled]
    run = _runner(model, torch.float64)
    return Reference(labelled, {lbl: run_checked(run, args, "original", lbl) for lbl, args in labelled})


def verify_reference(ref: Reference, model: nn.Module, rtol: float = 1e-10, atol: float = 0.0,
                     names: tuple[str, str] = ("original", "transformed")) -> Verification:
    """Compare a float64 eval-mode ``model`` (run as it is, not copied) with a ``Reference``."""
    return compare(ref.outputs, _runner(model, torch.float64), ref.inputs, rtol=rtol, atol=atol, names=names)
