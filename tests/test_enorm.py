"""ENorm balancing pass: function preservation, monotone objective, uniqueness, the paper's sanity checks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from passes.enorm import Balancer, balance
from passes.errors import InputError, NonFiniteError
from passes.groupset import apply_factors
from passes.soundness import outputs, random_factors, rel_error
from pathfx.cli import main as cli


def mlp(widths=(12, 16, 16, 16, 16, 6), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def energy(module, names, p=2):
    return sum(float(module.get_parameter(n).detach().abs().pow(p).sum()) for n in names)


def assert_monotone(objective):
    for i, (a, b) in enumerate(zip(objective, objective[1:])):
        assert b <= a * (1 + 1e-12), f"objective increased at cycle {i + 1}: {a} -> {b}"


def check_preserved(model, x, runs=(1, None), **kw):
    """After one cycle and after convergence (cycles=None) the outputs equal the original's in float64."""
    model, x = model.double().eval(), x.double()
    ref = outputs(model, [x])
    for cycles in runs:
        balanced, report = pathfx.enorm(model, x, cycles=cycles, **kw)
        rel, _ = rel_error(ref, outputs(balanced, [x]))
        assert rel <= 1e-10, (cycles, rel)
        # with c != 1 the updates minimise the depth-weighted objective, not the plain one
        objective = report.objective if kw.get("c", 1.0) == 1.0 else report.weighted_objective
        assert_monotone(objective)
        assert objective[-1] < objective[0]
    return report


CASES = {  # name -> input shape: small inputs where the check allows
    "resnet18": (1, 3, 64, 64), "resnet50": (1, 3, 32, 32), "vgg16": (1, 3, 32, 32),
    "densenet121": (1, 3, 32, 32), "mobilenet_v2": (1, 3, 32, 32), "resnet18_typec": (1, 3, 32, 32),
}
HEAVY = {"resnet50", "vgg16", "densenet121"}  # float64 convergence takes tens of seconds: slow run


@pytest.mark.parametrize("name", sorted(set(CASES) - HEAVY))
def test_function_preserved(name):
    torch.manual_seed(0)
    check_preserved(zoo.build(name), torch.randn(*CASES[name]))


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_function_preserved_heavy_first_cycles(name):
    torch.manual_seed(0)
    check_preserved(zoo.build(name), torch.randn(*CASES[name]), runs=(1,))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_function_preserved_heavy_converged(name):
    torch.manual_seed(0)
    report = check_preserved(zoo.build(name), torch.randn(*CASES[name]), runs=(None,))
    assert report.converged


def test_function_preserved_mlp_and_options():
    x = torch.randn(4, 12)
    check_preserved(mlp(), x)
    for p, c in ((1, 1.0), (3, 1.0), (2, 1.3), (0.5, 0.8)):
        report = check_preserved(mlp(), x, p=p, c=c)
        if c != 1.0:  # a chain: the depth-weighted objective exists and decreases
            assert_monotone(report.weighted_objective)


def test_input_model_not_modified():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    balanced, _ = pathfx.enorm(model, torch.randn(2, 12), cycles=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in balanced.state_dict().items())


def test_update_matches_closed_form():
    """One hidden layer, one cycle: d = (R/L)^(1/2p) / c with L = row energy, R = column energy."""
    model = mlp((5, 7, 3)).double()
    w1, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    b1 = model[0].bias.detach().clone()
    for p, c in ((2, 1.0), (3, 1.5)):
        balanced, _ = pathfx.enorm(model, torch.randn(1, 5).double(), p=p, c=c, cycles=1)
        d = ((w2.abs() ** p).sum(0) / (w1.abs() ** p).sum(1)) ** (1 / (2 * p)) / c
        torch.testing.assert_close(balanced.get_parameter("0.weight"), w1 * d[:, None], rtol=1e-12, atol=0)
        torch.testing.assert_close(balanced.get_parameter("0.bias"), b1 * d, rtol=1e-12, atol=0)
        torch.testing.assert_close(balanced.get_parameter("2.weight"), w2 / d[None, :], rtol=1e-12, atol=0)


def test_objective_from_weights_never_increases():
    model = mlp().double()
    x = torch.randn(3, 12).double()
    groups = pathfx.find_groups(model, x)
    module = groups.module
    apply_factors(module, groups, random_factors(groups, seed=3))
    names = [w.name for w in Balancer(groups, dict(module.named_parameters())).weights]
    values = [energy(module, names)]
    for _ in range(15):
        report = balance(module, groups, cycles=1)
        values.append(energy(module, names))
        assert report.objective[-1] == pytest.approx(values[-1], rel=1e-12)
    assert_monotone(values)


