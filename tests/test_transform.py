"""pathfx.transform, the plans it emits, and the transform CLI."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
import zoo
from passes import reparam as reparam_pass
from passes.errors import InputError, ShapeError, VerificationError
from pathfx.cli import main
from lab.data import digits
from pathfx.plan import Plan, PlanMismatchError


def small_cnn(seed=0, bn=True):
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), norm(12),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(12, 16, 3, padding=1), norm(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def state_hash(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


@pytest.mark.parametrize("mode", ["balance", "path"])
@pytest.mark.parametrize("name, shape", [("resnet18", (1, 3, 32, 32)), ("resnet18_typec", (1, 3, 32, 32))])
def test_transform_verifies_and_leaves_the_model_alone(name, shape, mode):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    before, flag = state_hash(model)
    opts = {"cycles": 3} if mode == "balance" else {}
    r = pathfx.transform(model, torch.randn(*shape), mode=mode, **opts)
    assert r.verification.ok and r.verification.max_rel <= 1e-10
    assert r.plan.kind == ("enorm" if mode == "balance" else "gsgd")
    assert r.groups.num_free > 0 and set(r.timings) >= {"trace", "shapes", "groups"}
    after, flag2 = state_hash(model)
    assert flag == flag2 and all(torch.equal(before[k], after[k]) for k in before)
    text = str(r)
    assert "verification (float64)" in text and "ok" in text and r.plan.kind in text


def test_default_input_for_known_models_and_error_for_others():
    r = pathfx.transform(zoo.build("resnet18_typec"), mode="balance", cycles=1)
    assert r.plan.input_shape == [1, 3, 32, 32]
    with pytest.raises(InputError, match="example_inputs"):
        pathfx.transform(small_cnn())


def test_wrong_input_shape_is_a_shape_error():
    with pytest.raises(ShapeError, match="channels"):
        pathfx.transform(small_cnn(), torch.randn(1, 3, 8, 8))


def test_a_model_that_changes_between_calls_is_refused():
    class Noisy(nn.Module):  # not a function of its input: no rewrite of it can verify
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x + torch.rand_like(x))))

    with pytest.raises(pathfx.PathfxError, match="different outputs on two calls with the same input"):
        pathfx.transform(Noisy(), torch.randn(2, 4), mode="balance", cycles=1)


def test_plan_json_round_trip():
    r = pathfx.transform(small_cnn(), torch.randn(1, 1, 8, 8), mode="path")
    again = Plan.from_json(r.plan.to_json())
    assert again == r.plan
    assert again.optimizer_settings["momentum"] == 0.0 and again.schedule["lr_grid"] == [0.1, 0.2, 0.5, 1.0]
    with pytest.raises(pathfx.PathfxError, match="not a pathfx plan"):
        Plan.from_json('{"kind": "adam"}')


def test_plan_on_the_wrong_model_raises():
    r = pathfx.transform(small_cnn(), torch.randn(1, 1, 8, 8), mode="balance", cycles=1)
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    with pytest.raises(PlanMismatchError, match="parameters differ"):
        r.plan.optimizer(other)


def _train(model, plan, data, steps=10, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = plan.optimizer(model)
    x, y = data.train
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        plan.after_step()
        losses.append(loss.item())
    return losses, batch_loss(model, data)


def batch_loss(model, data):
    """Loss on a fixed batch with training-mode normalisation: BatchNorm and P-BN running statistics
    lag behind for the first steps, the batch statistics do not."""
    model.train()
    with torch.no_grad():
        return F.cross_entropy(model(data.train[0][:512]), data.train[1][:512]).item()


@pytest.mark.parametrize("mode, kind", [("balance", "enorm"), ("path", "gsgd"), ("path", "sgd"), ("balance", "sgd")])
def test_ten_steps_of_each_plan_on_digits_reduce_the_loss(mode, kind):
    data = digits()
    model = small_cnn(seed=1)
    r = pathfx.transform(model, torch.randn(1, 1, 8, 8), mode=mode, plan=kind, **({"cycles": 2} if mode == "balance" else {}))
    m = r.model
    start = batch_loss(m, data)
    _, end = _train(m, r.plan, data)
    assert end < start, (start, end)


def test_enorm_plan_after_step_keeps_the_model_balanced():
    data = digits()
    r = pathfx.transform(small_cnn(seed=2, bn=False), torch.randn(1, 1, 8, 8), mode="balance", cycles=50)
    m = r.model
    opt = r.plan.optimizer(m)
    x, y = data.train
    for step in range(5):
        loss = F.cross_entropy(m(x[:64]), y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.eval()
        with torch.no_grad():
            out_before = m(x[:32]).clone()
        report = r.plan.after_step()
        with torch.no_grad():
            assert torch.allclose(m(x[:32]), out_before, rtol=1e-4, atol=1e-5)  # the cycle keeps the function
        m.train()
        objs = report.objective if hasattr(report, "objective") else None
        if objs:
            assert objs[-1] <= objs[0] * (1 + 1e-6)


def test_transform_cli(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    plan = tmp_path / "plan.json"
    code = main(["transform", "resnet18_typec", "--mode", "balance", "--cycles", "2", "--export", str(out),
                 "--plan-out", str(plan)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists() and plan.exists()
    assert "verification (float64)" in text and "onnxruntime" in text
    assert Plan.from_json(plan.read_text()).kind == "enorm"
    size = out.stat().st_size
    code = main(["transform", "resnet18_typec", "--mode", "balance", "--export", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "exists" in err and out.stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "plan.json"]


def test_readme_snippet_runs():
    import torchvision  # noqa: F401 - zoo installed the op shim when it was imported

    r = pathfx.transform(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), mode="path")
    assert r.verification.ok


def test_deep_path_form_keeps_groups_in_weight_space_to_stay_in_float32(monkeypatch):
    """ShuffleNet's path values underflow float32 when every group is reparameterized: every 4th
    group by distance to the output stays in weight space, and the float32 result is finite.
    Without that choice the cast result outputs NaN (which once passed 'NaN == NaN'): transform's
    last check refuses it."""
    torch.manual_seed(0)
    model, x = zoo.build("shufflenet_v2_x0_5").eval(), torch.randn(1, 3, 64, 64)
    r = pathfx.transform(model, x, mode="path", n_random=0)
    assert r.verification.ok and len(r.report.reparameterized_groups) > 0
    assert any("leave float32's range" in reason for reason in r.report.weight_space), r.report.weight_space
    with torch.no_grad():
        assert torch.isfinite(r.model.eval()(x)).all()
    monkeypatch.setattr(reparam_pass, "in_range", lambda *a: True)  # reparameterize every group
    with pytest.raises(VerificationError, match="NaN or Inf in torch.float32"):
        pathfx.transform(model, x, mode="path", n_random=0)
    r = pathfx.transform(model.double(), x.double(), mode="path", n_random=0)
    assert r.verification.ok and not r.report.weight_space  # in float64 the full path form is fine


def test_transform_cli_exits_1_when_verification_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(reparam_pass, "in_range", lambda *a: True)  # a path form float32 cannot hold
    out = tmp_path / "m.onnx"
    code = main(["transform", "shufflenet_v2_x0_5", "--mode", "path", "--input-shape", "1,3,64,64",
                 "--n-random", "0", "--export", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "NaN or Inf in torch.float32" in err
    assert list(tmp_path.iterdir()) == []  # nothing exported, nothing half-written
