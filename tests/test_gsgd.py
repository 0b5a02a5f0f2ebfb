"""G-SGD: torch.optim.SGD on path values V equals the papers' update rules; V is rescaling-invariant."""
import numpy as np
import torch
import torch.nn as nn

import pathfx
from pathfx.nn import PathLayer
from passes.groupset import apply_factors
from passes.soundness import random_factors

D, LR = 5, 0.05


def mlp4(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(D, D, bias=False), nn.ReLU(), nn.Linear(D, D, bias=False), nn.ReLU(),
                      nn.Linear(D, D, bias=False), nn.ReLU(), nn.Linear(D, D, bias=False)).double()
    with torch.no_grad():  # the papers' setting: positive diagonal entries
        for lin in m[::2]:
            lin.weight.diagonal().copy_(lin.weight.diagonal().abs() + 1.0)
    return m


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def grads_u(U, x, y):
    """∇ℓ w.r.t. the reparameterized weights U^l of a plain MLP (independent of pathfx)."""
    U = [u.clone().requires_grad_(True) for u in U]
    h = x
    for i, u in enumerate(U):
        h = h @ u.T
        if i < len(U) - 1:
            h = torch.relu(h)
    loss_fn(h, y).backward()
    return [u.grad for u in U]


def step_eq6_7(U, G):
    """path-bn.txt eq. (6)-(7): v^1 = u^1, v^l_jk = u^l_jk · v^1_kk (l ≥ 2, j ≠ k); SGD on v; back to u."""
    v1 = U[0].diagonal().clone()
    off = ~torch.eye(D, dtype=torch.bool)
    V = [U[0].clone()] + [u * v1[None, :] for u in U[1:]]
    gV = [G[0].clone()] + [g / v1[None, :] for g in G[1:]]  # eq. (6); first layer: ∇v = ∇u
    extra = sum((V[l] * G[l] * off).sum(0) for l in range(1, len(U)))
    gV[0].diagonal().copy_(G[0].diagonal() - extra / v1 ** 2)  # eq. (7)
    V = [v - LR * g for v, g in zip(V, gV)]
    v1n = V[0].diagonal()
    return [V[0]] + [torch.where(off, v / v1n[None, :], torch.ones_like(v)) for v in V[1:]]


def step_eq20_21(U, G):
    """pbn Appendix C eq. (20)-(21), in weight form: w_j the first-layer diagonal, w_i' a later off-diagonal."""
    wj = U[0].diagonal()
    off = ~torch.eye(D, dtype=torch.bool)
    s = sum((G[l] * U[l] * off).sum(0) for l in range(1, len(U)))
    wj_new = wj - LR * (G[0].diagonal() * wj - s) / wj  # eq. (20)
    first = U[0] - LR * G[0]  # first-layer non-diagonal: plain SGD
    first.diagonal().copy_(wj_new)
    later = [torch.where(off, (u - LR * g / wj[None, :] ** 2) * wj[None, :] / wj_new[None, :], u)  # eq. (21)
             for u, g in zip(U[1:], G[1:])]
    return [first] + later


def test_one_step_matches_papers():
    m = mlp4()
    x = torch.randn(16, D, dtype=torch.float64)
    y = torch.randint(0, D, (16,))
    pm, _ = pathfx.reparameterize(m, x, pbn=False)
    layers = [mod for mod in pm.modules() if isinstance(mod, PathLayer)]
    U = [layer.weight.detach().clone() for layer in layers]
    for u in U[1:]:
        assert torch.equal(u.diagonal(), torch.ones(D, dtype=torch.float64))
    G = grads_u(U, x, y)
    want = step_eq6_7(U, G)
    want2 = step_eq20_21(U, G)
    opt = torch.optim.SGD(pm.parameters(), lr=LR)
    opt.zero_grad()
    loss_fn(pm(x), y).backward()
    opt.step()
    for layer, w, w2 in zip(layers, want, want2):
        got = layer.weight.detach()
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)
        torch.testing.assert_close(got, w2, rtol=0, atol=1e-12)
    assert max((a - b).abs().max().item() for a, b in zip(want, U)) > 1e-4  # the step did move the weights
    assert all(w[0].diagonal().min() > 0 for w in (want,))  # b = |v^1_kk| and the papers agree while v^1_kk > 0


def test_path_values_invariant_under_rescaling():
    m = mlp4(seed=3)
    x = torch.randn(4, D, dtype=torch.float64)
    groups = pathfx.find_groups(m, x)
    rescaled = groups.module
    ref = rescaled(x)
    apply_factors(rescaled, groups, random_factors(groups, seed=7))
    assert torch.allclose(rescaled(x), ref, rtol=1e-10)
    assert not torch.allclose(rescaled.get_parameter("0.weight"), m[0].weight)
    pa, _ = pathfx.reparameterize(m, x, pbn=False)
    pb, _ = pathfx.reparameterize(rescaled, x, pbn=False)
    va = [mod.V.detach() for mod in pa.modules() if isinstance(mod, PathLayer)]
    vb = [mod.V.detach() for mod in pb.modules() if isinstance(mod, PathLayer)]
    assert len(va) == 4
    for a, b in zip(va, vb):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)