# -- a layer that is both a producer and a consumer of one group -----------------------------

class SharedTwice(nn.Module):
    """One Linear called twice: its rows and its columns are variables of the same group."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        return self.out(torch.relu(self.shared(h)))


class AffineSkip(nn.Module):
    """h + bn(h): the affine's input and output channels are the same variables."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 3.0)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + self.bn(h))


def no_single_variable_improves(module, groups, names, variables):
    base = energy(module, names)
    for gid, s in variables:
        for t in (0.999, 1.001):
            f = {g.id: np.ones(g.width) for g in groups.groups}
            f[gid][s] = t
            probe = copy.deepcopy(module)
            apply_factors(probe, groups, f)
            assert energy(probe, names) >= base * (1 - 1e-13), (gid, s, t)


@pytest.mark.parametrize("cls", [SharedTwice, AffineSkip])
def test_coupled_group_is_exact(cls):
    """Each step is an exact minimisation: after one cycle the variables updated last sit at their minimum."""
    torch.manual_seed(1)
    model, x = cls().double().eval(), torch.randn(4, 6).double()
    groups = pathfx.find_groups(model, x)
    module = groups.module
    apply_factors(module, groups, random_factors(groups, seed=5))
    ref = outputs(module, [x])
    plan = Balancer(groups, dict(module.named_parameters())).plans[0]
    assert len(groups.groups) == 1 and plan.self_masks  # the case under test
    assert (plan.classes is not None) == (cls is SharedTwice)
    last = plan.classes[-1].tolist() if plan.classes is not None else range(plan.width)
    report = balance(module, groups, cycles=1)
    names = [lay.name for lay in report.layers]
    no_single_variable_improves(module, groups, names, [(0, s) for s in last])
    report = balance(module, groups, tol=1e-14)
    assert_monotone(report.objective)
    assert rel_error(ref, outputs(module, [x]))[0] <= 1e-10
    no_single_variable_improves(module, groups, names, [(0, s) for s in range(plan.width)])


# -- uniqueness (paper Thm 1) ------------------------------------------------------------------

def balanced_from(model, x, seed):
    groups = pathfx.find_groups(model.double().eval(), x.double())
    module = copy.deepcopy(groups.module)
    apply_factors(module, groups, random_factors(groups, seed=seed))
    report = balance(module, groups, tol=1e-15, max_cycles=20_000)
    return module, report


def assert_unique(model, x):
    a, ra = balanced_from(model, x, seed=1)
    b, rb = balanced_from(model, x, seed=2)
    assert ra.converged and rb.converged
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        rel = float((wa - wb).abs().max() / wa.abs().max().clamp_min(1e-300)) if wa.numel() else 0.0
        assert rel <= 1e-6, (name, rel)


def test_unique_minimum_mlp():
    assert_unique(mlp(), torch.randn(2, 12))


