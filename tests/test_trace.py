"""Front end: tracing errors, spelling normalisation, and the caller's model left untouched."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pathfx import find_groups
from passes.errors import ShapeError, TraceError
from passes.soundness import check_soundness
from passes.trace import trace


def inp(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (2, 3, 6, 6)), generator=g, dtype=torch.float64)


class Body(nn.Module):
    def __init__(self, fn, mods=None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.fn = fn
        self.mods = nn.ModuleDict(mods or {})

    def forward(self, x):
        return self.fn(self, self.c1(x), self.c2(torch.relu(self.c1(x))))


def calls(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def modules_called(gm):
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


RELU = {
    "F.relu": (lambda s, a, b: F.relu(a) + b, None),
    "F.relu-inplace": (lambda s, a, b: F.relu(a, inplace=True) + b, None),
    "torch.relu": (lambda s, a, b: torch.relu(a) + b, None),
    "torch.relu_": (lambda s, a, b: torch.relu_(a) + b, None),
    "method": (lambda s, a, b: a.relu() + b, None),
    "method-inplace": (lambda s, a, b: a.relu_() + b, None),
    "nn.ReLU": (lambda s, a, b: s.mods["r"](a) + b, {"r": nn.ReLU()}),
    "nn.ReLU-inplace": (lambda s, a, b: s.mods["r"](a) + b, {"r": nn.ReLU(inplace=True)}),
}


@pytest.mark.parametrize("name", sorted(RELU))
def test_relu_spellings(name):
    fn, mods = RELU[name]
    model = Body(fn, mods).double().eval()
    x = inp()
    ref = model(x)
    gm = trace(model)
    targets = calls(gm)
    assert targets.count(torch.relu) == 2, gm.graph  # the body's and this spelling's
    assert not any(t in (F.relu, torch.relu_, "relu", "relu_") for t in targets)
    assert nn.ReLU not in modules_called(gm)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


ADD = {
    "operator.add": lambda s, a, b: a + b,
    "torch.add": lambda s, a, b: torch.add(a, b),
    "method.add": lambda s, a, b: a.add(b),
    "method.add_": lambda s, a, b: a.clone().add_(b),
    "iadd": lambda s, a, b: _iadd(a, b),
}


def _iadd(a, b):
    a += b
    return a


@pytest.mark.parametrize("name", sorted(ADD))
def test_add_spellings(name):
    model = Body(ADD[name]).double().eval()
    x = inp()
    ref = model(x)
    gm = trace(model)
    targets = calls(gm)
    assert targets.count(operator.add) == 1, gm.graph
    assert not any(t in (torch.add, "add", "add_", operator.iadd) for t in targets)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("op,spellings", [
    (operator.sub, [lambda a, b: a - b, lambda a, b: torch.sub(a, b), lambda a, b: a.sub(b)]),
    (operator.mul, [lambda a, b: a * b, lambda a, b: torch.mul(a, b), lambda a, b: a.mul(b)]),
])
def test_sub_mul_spellings(op, spellings):
    x = inp()
    for spell in spellings:
        model = Body(lambda s, a, b, f=spell: f(a, b)).double().eval()
        gm = trace(model)
        assert calls(gm).count(op) == 1, gm.graph
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


FLATTEN = {
    "torch.flatten": lambda s, a, b: torch.flatten(b, 1),
    "method.flatten": lambda s, a, b: b.flatten(1),
    "view-size": lambda s, a, b: b.view(b.size(0), -1),
    "view-shape": lambda s, a, b: b.view(b.shape[0], -1),
    "reshape": lambda s, a, b: b.reshape(b.size(0), -1),
    "torch.reshape": lambda s, a, b: torch.reshape(b, (b.shape[0], -1)),
    "nn.Flatten": lambda s, a, b: s.mods["f"](b),
}


@pytest.mark.parametrize("name", sorted(FLATTEN))
def test_flatten_spellings(name):
    model = Body(FLATTEN[name], {"f": nn.Flatten()}).double().eval()
    x = inp()
    gm = trace(model)
    flat = [n for n in gm.graph.nodes if n.target is torch.flatten]
    assert len(flat) == 1 and flat[0].args[1:] == (1,) and not flat[0].kwargs, gm.graph
    assert not any(t in ("view", "reshape", torch.reshape, "flatten", "size") for t in calls(gm))
    assert nn.Flatten not in modules_called(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


INPLACE_DISCARDED = {
    "method.relu_": lambda s, a, b: (a.relu_(), a + b)[1],
    "F.relu-inplace": lambda s, a, b: (F.relu(a, inplace=True), a + b)[1],
    "nn.ReLU-inplace": lambda s, a, b: (s.mods["r"](a), a + b)[1],
    "method.add_": lambda s, a, b: (a.add_(b), torch.relu(a))[1],
    "method.mul_": lambda s, a, b: (b.mul_(a), b - a)[1],
}


@pytest.mark.parametrize("name", sorted(INPLACE_DISCARDED))
def test_inplace_result_discarded(name):
    # The in-place op's own result is unused; later reads of its argument must see the new value.
    model = Body(INPLACE_DISCARDED[name], {"r": nn.ReLU(inplace=True)}).double().eval()
    x = inp()
    gm = trace(model)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    g = find_groups(model, x)
    assert check_soundness(g, x).ok


def test_partial_flatten_is_not_rewritten():
    # flatten(2) keeps channels apart; view(-1, n) mixes the batch: neither is a flatten from dim 1.
    model = Body(lambda s, a, b: b.flatten(2).sum(-1) + a.view(-1, 36)[: b.shape[0] * 4].view(b.shape[0], 4, 36)
                 .sum(-1)).double().eval()
    x = inp()
    gm = trace(model)
    assert torch.flatten not in calls(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


# -- errors ------------------------------------------------------------------------------------

class DataDependent(nn.Module):
    def forward(self, y):
        if y.sum() > 0:
            return y
        return -y


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.block = nn.Sequential(nn.Identity(), DataDependent())
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.block(torch.relu(self.c1(x))))


def test_untraceable_submodule_error():
    with pytest.raises(TraceError) as e:
        find_groups(WithGate(), inp(), leaf_modules=())
    msg = str(e.value)
    assert "submodule 'block.1' (DataDependent)" in msg
    assert "if y.sum() > 0:" in msg and __file__ in msg
    assert "leaf_modules=['block.1']" in msg and '"auto"' in msg


def test_auto_leaves_keep_the_untraceable_submodule_opaque():
    x = inp()
    model = WithGate().double()
    g = find_groups(model, x)  # leaf_modules="auto" is the default
    assert [(b.module, b.op) for b in g.opaque] == [("block.1", "DataDependent")]
    assert g.opaque[0].reason == "opaque leaf: could not be traced: symbolically traced variables cannot be used " \
                                 "as inputs to control flow"
    assert g.groups == [] and g.num_frozen == 4 + 2
    assert any("opaque leaf: could not be traced" in f.reason and f.layers == ["c1.weight"] for f in g.frozen)
    text = str(g)
    assert "opaque leaf" in text and "block.1" in text and "DataDependent" in text
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["c1", "block.1", "c2"]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class TwoGates(nn.Module):
    """Free groups on both sides of two untraceable submodules, one nested in a traced block."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1)
        self.gate = DataDependent()
        self.block = nn.Sequential(nn.Conv2d(5, 5, 1), nn.ReLU(), DataDependent())

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x)))
        return self.c3(self.block(torch.relu(h)) + self.gate(h))


