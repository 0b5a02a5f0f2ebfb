"""ENorm balancing pass: function preservation, monotone objective, uniqueness, the paper's sanity checks."""
from __future__ import annotations

import copy
import math

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
    for p, c in ((1, 1.0), (3, 1.0), (2, 1.3), (1.5, 0.8)):
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
    """One hidden layer, one cycle: d = (R/L)^(1/2p) · c^(-1/2) with L = row energy, R = column energy
    (c under the square root, the authors' convention)."""
    model = mlp((5, 7, 3)).double()
    w1, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    b1 = model[0].bias.detach().clone()
    for p, c in ((2, 1.0), (3, 1.5)):
        balanced, _ = pathfx.enorm(model, torch.randn(1, 5).double(), p=p, c=c, cycles=1)
        d = ((w2.abs() ** p).sum(0) / (w1.abs() ** p).sum(1)) ** (1 / (2 * p)) / c ** 0.5
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
    _, report = pathfx.enorm(model, torch.randn(1, 500).double())
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_parameter(bad):
    model = mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"'4\.weight'"):
        pathfx.enorm(model, torch.randn(1, 12))


def test_a_balanced_value_beyond_float64_is_an_error_naming_it():
    """Balancing multiplies unit 0's bias of 1e300 by about 1e20: no float64 holds the result."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-20)
        model[0].bias.fill_(1e300)
        model[2].weight.mul_(1e20)
    with pytest.raises(NonFiniteError, match=r"parameter '0\.bias' is not finite after ENorm"):
        pathfx.enorm(model, torch.randn(2, 4, dtype=torch.float64))


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


@pytest.mark.parametrize("p", [2, 1.5, math.inf])
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


# -- any p ≥ 1 and p = ∞, in the log domain ------------------------------------------------------

PS = [1, 2, 4, 64, 256, 1000, math.inf]


def conv_pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 3, padding=1)).double().eval()


def conv_chain():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(12, 5, 3)).double().eval()


CHAINS = {"conv-relu-conv": (conv_pair, (2, 3, 8, 8)), "3-conv chain": (conv_chain, (2, 3, 8, 8)),
          "mlp": (lambda: mlp().double().eval(), (3, 12))}


def spanning(model, x, seed=0):
    """(groups, a BN-folded copy of ``model`` whose weights span 1e-3 … 1e3 and more): every weight
    entry ±U(0.5, 1), then a log-uniform factor in [1e-3, 1e3] on every free variable."""
    groups = pathfx.find_groups(model, x)
    module = copy.deepcopy(groups.module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in module.named_parameters():
            if name.endswith("weight"):
                sign = torch.where(torch.rand(w.shape, generator=g, dtype=w.dtype) < 0.5, -1.0, 1.0)
                w.copy_(sign * (0.5 + 0.5 * torch.rand(w.shape, generator=g, dtype=w.dtype)))
    apply_factors(module, groups, random_factors(groups, seed=seed, low=1e-3, high=1e3))
    mags = torch.cat([w.detach().abs().reshape(-1) for n, w in module.named_parameters() if n.endswith("weight")])
    assert 0 < mags.min() < 3e-3 and mags.max() > 3e2
    return groups, module


def assert_log_monotone(log_objective):
    for i, (a, b) in enumerate(zip(log_objective, log_objective[1:])):
        assert b <= a + 1e-12 * max(1.0, abs(a)), f"objective rose at cycle {i + 1}: {a} -> {b}"


def check_any_p(groups, module, x, p, cycles=None):
    ref = outputs(module, [x])
    out = copy.deepcopy(module)
    report = balance(out, groups, p=p, cycles=cycles)
    assert all(bool(torch.isfinite(w).all()) for w in out.parameters())
    assert rel_error(ref, outputs(out, [x]))[0] <= 1e-10
    assert report.dead == []  # every weight is nonzero: no channel is dead
    assert all(math.isfinite(v) for v in report.log_objective)
    assert_log_monotone(report.log_objective)
    assert report.log_objective[-1] < report.log_objective[0]
    return out, report


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("net", sorted(CHAINS))
def test_any_p_on_chains(net, p):
    build, shape = CHAINS[net]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    groups, module = spanning(build(), x)
    _, report = check_any_p(groups, module, x, p)
    assert report.converged and report.moved[-1] <= 1e-6


@pytest.fixture(scope="module")
def resnet18_spanning():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    return (*spanning(zoo.build("resnet18").double().eval(), x), x)


@pytest.mark.parametrize("p", PS)
def test_any_p_on_resnet18(resnet18_spanning, p):
    """Four cycles from weights spanning 1e-3 … 1e3: at p = 256 |w|^p spans 10^±768, beyond float64."""
    groups, module, x = resnet18_spanning
    _, report = check_any_p(groups, module, x, p, cycles=4)
    assert report.cycles == 4 and report.moved[0] > 1


@pytest.mark.parametrize("p", [256, 400, 1000])
def test_large_p_where_powers_leave_float64(p):
    """Three convolutions with |w| in [0.1, 1]: |w|^p of the small entries is below float64 (0.1^400
    = 1e-400), and a ratio of such sums is beyond it."""
    model = conv_chain()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(m.weight.sign() * (0.1 + 0.9 * torch.rand(m.weight.shape, dtype=torch.float64)))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    balanced, report = pathfx.enorm(model, x, p=p)
    assert report.converged and report.dead == []
    assert all(bool(torch.isfinite(w).all()) for w in balanced.parameters())
    assert pathfx.verify(model, balanced, x).max_rel <= 1e-10
    assert_log_monotone(report.log_objective)


def channel_max(model):
    """Per hidden channel of a chain: (max |incoming weight|, max |outgoing weight|)."""
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for a, b in zip(ws, ws[1:]):
        inc = a.abs().reshape(a.shape[0], -1).amax(1)
        out = b.abs().transpose(0, 1).reshape(b.shape[1], -1).amax(1)
        yield inc, out


@pytest.mark.parametrize("net", sorted(CHAINS))
def test_p_inf_equalises_max_in_and_out_per_channel(net):
    build, shape = CHAINS[net]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    groups, module = spanning(build(), x, seed=4)
    # at the tolerance the channels are balanced to about that tolerance: the default 1e-6 leaves
    # the MLP's at 1.1e-6
    assert balance(module, groups, p=math.inf, tol=1e-9).converged
    for inc, out in channel_max(module):
        assert float(((inc - out).abs() / out).max()) <= 1e-6


def test_p_inf_on_a_conv_pair_is_the_closed_form_and_torch_ao_equalization():
    """One hidden layer: channel i gets the factor d_i = sqrt(max|W2[:, i]| / max|W1[i]|) (row i of
    W1 and bias i × d_i, column i of W2 ÷ d_i), after which both maxima are sqrt(max|W1[i]| ·
    max|W2[:, i]|). torch.ao's cross_layer_equalization divides row i by s_i = sqrt(r1_i / r2_i)
    with r the range max - min per channel: the same scaling where each channel's range is its
    max|w|, as here (every channel holds a 0 and otherwise positive entries)."""
    from torch.ao.quantization._equalize import cross_layer_equalization

    model = conv_pair()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.abs_()
        model[0].weight[:, 0, 0, 0] = 0  # each row of W1 has min 0
        model[2].weight[0, :, 0, 0] = 0  # each column of W2 has min 0
    w1, b1, w2 = model[0].weight.detach().clone(), model[0].bias.detach().clone(), model[2].weight.detach().clone()
    balanced, report = pathfx.enorm(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), p="inf")
    assert report.p == math.inf and report.converged
    d = (w2.abs().amax(dim=(0, 2, 3)) / w1.abs().amax(dim=(1, 2, 3))).sqrt()
    torch.testing.assert_close(balanced.get_parameter("0.weight"), w1 * d[:, None, None, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(balanced.get_parameter("0.bias"), b1 * d, rtol=1e-12, atol=0)
    torch.testing.assert_close(balanced.get_parameter("2.weight"), w2 / d[None, :, None, None], rtol=1e-12, atol=0)
    ao = copy.deepcopy(model)
    cross_layer_equalization(ao[0], ao[2])  # adds 1e-9 to r2 before dividing
    for name in ("0.weight", "0.bias", "2.weight"):
        torch.testing.assert_close(balanced.get_parameter(name), ao.get_parameter(name), rtol=1e-7, atol=0)


def test_p_is_at_least_one_or_infinite():
    for p in (0.5, 0, -1, float("nan"), "two", True):
        with pytest.raises(InputError, match="p must be a number ≥ 1"):
            pathfx.enorm(mlp(), torch.randn(1, 12), p=p)
    _, report = pathfx.enorm(mlp(), torch.randn(1, 12), p="inf", cycles=1)
    assert report.p == math.inf


def test_plain_squares_move_to_the_log_domain_mid_cycle():
    """Energies inside the plain window (E ≈ 1e-120 and 1e120) whose first factors are ≈ 1e60,
    far outside it: the cycle starts again in the log domain and ends where the log domain alone
    ends."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-60)
        model[0].bias.mul_(1e-60)
        model[2].weight.mul_(1e60)
    x = torch.randn(2, 4, dtype=torch.float64)
    groups = pathfx.find_groups(model, x)
    ends = []
    for force_log in (False, True):
        module = copy.deepcopy(groups.module)
        bal = Balancer(groups, dict(module.named_parameters()))
        st = bal.start(2, dtype=torch.float64)
        assert not st.log
        if force_log:
            bal.to_log(st)
        bal.cycle(st, 2)
        assert st.log
        bal.apply(st)
        ends.append(module)
        assert rel_error(outputs(groups.module, [x]), outputs(module, [x]))[0] <= 1e-10
    for a, b in zip(*(m.parameters() for m in ends)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert float(ends[0].get_parameter("0.weight").detach().abs().max()) > 1e-3  # balanced: both layers near 1


def test_squares_that_underflow_balance_in_the_log_domain():
    """p = 2 with weights of 1e-170 in one layer and 1e170 in the next: w² underflows to 0 and
    overflows, so the plain path would see dead channels; the log domain balances them all."""
    model = mlp((6, 8, 8, 3)).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    reference, _ = pathfx.enorm(model, x, tol=1e-12)
    with torch.no_grad():
        model[0].weight.mul_(1e-170)
        model[0].bias.mul_(1e-170)
        model[2].weight.mul_(1e170)
    balanced, report = pathfx.enorm(model, x, tol=1e-12)
    assert report.converged and report.dead == [] and report.log_objective[0] > 709
    for (n, a), b in zip(balanced.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0, msg=n)


# -- convergence: a fixed point -----------------------------------------------------------------

class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.mix, self.head = nn.Conv2d(11, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        h = torch.relu(self.mix(h))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


class SENet(nn.Module):
    """A squeeze-excitation gate on the first conv's channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.fc1, self.fc2, self.head = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(h, 1)))))
        h = torch.relu(self.out(h * gate))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


FIXED_POINT = {"resnet18": lambda: zoo.build("resnet18"), "concat": ConcatNet, "se": SENet}


@pytest.mark.parametrize("name,p", [("resnet18", 2), ("concat", 2), ("concat", math.inf), ("se", 2), ("se", math.inf),
                                    ("se", 4)])
def test_balanced_model_is_a_fixed_point(name, p):
    """Balance at the default tolerance, balance the result again: no weight moves by more than 1e-6."""
    torch.manual_seed(0)
    model, x = FIXED_POINT[name]().double().eval(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = pathfx.find_groups(model, x)
    assert groups.num_free > 0 and (name != "concat" or any("concat" in g.tags for g in groups.groups))
    once, first = pathfx.enorm(model, x, p=p)
    twice, second = pathfx.enorm(once, x, p=p)
    assert first.converged and second.converged and first.cycles > 1 and second.cycles == 1
    assert second.moved[0] <= 1e-6
    a, b = dict(once.named_parameters()), dict(twice.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        nz = a[n] != 0
        assert torch.equal(b[n][~nz], a[n][~nz])
        moved = float(((b[n] - a[n]).abs()[nz] / a[n].abs()[nz]).max().detach()) if bool(nz.any()) else 0.0
        assert moved <= 1e-6, (n, moved)


# -- asymmetric c in the authors' convention ----------------------------------------------------

def authors_enorm(weights, biases, c, cycles):
    """The authors' released ENorm for p = 2 on an MLP (torch layout: W[k] is out × in): for each
    hidden layer in order, L = 2-norms of the incoming rows, R = 2-norms of the outgoing columns,
    D = sqrt(R / (L·c))."""
    W, B = [w.clone() for w in weights], [b.clone() for b in biases]
    for _ in range(cycles):
        for k in range(len(W) - 1):
            d = (W[k + 1].norm(dim=0) / (W[k].norm(dim=1) * c)).sqrt()
            W[k], B[k], W[k + 1] = W[k] * d[:, None], B[k] * d, W[k + 1] / d[None, :]
    return W, B


def test_asymmetric_c_is_the_authors_formula():
    """c = 1.2 under the square root (the authors' code), for p = 2: one hidden layer and one cycle
    is their closed form; on a deeper MLP both reach the same minimum of Σ_k c^(2(q-k)) ||W_k||²."""
    model = mlp((5, 7, 3)).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    w1, b1, w2 = (model.get_parameter(n).detach().clone() for n in ("0.weight", "0.bias", "2.weight"))
    balanced, _ = pathfx.enorm(model, x, c=1.2, cycles=1)
    d = (w2.norm(dim=0) / (w1.norm(dim=1) * 1.2)).sqrt()
    torch.testing.assert_close(balanced.get_parameter("0.weight"), w1 * d[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(balanced.get_parameter("0.bias"), b1 * d, rtol=1e-12, atol=0)
    torch.testing.assert_close(balanced.get_parameter("2.weight"), w2 / d[None, :], rtol=1e-12, atol=0)

    model = mlp((6, 9, 8, 7, 4)).double()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    W, B = authors_enorm([m.weight.detach() for m in layers], [m.bias.detach() for m in layers], 1.2, 3000)
    balanced, report = pathfx.enorm(model, torch.randn(1, 6, dtype=torch.float64), c=1.2, tol=1e-13)
    assert report.converged and report.weighted_objective is not None
    assert_log_monotone(report.log_weighted_objective)
    for k, m in enumerate(layers):
        name = f"{list(model).index(m)}"
        torch.testing.assert_close(balanced.get_parameter(name + ".weight"), W[k], rtol=1e-9, atol=0)
        torch.testing.assert_close(balanced.get_parameter(name + ".bias"), B[k], rtol=1e-9, atol=1e-15)
    q = len(layers) - 1
    weighted = sum(1.2 ** (2 * (q - k)) * float(W[k].square().sum()) for k in range(len(W)))
    assert report.weighted_objective[-1] == pytest.approx(weighted, rel=1e-10)