def test_unique_minimum_typec():
    torch.manual_seed(0)
    assert_unique(zoo.resnet18_typec(width=8), torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_unique_minimum_resnet18_and_typec_full_width():
    torch.manual_seed(0)
    assert_unique(zoo.build("resnet18"), torch.randn(1, 3, 64, 64))
    assert_unique(zoo.build("resnet18_typec"), torch.randn(1, 3, 32, 32))


# -- the paper's sanity checks --------------------------------------------------------------

def test_annex_a_unbalanced_mlp_is_rebalanced():
    """20 Xavier 500×500 layers, layer 6 × 1.2 and layer 12 × 0.8: per-layer energy becomes flat."""
    torch.manual_seed(0)
    layers = []
    for _ in range(20):
        lin = nn.Linear(500, 500)
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        model[2 * 5].weight.mul_(1.2)  # layer 6
        model[2 * 11].weight.mul_(0.8)  # layer 12
    _, report = pathfx.enorm(model, torch.randn(1, 500).double(), tol=1e-10)
    before = np.array([lay.before for lay in report.layers])
    after = np.array([lay.after for lay in report.layers])
    assert before.max() / before.min() > 2.0
    assert after.max() / after.min() < 1.001
    assert_monotone(report.objective)


def test_annex_d1_resnet18_norm_decreases_and_converges():
    torch.manual_seed(0)
    _, report = pathfx.enorm(zoo.build("resnet18"), torch.randn(1, 3, 64, 64), tol=1e-6)
    assert report.converged and report.cycles < 500
    assert_monotone(report.objective)
    assert report.after < 0.9 * report.before


def test_streams_balanced_beyond_the_paper():
    """Identity-skip streams are groups too: balancing them lowers the objective further."""
    torch.manual_seed(0)
    model, x = zoo.build("resnet18").eval(), torch.randn(1, 3, 64, 64)
    groups = pathfx.find_groups(model, x)
    internal = [g.id for g in groups.groups if "identity-skip" not in g.tags]
    assert 0 < len(internal) < len(groups.groups)
    _, everything = pathfx.enorm(model, x, tol=1e-9)
    _, inside = pathfx.enorm(model, x, tol=1e-9, groups=internal)
    assert everything.before == pytest.approx(inside.before)
    assert everything.after < inside.after < inside.before


def test_group_subset_leaves_other_layers():
    model, x = mlp(), torch.randn(2, 12)
    balanced, report = pathfx.enorm(model, x, cycles=2, groups=[0])
    assert report.groups == [0]
    for name in ("4.weight", "6.weight", "8.weight"):  # not a producer or consumer of group 0
        assert torch.equal(balanced.get_parameter(name), model.get_parameter(name))
    with pytest.raises(InputError):
        pathfx.enorm(model, x, groups=[99])


# -- dead channels, bad input ---------------------------------------------------------------

def test_dead_channels_skipped_and_reported():
    model = mlp().double()
    with torch.no_grad():
        model[2].weight[3].zero_()  # unit 3 of the second hidden layer: pruned, no incoming weight
        model[6].weight[:, 5].zero_()  # unit 5 of the third hidden layer is never read
    x = torch.randn(3, 12).double()
    ref = outputs(model, [x])
    balanced, report = pathfx.enorm(model, x)
    dead = {(d.group, v) for d in report.dead for v in d.variables}
    assert dead == {(1, 3), (2, 5)}
    assert all(torch.isfinite(p).all() for p in balanced.parameters())
    assert rel_error(ref, outputs(balanced, [x]))[0] <= 1e-10
    assert_monotone(report.objective)


def test_dead_sets_found_through_several_layers():
    # Hidden units 0, 1 of layer 1 feed only units 0, 1 of layer 2, whose outgoing weights are
    # zero: none of the four reaches the output, though units 0, 1 of layer 1 have L, R > 0.
    # Unit 2 of layer 1 has no incoming weight, and unit 2 of layer 2 reads only from it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight[2:, :2] = 0
        model[2].weight[:2, 2:] = 0
        model[4].weight[:, :2] = 0
        model[0].weight[2] = 0
        model[2].weight[2, [0, 1, 3]] = 0
    x = torch.randn(3, 5, dtype=torch.float64)
    balanced, report = pathfx.enorm(model, x, tol=1e-14)
    assert report.converged
    assert {(d.group, v) for d in report.dead for v in d.variables} == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}
    assert rel_error(outputs(model, [x]), outputs(balanced, [x]))[0] <= 1e-10
    assert_monotone(report.objective)
    for name in ("0.weight", "2.weight"):  # dead rows keep their weights
        assert torch.equal(dict(balanced.named_parameters())[name][:3], dict(model.named_parameters())[name][:3])


def test_non_finite_weight_names_the_parameter():
    model = mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'4\.weight'"):
        pathfx.enorm(model, torch.randn(1, 12))


@pytest.mark.parametrize("kw", [{"p": 0}, {"p": -1}, {"c": 0}, {"cycles": -1}, {"tol": -1.0}])
def test_bad_options(kw):
    with pytest.raises(InputError):
        pathfx.enorm(mlp(), torch.randn(1, 12), **kw)


# -- float32 drift over many cycles -----------------------------------------------------------

@pytest.mark.slow
def test_thousand_cycles_float32_resnet18():
    torch.manual_seed(0)
    model, x = zoo.build("resnet18").eval(), torch.randn(1, 3, 64, 64)
    ref = outputs(model.double(), [x.double()])
    model.float()
    balanced, report = pathfx.enorm(model, x, cycles=1000)
    assert report.cycles == 1000
    assert rel_error(ref, outputs(balanced.double(), [x.double()]))[0] <= 1e-4
    # the in-place engine of training writes the weights every cycle
    groups = pathfx.find_groups(model, x)
    module = copy.deepcopy(groups.module)
    bal = Balancer(groups, dict(module.named_parameters()))
    for _ in range(1000):
        st = bal.start(2)
        bal.cycle(st, 2)
        bal.apply(st)
    assert rel_error(ref, outputs(module.double(), [x.double()]))[0] <= 1e-4


# -- CLI ------------------------------------------------------------------------------------

