"""Property-based fuzzing over random small DAG models (tests/fuzz_models.py), in float64.

Each property runs twice: a fixed-seed run with a small budget (the default suite) and a
`slow`-marked run with ten times the examples (the soundness property: 10,000 models) and fresh
random draws (`pytest -m slow`).
A failing example is printed as the ``FuzzNet(...)`` code that rebuilds it.
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings

import pathfx
from fuzz_models import NOT_RELU, FuzzNet, fuzz_nets
from passes.enorm import balance
from passes.errors import PathfxError
from passes.fold import fold
from passes.fold_bn import BATCHNORMS
from passes.groupset import apply_factors
from passes.onnx_export import fold_for_export
from passes.pathnorm import path_norm
from passes.reparam import SHARED_BN
from passes.soundness import check_soundness, outputs, random_factors, rel_error
from pathfx.nn import PBN, PathLayer

settings.register_profile("fuzz", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.data_too_large])
settings.register_profile("fuzz-slow", settings.get_profile("fuzz"), derandomize=False)
SLOW = 10  # the slow profile's examples per default example


def fuzz(max_examples, strategy=None, slow_examples=None):
    """(default test, slow test) of one property body."""
    strategy = strategy if strategy is not None else fuzz_nets()

    def make(body):
        fast = settings(settings.get_profile("fuzz"), max_examples=max_examples)(given(strategy)(body))
        slow = settings(settings.get_profile("fuzz-slow"), max_examples=slow_examples or max_examples * SLOW)(
            given(strategy)(body))
        return fast, pytest.mark.slow(slow)
    return make


def _eval(net):
    return copy.deepcopy(net).eval()


# -- (a) every free variable the analysis reports can be rescaled --------------------------------

def _soundness(net):
    x = net.example()
    g = pathfx.find_groups(net, x)
    event("free variables" if g.num_free else "no free variable")
    res = check_soundness(g, x, reinit=True)
    assert res.ok, (res, str(g))
    # widths add up, and every consumer column maps to a variable of its group
    assert g.num_free == sum(len({v for p in gr.producers for v in p.out_vars if v >= 0}) for gr in g.groups)
    assert all(max(c.in_vars) < gr.width for gr in g.groups for c in gr.consumers)
    if net.training:  # analysed as it trains: BatchNorms are barriers, the output uses batch statistics
        gt = pathfx.find_groups(net, x, train=True)
        m = gt.module
        assert m.training
        ref = outputs(m, [x])
        apply_factors(m, gt, random_factors(gt, seed=1))
        rel, _ = rel_error(ref, outputs(m, [x]))
        assert rel <= 1e-10, (rel, str(gt))


test_soundness, test_soundness_slow = fuzz(300, slow_examples=10_000)(_soundness)


# -- (b), (c) transform verifies in both modes and keeps the ℓ1 path-norm ------------------------

def _transform(net):
    x = net.example()
    shape = (1,) + net.in_shape
    state = copy.deepcopy(net.state_dict())
    refused = [name for key, name in NOT_RELU.items() if net.uses(key)]
    if refused:  # not a ReLU network: path_norm must say which op it is
        with pytest.raises(PathfxError) as err:
            path_norm(net, shape)
        assert any(name in str(err.value) for name in refused), (str(err.value), refused)
        before = None
    else:
        before = path_norm(net, shape)
        if before == 0:  # no path from the input reaches an output: the output is a constant
            ev = _eval(net)
            other = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(net.seed))
            assert all(torch.equal(a, b) for a, b in zip(outputs(ev, [x]), outputs(ev, [other])))
            event("path-norm 0: the output does not depend on the input")
        assert before >= 0
    event("path-norm refused" if refused else "path-norm compared")
    for mode in ("balance", "path"):
        r = pathfx.transform(net, x, mode=mode, **({"cycles": 3} if mode == "balance" else {}))
        if mode == "path" and SHARED_BN in r.report.weight_space:
            event("path form: groups of a layer feeding a BN and other nodes kept in weight space")
        assert r.verification.ok and r.verification.max_rel <= 1e-10, str(r.verification)
        if before is not None:
            after = path_norm(r.model, shape)
            assert abs(after - before) <= 1e-10 * before, (mode, before, after)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # the caller's model is untouched


test_transform, test_transform_slow = fuzz(120)(_transform)


# -- (d) ENorm: the objective never increases; the balanced point does not depend on the start ---

def _enorm(net):
    x = net.example()
    g = pathfx.find_groups(net, x)
    assume(g.num_free > 0)
    balanced, report = pathfx.enorm(net, x, cycles=3)
    obj = report.objective
    assert len(obj) == 4 and all(b <= a * (1 + 1e-12) for a, b in zip(obj, obj[1:])), obj
    assert pathfx.verify(_eval(net), balanced, x).ok
    m0 = copy.deepcopy(g.source)
    r0 = balance(m0, g, tol=1e-15, max_cycles=10_000)
    assert r0.converged, r0.cycles
    event(f"dead channels: {'none' if not r0.dead else 'some'}")
    event(f"cycles to converge: {'< 100' if r0.cycles < 100 else '< 1000' if r0.cycles < 1000 else '≥ 1000'}")
    for seed in (1, 2):  # two random rescalings of the original weights
        factors = random_factors(g, seed)
        for d in r0.dead:  # a dead variable (L or R = 0) keeps its start, and the balanced point depends on it
            factors[d.group][d.variables] = 1.0
        m = copy.deepcopy(g.source)
        apply_factors(m, g, factors)
        rep = balance(m, g, tol=1e-15, max_cycles=10_000)
        assert rep.converged, rep.cycles
        assert all(b <= a * (1 + 1e-12) for a, b in zip(rep.objective, rep.objective[1:]))
        assert [(d.group, d.variables) for d in rep.dead] == [(d.group, d.variables) for d in r0.dead]
        assert rep.after == pytest.approx(r0.after, rel=1e-10)
        for (name, a), b in zip(m0.named_parameters(), m.parameters()):
            assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (name, r0.cycles, rep.cycles)


test_enorm, test_enorm_slow = fuzz(120)(_enorm)


# -- (e) the eval-mode P-BN model folds to plain layers with identical outputs --------------------

@torch.no_grad()
def _perturb(pm, x, seed):
    """Move V, BN statistics and affine, and λ away from the function-preserving values."""
    g = torch.Generator().manual_seed(seed)
    pm.train()
    for _ in range(2):
        pm(torch.randn(x.shape, generator=g, dtype=x.dtype))
    for p in pm.parameters():
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in pm.modules():
        if isinstance(m, PBN):
            m.lam.fill_(float(torch.rand(1, generator=g)) + 0.1)
    pm.eval()


def _fold(net):
    x = net.example()
    pm = pathfx.transform(net, x, mode="path").model
    assert any(isinstance(m, PBN) for m in pm.modules())  # the strategy's closing layer-BN-ReLU-layer-BN
    ref = outputs(_eval(net), [x])
    for step in ("preserved", "perturbed"):
        if step == "perturbed":
            _perturb(pm, x, net.seed)
            ref = outputs(pm.eval(), [x])
        plain = fold(pm)
        assert not any(isinstance(m, (PathLayer, PBN) + BATCHNORMS) for m in plain.modules())
        assert rel_error(ref, outputs(plain, [x]))[0] <= 1e-10, step
        exported, names = fold_for_export(pm)
        assert names and not any(isinstance(m, (PathLayer, PBN)) for m in exported.modules())
        assert rel_error(ref, outputs(exported, [x]))[0] <= 1e-10, step


test_fold, test_fold_slow = fuzz(80, fuzz_nets(pbn=True))(_fold)


# -- (f) ONNX export matches onnxruntime ---------------------------------------------------------

def _onnx(net):
    x = net.example()
    with tempfile.TemporaryDirectory(prefix="fuzz-onnx-") as d:
        def export(name, model):
            return pathfx.export_onnx(model.float(), os.path.join(d, f"{name}.onnx"), x.float(), exporter="torchscript")

        try:
            export("original", _eval(net))
        except PathfxError as e:
            # What torch.onnx or onnxruntime cannot do with the model itself is no finding about pathfx
            # (adaptive max pooling over uneven windows, an uneven split, a sigmoid saturated to 1e-8,
            # which onnxruntime approximates); a rewritten model must export whenever the original does.
            event(f"the original does not export: {type(e).__name__}")
            assume(False)
        models = {"balanced": pathfx.transform(net, x, mode="balance", cycles=3).model,
                  "path": pathfx.transform(net, x, mode="path").model}
        for name, m in models.items():
            r = export(name, m)
            assert r.verification.ok and r.max_rel <= 1e-4, (name, str(r.verification))


test_onnx, test_onnx_slow = fuzz(50)(_onnx)


# -- (g) the export front end finds the groups symbolic tracing finds -----------------------------

def _export(net):
    # eval mode only (the export front end's), and no submodule that branches on a tensor's values, even
    # on a dead branch (torch.export runs the whole forward): it refuses what fx keeps opaque
    assume(not net.training and not any(s.startswith("DataGate") for s in net.specs))
    x = net.example()
    fx_groups = pathfx.find_groups(net, x)
    ex = pathfx.find_groups(net, x, frontend="export")
    assert _live(ex) == _live(fx_groups), (str(fx_groups), str(ex))
    assert check_soundness(ex, x, reinit=True).ok


def _live(groups) -> int:
    """Free variables of groups that some layer reads. A free group that none reads reaches no output:
    dead code, which fx keeps where a shape check reads it (timm's ``_assert(x.ndim == 4)``) and
    torch.export drops."""
    return sum(g.width for g in groups.groups if g.consumers)


test_export, test_export_slow = fuzz(40)(_export)


# -- the strategy itself -----------------------------------------------------------------------

def test_strategy_coverage_and_printed_code():
    # Guards against a strategy that draws only trivial models or never reaches part of the op table,
    # and checks that a failing example, as printed, rebuilds the model that failed.
    nets = []

    @settings(settings.get_profile("fuzz"), max_examples=400)
    @given(fuzz_nets())
    def collect(net):
        nets.append((net, pathfx.find_groups(net, net.example()).num_free))
        again = eval(repr(net), {"FuzzNet": FuzzNet})  # the printed code rebuilds the same model
        assert again.training == net.training
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())

    collect()
    assert sum(n > 0 for _, n in nets) >= 0.75 * len(nets), (sum(n > 0 for _, n in nets), len(nets))
    features = set().union(*(net.features() for net, _ in nets))
    # one of each group must occur (hypothesis draws many near-duplicates: not every rare spelling shows)
    required = ["nn.Conv2d", "depthwise", "grouped", "dilated", "padding_mode", "no-bias", "nn.Linear", "shared",
                "relu relu_method nn.ReLU", "leaky nn.LeakyReLU", "nn.PReLU", "nn.Identity",
                "gelu nn.GELU tanh nn.Tanh relu6 nn.ReLU6 sigmoid nn.ConvTranspose2d", "nn.LayerNorm",
                "maxpool nn.MaxPool2d", "avgpool nn.AvgPool2d", "nn.AdaptiveMaxPool2d nn.AdaptiveAvgPool2d",
                "gap mean amax", "nn.BatchNorm2d nn.BatchNorm1d", "train", "eval-bn", "add sub", "learned", "cat",
                "slice chunk split", "gate fgate", "flatten view nn.Flatten", "scale div neg", "shift", "pad",
                "nearest bilinear", "relu_ relu_inplace iadd", "pw", "BNActReLU", "BNActSiLU", "FrozenBN", "Blur",
                "FLinear", "ghost", "partial", "DataGate"]
    missing = [r for r in required if not features & set(r.split())]
    assert not missing, missing
