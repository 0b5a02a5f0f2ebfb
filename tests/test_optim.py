"""ENorm in training: one cycle after each optimizer step, optimizer state rescaled with the weights."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from passes.errors import InputError
from passes.groupset import apply_factors
from passes.soundness import outputs, rel_error
from pathfx.optim import ENorm


def mlp3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def cnn(bn=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if bn else nn.Identity(), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).double()


def batches(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 4) if isinstance(model[0], nn.Linear) else (8, 3, 8, 8)
    out = model[-1].out_features
    return [(torch.randn(*shape, generator=g, dtype=torch.float64),
             torch.randn(8, out, generator=g, dtype=torch.float64)) for _ in range(n)]


def sgd_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def clone(model, opt):
    twin = copy.deepcopy(model)
    twin_opt = type(opt)(twin.parameters(), **{k: v for k, v in opt.defaults.items()})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


@pytest.mark.parametrize("p", [2, 4, math.inf])
@pytest.mark.parametrize("build", [mlp3, cnn])
@pytest.mark.parametrize("kind", ["momentum+wd", "plain", "nesterov", "adam"])
def test_step_equals_plain_step_then_balancing(build, kind, p):
    """After each step: model == (same step without ENorm) then the same D; the state follows like
    gradients. p = 2 runs on plain numbers, 4 and ∞ in the log domain."""
    model = build()
    make = {"momentum+wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "plain": lambda ps: torch.optim.SGD(ps, lr=0.05),
            "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True)}[kind]
    opt = make(model.parameters())
    data = batches(model, 6)
    enorm = ENorm(model, opt, data[0][0], p=p)
    assert len(enorm.report.groups) == 2 and not enorm.report.left_out
    moved = []
    for x, y in data:
        twin, twin_opt = clone(model, opt)
        sgd_step(model, opt, x, y)
        assert enorm.step()
        sgd_step(twin, twin_opt, x, y)
        ref = outputs(twin, [x])
        plain_weights = [q.detach().clone() for q in twin.parameters()]
        apply_factors(twin, enorm.groups, enorm.last_factors)
        moved.append(max(float(abs(d - 1).max()) for d in enorm.last_factors.values()))
        for (name, p), q, w in zip(model.named_parameters(), twin.parameters(), plain_weights):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
            ratio = torch.where(w != 0, p / w, torch.ones_like(p))  # the factor D applied to this weight
            for key, power in (("momentum_buffer", -1), ("exp_avg", -1), ("exp_avg_sq", -2),
                               ("max_exp_avg_sq", -2)):
                mine, plain = opt.state[p].get(key), twin_opt.state[q].get(key)
                if isinstance(mine, torch.Tensor):
                    torch.testing.assert_close(mine, plain * ratio ** power, rtol=1e-10, atol=1e-18,
                                               msg=f"{name} {key}")
        assert rel_error(ref, outputs(model, [x]))[0] <= 1e-10  # the function is the plain step's
    assert moved[0] > 1e-2  # the first cycle really rescales


def test_momentum_matches_hand_written_reference():
    """Paper Alg. 2 on a 3-layer MLP, written out with explicit matrices."""
    model = mlp3()
    lr, mu, wd = 0.05, 0.9, 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    data = batches(model, 5, seed=1)
    enorm = ENorm(model, opt, data[0][0])
    assert enorm.report.groups == [0, 1] and [[p.gid for p in [enorm.balancer.plans[i]]][0]
                                              for c in enorm.balancer.colours for i in c] == [0, 1]
    W = [t.detach().clone() for t in model.parameters()]  # W1, b1, W2, b2, W3, b3
    buf = [None] * 6
    for x, y in data:
        sgd_step(model, opt, x, y)
        enorm.step()
        # reference: gradient, momentum SGD step
        ref = [t.clone().requires_grad_() for t in W]
        h = torch.relu(x @ ref[0].T + ref[1])
        h = torch.relu(h @ ref[2].T + ref[3])
        nn.functional.mse_loss(h @ ref[4].T + ref[5], y).backward()
        for i, t in enumerate(ref):
            g = t.grad + wd * W[i]
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            W[i] = W[i] - lr * buf[i]
        # one ENorm cycle, hidden layer 1 then hidden layer 2 (weights i, bias i+1, next weight i+2)
        for i in (0, 2):
            d = ((W[i + 2] ** 2).sum(0) / (W[i] ** 2).sum(1)) ** 0.25
            W[i], W[i + 1], W[i + 2] = W[i] * d[:, None], W[i + 1] * d, W[i + 2] / d[None, :]
            buf[i], buf[i + 1], buf[i + 2] = buf[i] / d[:, None], buf[i + 1] / d, buf[i + 2] * d[None, :]
        for p, w, b in zip(model.parameters(), W, buf):
            torch.testing.assert_close(p.detach(), w, rtol=1e-11, atol=1e-14)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=1e-10, atol=1e-14)


def test_every_k_steps():
    model = mlp3()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(model, 6)
    enorm = ENorm(model, opt, data[0][0], every=3)
    ran = []
    for x, y in data:
        sgd_step(model, opt, x, y)
        ran.append(enorm.step())
    assert ran == [False, False, True, False, False, True]
    assert enorm.report.cycles == 2 and enorm.report.steps == 6


def test_batchnorm_is_a_barrier_in_training_and_reported():
    model = cnn(bn=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batches(model, 1)[0]
    enorm = ENorm(model, opt, x)
    left = enorm.report.left_out
    assert len(left) == 1 and left[0].free_in_training == 0 and left[0].width == 8
    assert left[0].first_producer == "0.weight" and "BatchNorm" in left[0].reason
    assert "BatchNorm" in str(enorm.report)
    assert enorm.report.num_free == 8  # conv2's channels still balance
    sgd_step(model, opt, x, y)
    bn_before = model[1].weight.detach().clone()
    conv1_before = model[0].weight.detach().clone()
    enorm.step()
    assert torch.equal(model[0].weight, conv1_before) and torch.equal(model[1].weight, bn_before)


def test_unsupported_optimizer_and_options():
    model = mlp3()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="RMSprop"):
        ENorm(model, torch.optim.RMSprop(model.parameters()), x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in ({"every": 0}, {"p": -2}, {"p": 0.5}, {"c": 0.0}):
        with pytest.raises(InputError):
            ENorm(model, opt, x, **kw)
