"""The training plans as the papers train: the paper path initialisation, the step of a converted
model, the BatchNorm after the classifier, finalize, and the learning rate chosen on validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
import zoo
from util import batches
from lab.data import digits
from lab.train import search_lr
from pathfx.nn import PBN, PathLayer
from pathfx.optim import PlanSGD
from pathfx.reparam import OFFDIAG_SCALE


def small_cnn(seed=0, bn=True, width=8):
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_paper_init_red_weights_plus_one_bases_one_and_the_off_red_scale():
    torch.manual_seed(0)
    net = zoo.build("stacked_cnn", depth=6, width=32).eval()
    x = torch.randn(2, 3, 8, 8)
    pm, rep = pathfx.reparameterize(net, x, init="paper")
    layers = [m for m in pm.modules() if isinstance(m, PathLayer)]
    with_red = [m for m in layers if m.has_red]
    assert len(with_red) == 6 and rep.lam == 1.0  # 5 convs and the classifier; no residual stream: λ = 1
    for layer in with_red:
        red = layer.red != 0
        assert torch.equal(layer.weight[red], torch.ones(int(red.sum())))  # every red weight +1 (pbn Thm 3.1)
        assert torch.equal(layer.basis(), torch.ones_like(layer.basis()))
        fan_in = layer.red[0].numel()
        off = layer.weight[~red]
        # He-normal times the documented factor: std within 10 % on 9,000+ entries
        assert off.std().item() == pytest.approx(OFFDIAG_SCALE * math.sqrt(2 / fan_in), rel=0.1)
    assert all(torch.equal(m.in_scale, torch.ones_like(m.in_scale)) for m in layers)


def test_basis_scaled_step_is_gsgd_where_bases_and_units_are_one():
    """With the papers' initialisation every basis value and unit is 1: the step of a converted model's
    plan is then G-SGD (torch SGD on V) to the last bit."""
    data = digits((3, 8, 8))
    x, y = data.train[0][:32], data.train[1][:32]
    torch.manual_seed(0)
    a = pathfx.transform(small_cnn(), x[:1], mode="path", init="paper", verify=False).model.train()
    b = pathfx.transform(small_cnn(), x[:1], mode="path", init="paper", verify=False).model.train()
    b.load_state_dict(a.state_dict())
    layers = [m for m in b.modules() if isinstance(m, PathLayer)]
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, weight_decay=1e-4)
    opt_b = PlanSGD(b.parameters(), lr=0.1, weight_decay=1e-4, path_layers=layers)
    for model, opt in ((a, opt_a), (b, opt_b)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_converted_deep_plain_net_trains_where_gsgd_explodes():
    """plainnet18 converted (init="preserve"): its basis values are products of weights along the skeleton.
    One G-SGD step at the plan's learning rate moves a layer's effective weights by ~1e11 times their
    norm; the plan's step (basis-scaled) by a tenth, and 60 of its steps lower the loss, finitely."""
    data = digits((3, 16, 16))
    torch.manual_seed(0)
    model = zoo.build("plainnet18", width=8).eval()
    r = pathfx.transform(model, data.train[0][:1], mode="path")
    assert r.plan.step == "basis-scaled" and "basis values" in str(r.plan)
    layers = [m for m in r.model.modules() if isinstance(m, PathLayer)]
    assert min(float(m.basis().detach().min()) for m in layers) < 1e-6  # the bases are far from 1
    state = {k: v.clone() for k, v in r.model.state_dict().items()}
    x, y = data.train[0][:64], data.train[1][:64]
    moved = {}
    for step in ("basis-scaled", "sgd"):
        r.model.load_state_dict(state)
        r.plan.step = step
        opt = r.plan.optimizer(r.model.train())
        before = [m.effective_weight().detach().clone() for m in layers]
        F.cross_entropy(r.model(x), y).backward()
        opt.step()
        moved[step] = max(float((m.effective_weight().detach() - b).norm() / b.norm()) for m, b in zip(layers, before))
    assert moved["basis-scaled"] < 0.5 and moved["sgd"] > 1e6, moved
    r.model.load_state_dict(state)
    r.plan.step = "basis-scaled"
    opt = r.plan.optimizer(r.model.train())
    losses = []
    for xb, yb in batches(data, 60):
        loss = F.cross_entropy(r.model(xb), yb)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses) and max(losses) < 3 * losses[0]
    assert sum(losses[-10:]) / 10 < 0.8 * losses[0], losses


