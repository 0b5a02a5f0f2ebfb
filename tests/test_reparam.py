"""Path reparameterization: Theorem 1 closed forms, function preservation, red weights, fold."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from pathfx.nn import PBN, PathLayer
from passes.fold import fold
from passes.reparam import SHARED_BN
from passes.soundness import outputs, rel_error


def mlp(widths, seed, negative_diag=True):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=False), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).double()
    if negative_diag:  # some generalized-diagonal (red) entries negative
        with torch.no_grad():
            for lin in m[2::2]:
                c_out, c_in = lin.weight.shape
                for k in range(0, c_in, 2):
                    lin.weight[k % c_out, k] = -abs(lin.weight[k % c_out, k]) - 0.1
    return m


def path_weights(pm):
    return [m.weight.detach().numpy() for m in pm.modules() if isinstance(m, PathLayer)]


def closed_forms(W):
    """Theorem 1 of path-bn.txt, generalized to unequal widths by the papers' D.1 choice.

    fwd(l, j): value of the red (skeleton) chain from hidden node j of layer l to the output,
    through entries [j mod C_{s}, j]; inp(l, k): value of the chain into k through [k, k mod C_{l-1}].
    v^l_jk = inp(l-1, k) · w^l_jk · fwd(l, j) and P_k = inp(l-1, k) · fwd(l-1, k) (= v^1_kk at equal widths).
    Rescaling by |·| only keeps each weight's sign, so the reparameterized weight is
    sgn(fwd(l, j)) · sgn(fwd(l-1, k)) · v^l_jk / P_k, and the red entries are sgn(w^l_jk).
    """
    L = len(W)

    def fwd(l, j):
        if l == 0 or l == L:
            return 1.0
        jn = j % W[l].shape[0]
        return W[l][jn, j] * fwd(l + 1, jn)

    def inp(l, k):
        if l == 0:
            return 1.0
        src = k % W[l - 1].shape[1]
        return W[l - 1][k, src] * inp(l - 1, src)

    U, B = [], []
    for l in range(1, L + 1):
        w = W[l - 1]
        u, b = np.zeros_like(w), np.ones_like(w)
        for j in range(w.shape[0]):
            for k in range(w.shape[1]):
                v = inp(l - 1, k) * w[j, k] * fwd(l, j)
                if l == 1:
                    u[j, k] = np.sign(fwd(l, j)) * v
                elif j == k % w.shape[0]:
                    u[j, k] = np.sign(w[j, k])
                else:
                    P = inp(l - 1, k) * fwd(l - 1, k)
                    u[j, k] = np.sign(fwd(l, j)) * np.sign(fwd(l - 1, k)) * v / P
                    b[j, k] = abs(P)
        U.append(u)
        B.append(b)
    return U, B


def paper_forms(W):
    """The equal-width statement itself: products over layers of diagonal entries (path-bn.txt Thm 1)."""
    L, d = len(W), W[0].shape[0]
    diag = np.array([[W[s][k, k] for k in range(d)] for s in range(L)])  # diag[s, k] = w^{s+1}_kk
    v1 = diag.prod(axis=0)  # v^1_kk
    U = []
    for l in range(1, L + 1):
        w, u = W[l - 1], np.zeros_like(W[l - 1])
        for j in range(w.shape[0]):
            for k in range(w.shape[1]):
                v = diag[:l - 1, k].prod() * w[j, k] * diag[l:, j].prod()  # v^l_jk
                if l == 1:
                    u[j, k] = np.sign(diag[1:, j]).prod() * v
                elif j == k:
                    u[j, k] = np.sign(w[k, k])
                else:
                    u[j, k] = np.sign(diag[l:, j]).prod() * np.sign(diag[l - 1:, k]).prod() * v / v1[k]
        U.append(u)
    return U


@pytest.mark.parametrize("widths", [(4, 4, 4, 4), (5, 5, 5, 5, 5, 5), (4, 6, 3, 2), (3, 7, 5, 8, 4, 2)])
def test_theorem1_closed_forms(widths):
    m = mlp(widths, seed=len(widths))
    W = [lin.weight.detach().numpy().copy() for lin in m[::2]]
    x = torch.randn(6, widths[0], dtype=torch.float64)
    pm, rep = pathfx.reparameterize(m, x, pbn=False)
    assert rep.red_weights == sum(widths[1:-1]) and rep.max_rel_error < 1e-12
    U, B = closed_forms(W)
    got = path_weights(pm)
    assert len(got) == len(U)
    for u_got, u_want in zip(got, U):
        np.testing.assert_allclose(u_got, u_want, rtol=1e-12, atol=1e-14)
    if len(set(widths)) == 1:
        for u_got, u_want in zip(got, paper_forms(W)):
            np.testing.assert_allclose(u_got, u_want, rtol=1e-12, atol=1e-14)
    # path values: V = u · b with b = |P_k| (|v^1_kk| at equal widths)
    for layer, u, b in zip([m for m in pm.modules() if isinstance(m, PathLayer)], U, B):
        free = layer.free.numpy() == 1
        np.testing.assert_allclose(layer.V.detach().numpy()[free], (u * b)[free], rtol=1e-12, atol=1e-14)
    assert all(np.array_equal(m[::2][i].weight.detach().numpy(), W[i]) for i in range(len(W)))  # caller untouched


def test_red_entries_constant_no_gradient():
    m = mlp((4, 6, 5, 3), seed=1)
    pm, _ = pathfx.reparameterize(m, torch.randn(2, 4, dtype=torch.float64), pbn=False)
    pm(torch.randn(8, 4, dtype=torch.float64)).square().sum().backward()
    layers = [m for m in pm.modules() if isinstance(m, PathLayer)]
    assert "red" in dict(layers[1].named_buffers()) and "red" not in dict(layers[1].named_parameters())
    for layer in layers[1:]:
        red = layer.red != 0
        assert red.sum() == layer.red.shape[1]  # one red entry per input variable
        assert set(layer.weight[red].tolist()) <= {-1.0, 1.0}
        assert torch.all(layer.V.grad[red] == 0) and layer.V.grad[~red].abs().sum() > 0


def _randomize_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return m


def _check(model, size, policy, pbn, min_groups=1):
    torch.manual_seed(0)
    model = _randomize_bn(model.double().eval())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    pm, rep = pathfx.reparameterize(model, x, policy=policy, pbn=pbn)
    assert len(rep.reparameterized_groups) >= min_groups
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = outputs(model, [x])
    rel, _ = rel_error(ref, outputs(pm.eval(), [x]))
    assert rel <= 1e-10, rel
    if pbn:
        folded = fold(pm)
        assert not any(isinstance(mod, (PathLayer, PBN)) for mod in folded.modules())
        assert rel_error(ref, outputs(folded, [x]))[0] <= 1e-10
    return pm, rep


@pytest.mark.parametrize("pbn", [False, True])
def test_plainnet_preserved(pbn):
    pm, rep = _check(zoo.build("plainnet18"), 32, "per-block", pbn, min_groups=17)
    assert len(rep.pbn_layers) == (16 if pbn else 0)  # every conv but the first


@pytest.mark.parametrize("policy,pbn", [("per-block", True), ("global", True), ("global", False)])
def test_resnet18_preserved(policy, pbn):
    pm, rep = _check(zoo.build("resnet18"), 32, policy, pbn, min_groups=8)
    assert rep.variables == (1920 if policy == "per-block" else 2880)
    if pbn:  # per-block: each block's second conv; global: also the three downsample convs
        assert len(rep.pbn_layers) == (8 if policy == "per-block" else 11)
        assert isinstance(pm.get_submodule("bn1"), nn.BatchNorm2d)  # stem input is fixed: ordinary BN


def test_typec_preserved():
    _check(zoo.build("resnet18_typec"), 32, "global", True, min_groups=17)


def test_mlp_with_bias_preserved():
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    m = _randomize_bn(m.double().eval())
    x = torch.randn(4, 5, dtype=torch.float64)
    for pbn in (False, True):
        pm, rep = pathfx.reparameterize(m, x, pbn=pbn)
        assert rep.max_rel_error <= 1e-12 and len(rep.pbn_layers) == int(pbn)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["per-block", "global"])
def test_resnet50_preserved(policy):
    _check(zoo.build("resnet50"), 64, policy, True, min_groups=16)


@pytest.mark.slow
def test_vgg11_preserved():
    _check(zoo.build("vgg11"), 32, "per-block", False, min_groups=10)


@pytest.mark.slow
def test_densenet121_preserved():
    pm, rep = _check(zoo.build("densenet121"), 32, "per-block", True)
    assert rep.no_red > 0  # concatenated features, read only by BatchNorms, stay in weight space


def test_bad_policy():
    with pytest.raises(pathfx.PathfxError):
        pathfx.reparameterize(mlp((3, 3, 3), 0), torch.randn(1, 3, dtype=torch.float64), policy="sideways")


def test_paper_init_keeps_every_basis_at_one_and_gradients_bounded():
    # Small random basis entries would make the bases shrink geometrically along the skeleton
    # and the gradients w.r.t. V (which scale as 1/b) explode at the first step.
    import torch.nn.functional as F

    from pathfx.nn import PathLayer

    torch.manual_seed(0)
    model = zoo.build("plainnet18", width=8)
    x = torch.randn(16, 3, 32, 32)
    path, _ = pathfx.reparameterize(model, x[:1], init="paper")
    for m in path.modules():
        if isinstance(m, PathLayer):
            assert torch.allclose(m.basis(), torch.ones_like(m.basis()))
    path.train()
    F.cross_entropy(path(x), torch.randint(0, 10, (16,))).backward()
    norm = sum(p.grad.norm() ** 2 for p in path.parameters() if p.grad is not None) ** 0.5
    assert torch.isfinite(norm) and norm < 1e3, norm


def test_deep_chain_keeps_groups_in_weight_space_where_path_values_leave_the_dtype():
    # 40 layers of weights ~0.05: path values ~0.05^40 = 1e-52, below float32's smallest number
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6)] + [m for _ in range(39) for m in (nn.ReLU(), nn.Linear(6, 6))]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.05 / m.weight.abs().mean())
    x = torch.randn(4, 6)
    gm, report = pathfx.reparameterize(net, x, pbn=False)
    reason = next(r for r in report.weight_space if "leave float32's range" in r)
    assert 0 < report.weight_space[reason] < 39 * 6 and report.reparameterized_groups
    assert report.max_rel_error <= 1e-5  # the float32 path model against the original, in float64
    values = torch.cat([p.detach().abs().flatten() for p in gm.parameters()])
    assert values[values > 0].min() >= torch.finfo(torch.float32).tiny * 2 ** 10
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()
    _, full = pathfx.reparameterize(net.double(), x.double(), pbn=False)  # float64 holds the whole path form
    assert not any("range" in r for r in full.weight_space) and len(full.reparameterized_groups) == 39
    assert full.max_rel_error <= 1e-10


class SharedBN(nn.Module):
    """c1 feeds its BatchNorm and, past it, the skip: folding the BN needs a copy of c1."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.bn, self.c2, self.c3 = nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.bn3, self.c4 = nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.c1(torch.relu(self.c0(x)))
        h = torch.relu(self.c2(torch.relu(self.bn(h)))) + h
        return self.c4(torch.relu(self.bn3(self.c3(h))))


def test_layer_feeding_a_batchnorm_and_other_nodes_keeps_its_groups_in_weight_space():
    pm, rep = _check(SharedBN(), 8, "global", True)
    # c1's input, its output through the BN (read by c2) and the stream c1 + c2: 3 groups of 6
    assert rep.weight_space[SHARED_BN] == 18
    assert rep.path_layers == ["c3", "c4"] and rep.bn_layers == ["bn3"]
    assert isinstance(pm.get_submodule("bn"), nn.BatchNorm2d)  # left as it was
