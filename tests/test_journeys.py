"""The README's training journey, as a user runs it: transform → plan.optimizer → after_step →
scheduler → finalize, then the test error in eval mode, against SGD + BN trained for the same steps
(torchvision resnet18 and mobilenet_v2, zoo plainnet18, digits at 32 px); and fine-tuning a trained
model with its plan after the transform."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pathfx
import torchvision  # noqa: E402  (after pathfx, which defines the operator schemas its import needs)
import zoo
from util import batches
from lab.data import digits, mnist1d

STEPS, BATCH = 300, 64


def train_with(model, plan, data, steps, batch, seed=1) -> float:
    """The README's loop; the test error (%) in eval mode after finalize."""
    opt = plan.optimizer(model)
    sched = plan.scheduler(opt, steps)
    model.train()
    for x, y in batches(data, steps, batch, seed):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert math.isfinite(loss.item()), f"{plan.kind}: loss {loss.item()}"
        loss.backward()
        opt.step()
        plan.after_step()
        sched.step()
    loader = [(data.train[0][i:i + 256], data.train[1][i:i + 256]) for i in range(0, len(data.train[1]), 256)]
    assert plan.finalize(model, loader) is model and not model.training
    xt, yt = data.test
    with torch.no_grad():
        return 100 * (model(xt).argmax(1) != yt).float().mean().item()


def build(name):
    torch.manual_seed(0)
    if name == "plainnet18":
        return zoo.build("plainnet18", width=16).eval()
    return getattr(torchvision.models, name)(num_classes=10).eval()


@pytest.fixture(scope="module")
def data32():
    return digits((3, 32, 32))


BASELINES = {}


def baseline_error(name, data):
    """SGD + BN (pbn F.1's baseline plan) on the model as built, for the same steps."""
    if name not in BASELINES:
        model = build(name)
        BASELINES[name] = train_with(model, pathfx.Plan.baseline(model, data.train[0][:1]), data, STEPS, BATCH)
    return BASELINES[name]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "plainnet18"])
@pytest.mark.parametrize("mode", ["balance", "path"])
def test_readme_journey_trains_as_well_as_sgd_with_bn(name, mode, data32):
    data, example = data32, data32.train[0][:1]
    baseline = baseline_error(name, data)
    assert baseline < 15, baseline  # the baseline itself learned
    r = pathfx.transform(build(name), example, mode=mode, calibration=data.train[0][:512])
    assert r.verification.ok and "calibration" in str(r.plan)
    error = train_with(r.model, r.plan, data, STEPS, BATCH)
    print(f"{name} {mode}: {error:.2f} % test error, SGD + BN {baseline:.2f} %")
    assert error <= baseline + 3, (baseline, error)


def test_fresh_batchnorms_folded_without_calibration_are_flagged(data32):
    r = pathfx.transform(build("mobilenet_v2"), data32.train[0][:1], mode="balance", cycles=1)
    assert "never saw data" in str(r.plan) and "calibration=" in str(r.plan)


def test_enorm_plan_keeps_batchnorms_where_no_group_reaches(data32):
    """mobilenet_v2: ReLU6 freezes the expansion and depthwise channels; their BatchNorms stay (identity in
    eval mode), the projections feeding the residual streams, which ENorm balances, are folded."""
    x = data32.train[0][:1]
    r = pathfx.transform(build("mobilenet_v2"), x, mode="balance", cycles=2)
    kept = [n for n, m in r.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(kept) == 35 and "35 BatchNorms kept" in str(r.plan)
    producers = {p.weight for g in r.groups.groups for p in g.producers}
    behind = [n.args[0].target for n in r.model.graph.nodes if n.op == "call_module" and n.target in kept]
    assert len(behind) == 35 and producers and not any(f"{layer}.weight" in producers for layer in behind)
    assert r.verification.max_rel <= 1e-10
    resnet = pathfx.transform(build("resnet18"), x, mode="balance", cycles=1)  # ReLU: every channel can move
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.model.modules())


def test_finetuning_with_either_plan_keeps_the_accuracy():
    """A 1-D CNN trained with SGD + BN on MNIST-1D, transformed, then one epoch with the plan. The ENorm
    plan adds no BatchNorm after the classifier of a trained model (one would cost ~2 points here)."""
    data = mnist1d()
    torch.manual_seed(0)
    model = zoo.build("mnist1d_cnn")
    example = data.train[0][:1]
    trained = 100 - train_with(model, pathfx.Plan.baseline(model, example), data, 1500, 128)
    epoch = len(data.train[1]) // 128
    for mode in ("balance", "path"):
        r = pathfx.transform(model, example, mode=mode)
        assert mode == "path" or r.plan.final_bn.startswith("none: a trained model")
        after = 100 - train_with(r.model, r.plan, data, epoch, 128, seed=2)
        assert after >= trained - 1, (mode, trained, after)