def test_enorm_plan_keeps_or_adds_one_batchnorm_after_the_classifier():
    x = torch.randn(1, 3, 8, 8)
    added = pathfx.transform(small_cnn(bn=False).eval(), x, mode="balance")
    assert added.plan.final_bn == "added" and "one BatchNorm after the classifier (added" in str(added.plan)
    bns = [m for m in added.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 and isinstance(bns[0], nn.BatchNorm1d)  # the conv BatchNorms are folded
    assert added.verification.max_rel <= 1e-10  # identity in eval mode: the function is unchanged
    torch.manual_seed(0)
    typec = zoo.build("resnet18_typec", width=8).eval()  # the ENorm paper's net, built with its BN on the logits
    kept = pathfx.transform(typec, torch.randn(1, 3, 16, 16), mode="balance", cycles=2)
    assert kept.plan.final_bn == "kept" and isinstance(kept.model.get_submodule("out_bn"), nn.BatchNorm1d)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    none = pathfx.transform(mlp.eval(), torch.randn(1, 12), mode="balance")  # ENorm §6.1: no BN at all
    assert none.plan.final_bn == "" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in none.model.modules())
    trained = small_cnn()
    trained(torch.randn(8, 3, 8, 8))  # its BatchNorms have seen data: a trained model is fine-tuned as it is
    tuned = pathfx.transform(trained.eval(), x, mode="balance")
    assert tuned.plan.final_bn.startswith("none") and "no BatchNorm after the classifier" in str(tuned.plan)
    sgd = pathfx.transform(small_cnn(bn=False).eval(), x, mode="balance", plan="sgd")
    assert sgd.plan.final_bn == ""  # the SGD plan trains the balanced net as it is


def test_finalize_restores_the_eval_accuracy_that_lagging_statistics_lose():
    """G-SGD with P-BN at a high learning rate moves the weights faster than BatchNorm's running
    statistics follow: eval mode is then far worse than the batch statistics; finalize recomputes them."""
    data = digits((3, 8, 8))
    torch.manual_seed(0)
    r = pathfx.transform(small_cnn(width=16).eval(), data.train[0][:1], mode="path", init="paper", verify=False)
    model, plan = r.model.train(), r.plan
    assert any(isinstance(m, PBN) for m in model.modules())
    plan.optimizer_settings["lr"] = 1.0
    opt = plan.optimizer(model)
    for xb, yb in batches(data, 60):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    xt, yt = data.test

    def error(train_mode):
        model.train(train_mode)
        with torch.no_grad():
            return (model(xt).argmax(1) != yt).float().mean().item()

    batch_stats, stale = error(True), error(False)
    loader = [(data.train[0][i:i + 256], data.train[1][i:i + 256]) for i in range(0, len(data.train[1]), 256)]
    assert plan.finalize(model, loader) is model and not model.training
    fresh = error(False)
    assert stale > batch_stats + 0.05  # the lag this step exists for
    assert fresh <= batch_stats + 0.02, (batch_stats, stale, fresh)


def test_learning_rate_chosen_on_validation_never_on_test():
    data = digits((1, 8, 8))
    seen = []
    fit, val = data.split(0.2)
    assert len(fit.train[1]) + len(val.train[1]) == len(data.train[1])
    assert not set(map(tuple, val.train[0].reshape(len(val.train[1]), -1).tolist())) & \
        set(map(tuple, data.test[0].reshape(len(data.test[1]), -1).tolist()))
    found = search_lr(small_mlp(), "plain", data, epochs=2, log=lambda lr, err: seen.append((lr, err)))
    assert [lr for lr, _ in seen] == found.grid == [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1]
    finished = {lr: e for lr, e in found.validation_error.items() if e is not None}
    assert found.lr == min(finished, key=lambda lr: (finished[lr], lr))
    assert found.validation_size == len(val.train[1])
    assert 0 <= found.result.test_error <= 1


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
