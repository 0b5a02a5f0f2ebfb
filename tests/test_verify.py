"""passes.verify / pathfx.verify: float64 equivalence with per-output errors and a readable diff."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import pathfx
from passes.errors import InputError, ShapeError, VerificationError
from passes.soundness import random_factors
from passes.groupset import apply_factors
from util import lively


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.a = nn.Linear(6 * 8 * 8, 4)
        self.b = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        h = torch.flatten(self.body(x), 1)
        return self.a(h), self.b(h)


def model():
    torch.manual_seed(0)
    return lively(TwoHeads()).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_identical_copy_is_ok():
    m = model()
    v = pathfx.verify(m, copy.deepcopy(m), X)
    assert v.ok and v.max_abs == 0.0 and len(v.outputs) == 2
    assert v.inputs == ["the given input"] + [f"random input {i}" for i in range(8)]
    assert "ok" in str(v).splitlines()[0]
    assert v.raise_if_failed() is v


def test_random_rescaling_is_equivalent_in_float64():
    m = model().double()
    groups = pathfx.find_groups(m, X.double())
    scaled = groups.module
    apply_factors(scaled, groups, random_factors(groups, seed=3))
    assert any(not torch.equal(p, q) for p, q in zip(groups.source.parameters(), scaled.parameters()))
    v = pathfx.verify(m, scaled, X, n_random=4)
    assert v.ok, str(v)
    assert 0 < v.max_rel < 1e-12


def test_perturbed_copy_fails_with_readable_diff():
    m = model()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.b.bias[2] += 0.5  # only output 1, element [:, 2] changes, by exactly 0.5
    v = pathfx.verify(m, bad, X, names=("original", "perturbed"))
    assert not v.ok
    assert [o.output for o in v.failures()] == [1]
    o = v.outputs[1]
    assert o.max_abs == pytest.approx(0.5, rel=1e-6)  # the bias is float32
    assert o.index[1] == 2 and o.b_value - o.a_value == pytest.approx(0.5, rel=1e-6)
    assert v.outputs[0].max_abs == 0.0
    with pytest.raises(VerificationError) as e:
        v.raise_if_failed()
    msg = str(e.value)
    assert "output 1 (shape 2x3)" in msg and "rtol 1e-10" in msg and "worst element [" in msg
    assert "original = " in msg and "perturbed = " in msg and o.input in msg
    assert "FAILED" in str(v)


def test_models_are_not_modified():
    m = model().train()
    b = copy.deepcopy(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pathfx.verify(m, b, X, n_random=2)
    assert m.training and b.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN statistics too


def test_seeded_random_inputs_are_deterministic():
    m = model()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.a.weight.mul_(1.001)
    v1 = pathfx.verify(m, bad, X, seed=5)
    v2 = pathfx.verify(m, bad, X, seed=5)
    v3 = pathfx.verify(m, bad, X, seed=6)
    assert v1.outputs == v2.outputs and v1.outputs != v3.outputs


def test_shape_mismatch_and_output_count_fail():
    lin = nn.Linear(4, 3)
    v = pathfx.verify(lin, nn.Linear(4, 2), torch.randn(1, 4), n_random=1)
    assert not v.ok and "shapes differ" in v.diff()
    v = pathfx.verify(lin, TupleOut(lin), torch.randn(1, 4), n_random=1)
    assert not v.ok and "returns 1 outputs" in v.diff()


class TupleOut(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x), x


def test_inputs_from_annotated_graph_module():
    m = model().double()  # BN folding in float64: equal to rounding
    gm = pathfx.analysis.prepare(m, X.double())
    v = pathfx.verify(m, gm, n_random=3)
    assert v.ok and len(v.inputs) == 3
    with pytest.raises(InputError, match="pass inputs="):
        pathfx.verify(m, copy.deepcopy(m))


def test_several_input_sets_and_a_failing_forward():
    m = model()
    v = pathfx.verify(m, copy.deepcopy(m), [(X,), (X * 2,)], n_random=0)
    assert v.inputs == ["input 0", "input 1"]
    with pytest.raises(ShapeError, match="failed on the given input"):
        pathfx.verify(m, m, torch.randn(2, 5, 8, 8))


def test_nan_where_the_reference_is_finite_fails():
    m = nn.Linear(3, 3)
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.bias[0] = float("nan")
    v = pathfx.verify(m, bad, torch.randn(1, 3), n_random=0)
    assert not v.ok and np.isinf(v.max_abs) and "non-finite" in v.diff()


def test_nan_on_both_sides_is_not_agreement():
    m = nn.Linear(3, 3)
    with torch.no_grad():
        m.bias[1] = float("nan")
    v = pathfx.verify(m, copy.deepcopy(m), torch.randn(1, 3), n_random=0)
    assert not v.ok and "NaN in both outputs" in v.diff()


def test_outputs_that_ignore_the_input_are_flagged():
    torch.manual_seed(0)
    dead = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every hidden unit is off: the output is the last bias
    broken = copy.deepcopy(dead)
    with torch.no_grad():
        broken[0].weight.mul_(-1)  # a different function, invisible on these inputs
    v = pathfx.verify(dead, broken, torch.randn(2, 4), n_random=3)
    assert v.ok and v.insensitive == [0]
    assert "barely change from input to input" in str(v)
    live = pathfx.verify(model(), model(), X, n_random=3)
    assert live.insensitive == [] and "barely" not in str(live)
    assert pathfx.verify(dead, dead, torch.randn(2, 4), n_random=0).insensitive == []  # one input: nothing to tell
