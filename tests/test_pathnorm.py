"""ℓ1 path-norm by the |w| trick: exact on small nets, invariant under every rescaling of the analysis."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from passes.errors import PathfxError
from passes.groupset import apply_factors
from passes.pathnorm import path_norm
from passes.soundness import random_factors
from util import lively

D = torch.float64


def test_mlp_equals_path_sums():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    w1, b1, w2, b2 = (p.detach().abs() for p in (m[0].weight, m[0].bias, m[2].weight, m[2].bias))
    # explicit enumeration: input → hidden → output paths, bias-of-hidden → output paths, output biases
    paths_in = sum(w2[o, h] * w1[h, i] for o in range(3) for h in range(5) for i in range(4))
    paths_bias = sum(w2[o, h] * b1[h] for o in range(3) for h in range(5)) + b2.sum()
    assert path_norm(m, (1, 4), bias=False) == pytest.approx(float(paths_in), rel=1e-14)
    assert path_norm(m, (1, 4)) == pytest.approx(float(paths_in + paths_bias), rel=1e-14)


def test_batchnorm_is_folded_first():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    lively(m).double().eval()
    bn = m[1]
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    shift = (bn.bias.detach().double() - a * bn.running_mean.double())
    w1 = a[:, None] * m[0].weight.detach().double()
    w2 = m[3].weight.detach().double()
    expect = w2.abs().sum(0) @ (w1.abs().sum(1) + shift.abs())
    assert path_norm(m, (1, 3)) == pytest.approx(float(expect), rel=1e-12)


def _conv_net(pool: nn.Module, fc_scale: float, features: int = 27):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(features, 4))
    with torch.no_grad():
        m[4].weight.mul_(fc_scale)
    return m.double()


def test_maxpool_counts_every_window_element():
    # max pooling = sum pooling = average pooling with the next layer's weights × window size
    for ceil, n in ((False, 27), (True, 48)):  # 6×6 → 3×3, or 4×4 with ceil mode
        mx = path_norm(_conv_net(nn.MaxPool2d(3, 2, 1, ceil_mode=ceil), 1.0, n), (1, 2, 6, 6))
        av = path_norm(_conv_net(nn.AvgPool2d(3, 2, 1, ceil_mode=ceil, divisor_override=1), 1.0, n), (1, 2, 6, 6))
        assert mx == pytest.approx(av, rel=1e-14)
    mx = path_norm(_conv_net(nn.MaxPool2d(2), 1.0), (1, 2, 6, 6))
    assert mx == pytest.approx(path_norm(_conv_net(nn.AvgPool2d(2), 4.0), (1, 2, 6, 6)), rel=1e-14)
    # adaptive windows of unequal size (7 → 3: sizes 3, 3, 3 with overlaps)
    # adaptive windows of 7 → 3 overlap and differ in size: [0, 3), [2, 5), [4, 7)
    m = _conv_net(nn.AdaptiveMaxPool2d(3), 1.0)
    conv, fc = m[0], m[4]
    h = torch.nn.functional.conv2d(torch.ones(1, 2, 7, 7, dtype=D), conv.weight.abs(), conv.bias.abs(), padding=1)
    win = [(0, 3), (2, 5), (4, 7)]
    pooled = torch.stack([torch.stack([h[0, :, a:b, c:d].sum((1, 2)) for c, d in win], -1) for a, b in win], -2)
    expect = (fc.weight.abs().sum(0) @ pooled.reshape(-1) + fc.bias.abs().sum()).detach()
    assert path_norm(m, (1, 2, 7, 7)) == pytest.approx(float(expect), rel=1e-13)


def test_non_relu_network_is_an_error():
    with pytest.raises(PathfxError, match="GELU"):
        path_norm(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 1)), (1, 2))


INVARIANCE = {"resnet18": (1, 3, 32, 32), "vgg11": (1, 3, 32, 32), "resnet18_typec": (1, 3, 32, 32)}


@pytest.mark.parametrize("name", sorted(INVARIANCE))
def test_invariant_under_random_group_rescaling(name):
    torch.manual_seed(0)
    shape = INVARIANCE[name]
    model = lively(zoo.build(name).eval())
    groups = pathfx.find_groups(model, torch.randn(*shape), name=name)
    del model
    gc.collect()
    m = groups.module.double()
    before = path_norm(m, shape)
    assert before > 0
    for seed in (0,) if name == "vgg11" else (0, 1):  # vgg11: 1 GB per float64 copy
        apply_factors(m, groups, random_factors(groups, seed))
        after = path_norm(m, shape)
        assert abs(after - before) <= 1e-10 * before, (name, before, after)
    # and not invariant under a rescaling the analysis does not allow: one producer alone
    p = groups.groups[0].producers[0]
    with torch.no_grad():
        m.get_parameter(p.weight).mul_(3.0)
    assert abs(path_norm(m, shape) - before) > 1e-6 * before


def test_invariant_under_enorm_and_reparameterization():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    model = lively(zoo.build("resnet18_cifar", width=8)).double().eval()
    before = path_norm(model, (1, 3, 32, 32))
    balanced, _ = pathfx.enorm(model, x, cycles=3)
    assert path_norm(balanced, (1, 3, 32, 32)) == pytest.approx(before, rel=1e-10)
    for policy in ("per-block", "global"):
        path_model, report = pathfx.reparameterize(model, x, policy=policy)
        assert report.path_layers
        assert path_norm(path_model, (1, 3, 32, 32)) == pytest.approx(before, rel=1e-10)


@pytest.mark.parametrize("mode", ["balance", "path"])
@pytest.mark.parametrize("name, shape", [("resnet18", (1, 3, 32, 32)), ("resnet18_typec", (1, 3, 32, 32)),
                                         pytest.param("vgg11", (1, 3, 32, 32), marks=pytest.mark.slow)])
def test_invariant_under_transform(name, shape, mode):
    import pathfx

    torch.manual_seed(0)
    model = zoo.build(name).double().eval()  # a float64 model gets its transform back in float64
    x = torch.randn(*shape, dtype=torch.float64)
    result = pathfx.transform(model, x, mode=mode, **({"cycles": 3} if mode == "balance" else {}))
    before = path_norm(model, shape)
    after = path_norm(result.model, shape)
    assert abs(after - before) <= 1e-10 * before, (before, after)
