"""No plan diverges at its default settings: every zoo model and one torchvision model per family
(at 64 px), transformed in both modes the way `transform` does by default, take 20 steps of their
plan on random batches with finite losses and weights (slow: `make test-slow`). A torchvision model
may diverge only where pbn F.1's SGD + BN baseline (lr 0.1) diverges on the same batches too."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pathfx
import zoo
from zoo.registry import ZOO

TORCHVISION = ["alexnet", "densenet121", "efficientnet_b0", "googlenet", "mnasnet0_5", "mobilenet_v2",
               "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
               "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11_bn", "wide_resnet50_2"]


def stays_finite(name: str, mode: str, steps: int = 20, batch: int = 8) -> bool:
    """``mode``: "balance" or "path" (the transform's plan), or "sgd" (the SGD + BN baseline plan)."""
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    shape = zoo.lookup(name).input_shape[1:] if name in ZOO else (3, 64, 64)
    x = torch.randn(1, *shape)
    if mode == "sgd":
        net, plan = copy.deepcopy(model), pathfx.Plan.baseline(model, x)
    else:
        r = pathfx.transform(model, x, mode=mode, n_random=1)
        net, plan = r.model, r.plan
    net.train()
    opt = plan.optimizer(net)
    sched = plan.scheduler(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = net(torch.randn(batch, *shape, generator=g))
        loss = F.cross_entropy(out, torch.randint(0, out.shape[1], (batch,), generator=g))
        if not math.isfinite(loss.item()):
            return False
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return all(bool(p.isfinite().all()) for p in net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["balance", "path"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_plans_stay_finite(name, mode):
    assert stays_finite(name, mode)


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [(n, m) for n in TORCHVISION for m in ("balance", "path")])
def test_torchvision_plans_stay_finite(name, mode):
    assert stays_finite(name, mode) or not stays_finite(name, "sgd")