def test_cli_prints_table_and_plots(tmp_path, capsys):
    png = tmp_path / "energy.png"
    assert cli(["enorm", "zoo:resnet18_typec", "--cycles", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "objective before" in out and "blocks.0.conv1.weight" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["enorm", "zoo:resnet18_typec", "--cycles", "1", "--plot", str(png)]) == 2  # exists, no --force
    assert cli(["enorm", "zoo:resnet18_typec", "--p", "0"]) == 2


def test_a_model_without_free_groups_is_left_as_it_is():
    import torch.nn as nn

    import pathfx

    m = nn.Sequential(nn.Linear(4, 3))  # its only rows are the graph output: nothing to balance
    balanced, report = pathfx.enorm(m, torch.randn(2, 4))
    assert report.objective == [0.0, 0.0] and torch.equal(balanced.get_parameter("0.weight"), m[0].weight)


@pytest.mark.parametrize("p", [2, 1.5])
def test_large_weights_read_in_blocks_balance_alike(monkeypatch, p):
    """Weights past ``LAZY_FROM`` keep no energy matrix; the cycles must not notice (rows in
    several blocks of 2**18 entries, a 1×1 conv among linear layers, a dead channel)."""
    import passes.enorm as pe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 700, 1), nn.ReLU(), nn.Conv2d(700, 600, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(600, 5)).double().eval()
    with torch.no_grad():
        model[2].weight[:, 7].zero_()
    x = torch.randn(2, 3, 4, 4).double()
    dense, rep_dense = pathfx.enorm(model, x, cycles=5, p=p)
    monkeypatch.setattr(pe, "LAZY_FROM", 1000)
    lazy, rep_lazy = pathfx.enorm(model, x, cycles=5, p=p)
    np.testing.assert_allclose(rep_lazy.objective, rep_dense.objective, rtol=1e-12)
    for (name, a), b in zip(dense.named_parameters(), lazy.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=name)
    assert [d.variables for d in rep_lazy.dead] == [d.variables for d in rep_dense.dead] != []


@pytest.mark.parametrize("seed", range(12))
def test_live_variables_match_reachability_over_entries(seed):
    """passes/enorm_reach.live (hubs, zero rows and columns, scattered zeros, grouped blocks)
    against plain reachability over every nonzero entry."""
    import networkx as nx

    from passes import enorm_reach

    rng = np.random.default_rng(seed)
    n_vars = 9
    shapes, rvars, cvars, energies = [], [], [], []
    graph = nx.DiGraph()
    for _ in range(4):
        blocks = int(rng.choice([1, 1, 2, 3]))
        rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        density = rng.choice([1.0, 0.97, 0.6, 0.3])
        E = torch.as_tensor(rng.random((blocks, rows, cols)) * (rng.random((blocks, rows, cols)) < density))
        rv = rng.integers(-1, n_vars, blocks * rows)
        cv = rng.integers(-1, n_vars, blocks * cols)
        shapes.append((blocks, rows, cols)), rvars.append(rv), cvars.append(cv), energies.append(E)
        for b, o, i in zip(*np.nonzero(E.numpy())):
            graph.add_edge(("v", cv[b * cols + i]) if cv[b * cols + i] >= 0 else "source",
                           ("v", rv[b * rows + o]) if rv[b * rows + o] >= 0 else "sink")
    fulls = [enorm_reach.positive_blocks(E, s[0]) for E, s in zip(energies, shapes)]
    got = enorm_reach.live(n_vars, shapes, rvars, cvars, energies, fulls)
    graph.add_nodes_from(["source", "sink"])
    fwd, bwd = nx.descendants(graph, "source"), nx.ancestors(graph, "sink")
    want = np.array([("v", k) in fwd and ("v", k) in bwd for k in range(n_vars)])
    assert (got == want).all(), (got, want)


def test_scattered_zeros_cost_few_edges():
    from passes import enorm_reach

    E = torch.rand(1, 300, 400) + 0.1
    E[0, [3, 50, 51, 299], [7, 8, 8, 399]] = 0  # exact zeros, as random weights hold a few
    E[0, 5] = 0  # unit 5 has no incoming weight
    rv, src_cols = np.arange(300), np.full(400, -1)
    src, _ = enorm_reach.edges(E, 1, 300, 400, rv, np.arange(400), 1000, np.array([False]))
    assert sum(len(s) for s in src) <= 400 + 300 + 5 * 400  # not 300 × 400
    out = torch.ones(1, 10, 300)  # the 300 units feed a dense output layer
    live = enorm_reach.live(300, [(1, 300, 400), (1, 10, 300)], [rv, np.full(10, -1)], [src_cols, rv],
                            [E, out], [np.array([False]), np.array([True])])
    assert live.tolist() == [k != 5 for k in range(300)]