def test_auto_leaves_retry_until_the_trace_succeeds():
    x = inp()
    model = TwoGates().double()
    g = find_groups(model, x)
    assert sorted(b.module for b in g.opaque) == ["block.2", "gate"]
    # c1 → c2 stays free; c2's channels reach the gate and block.0's reach block.2: frozen
    assert g.num_free == 4 and check_soundness(g, x, reinit=True).ok
    assert {f.layers[0] for f in g.frozen if "could not be traced" in f.reason} == {"c2.weight", "block.0.weight"}
    with pytest.raises(TraceError, match="submodule 'gate'"):
        find_groups(model, x, leaf_modules=["block.2"])  # an explicit list: only those
    both = find_groups(model, x, leaf_modules=["auto", "block.2"])
    assert [(b.module, b.reason) for b in both.opaque if b.module == "block.2"] == \
        [("block.2", "opaque leaf: kept opaque by leaf_modules")]
    assert both.num_free == g.num_free


class Shares(nn.Module):
    """A conv used by the traced graph and, inside, by an untraceable submodule."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.gate = Gated(self.c2)
        self.c3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c3(torch.relu(self.c2(h)) + self.gate(h))


class Gated(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, y):
        return self.conv(y) if y.sum() > 0 else -self.conv(y)


def test_a_parameter_an_opaque_leaf_shares_is_not_rescaled():
    x = inp()
    g = find_groups(Shares().double(), x)
    assert [b.module for b in g.opaque] == ["gate"]
    assert not any(p.weight == "c2.weight" for gr in g.groups for p in gr.producers)
    assert not any(c.weight == "c2.weight" for gr in g.groups for c in gr.consumers)
    assert check_soundness(g, x, reinit=True).ok


class AliasWrite(nn.Module):
    """An in-place write through a view, inside a submodule: fx traces it out of place."""

    def forward(self, y):
        z = y.view(y.shape)
        y.mul_(2)
        return torch.relu(z)


class WithAliasWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.block = nn.Sequential(nn.Identity(), AliasWrite())

    def forward(self, x):
        return self.c2(self.block(self.c1(x)))


def test_auto_leaves_make_the_submodule_whose_graph_differs_opaque():
    x = inp()
    model = WithAliasWrite().double()
    g = find_groups(model, x)
    assert [b.module for b in g.opaque] == ["block.1"]
    assert g.opaque[0].reason.startswith("opaque leaf: its traced graph does not compute what its forward computes")
    assert check_soundness(g, x, reinit=True).ok
    with pytest.raises(TraceError, match="does not compute what its forward computes"):
        find_groups(model, x, leaf_modules=())


def test_leaf_modules_make_it_a_barrier():
    x = inp()
    g = find_groups(WithGate().double(), x, leaf_modules=["block.1"])
    assert [(b.op, b.node) for b in g.barriers] == [("DataDependent", "block_1")]
    assert g.groups == []
    assert any("at node 'block_1'" in f.reason and f.layers == ["c1.weight"] and f.count == 4 for f in g.frozen)


class WriteThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        z = y.view(y.shape)  # another name for y's storage
        y *= 2  # changes z too; the traced graph multiplies out of place and z keeps the old values
        return self.c2(torch.relu(z))


def test_graph_that_differs_from_the_forward_is_refused():
    model = WriteThroughView().double()
    hook_calls = []
    model.c1.register_forward_hook(lambda *a: hook_calls.append(1))
    with pytest.raises(TraceError, match=r"WriteThroughView does not compute what its forward computes"):
        find_groups(model, inp())  # the write is in the model's own forward: no submodule to keep opaque
    assert hook_calls == [] and model.training  # the check runs with hooks set aside, modes restored
    # the same write out of place traces faithfully
    class OutOfPlace(WriteThroughView):
        def forward(self, x):
            y = self.c1(x) * 2
            return self.c2(torch.relu(y.view(y.shape)))
    assert find_groups(OutOfPlace().double(), inp()).num_free == 4


def test_shape_error_names_the_module():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.c(x).mean((2, 3)))

    with pytest.raises(ShapeError, match=r"module 'fc' \(Linear\)"):
        find_groups(Bad(), inp().float())


def test_not_a_module():
    with pytest.raises(TraceError, match="expected an nn.Module"):
        trace(lambda x: x)


# -- the caller's model --------------------------------------------------------------------------

class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.drop(self.bn2(torch.relu(self.bn1(self.c1(x))))))


@pytest.mark.parametrize("training", [True, False])
def test_callers_model_unchanged(training):
    torch.manual_seed(0)
    model = WithBN()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.train(training)
    model.bn2.eval()  # a mixed state must survive too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    g = find_groups(model, torch.randn(2, 3, 6, 6))
    assert g.num_free == 8  # c1 (4, folded) → bn2 as an affine (4)
    g.module.c1.weight.data.mul_(2)  # writing to the result must not reach the caller either
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert set(model.state_dict()) == set(state) and model.c1.bias is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(isinstance(model.get_submodule(n), nn.BatchNorm2d) for n in ("bn1", "bn2"))
