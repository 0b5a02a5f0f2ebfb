"""No surprises for the caller: public calls leave the caller's model (and torch's global state)
exactly as they found it; checkpoints move between original and transformed models as far as
the parameters mean the same thing."""
from __future__ import annotations

import copy
import hashlib
import io
import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
import lab.train
from passes.pathnorm import path_norm
from lab.diagnose import diagnose
from pathfx.nn import PathLayer
from util import lively


class Net(nn.Module):
    """Nested modules, a residual add, BatchNorms, a conv without bias."""

    def __init__(self, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  norm(8))
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = torch.relu(self.conv(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def caller_model():
    """Hooks of every kind, two frozen parameters, the stem in eval mode and the rest training."""
    torch.manual_seed(0)
    model = lively(Net()).train()
    model.stem.eval()
    model.stem[0].weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    model.body[0].register_forward_hook(lambda m, args, out: None)
    model.head.register_forward_pre_hook(lambda m, args: None)
    model.body[3].register_full_backward_hook(lambda m, gin, gout: None)
    model.conv.register_forward_hook(lambda m, args, kwargs, out: None, with_kwargs=True)
    model.register_state_dict_pre_hook(lambda m, prefix, keep_vars: None)
    return model


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def hooks(obj) -> tuple:
    return tuple((k, tuple((key, id(fn)) for key, fn in v.items())) for k, v in sorted(vars(obj).items())
                 if "hook" in k and isinstance(v, dict))


def snapshot(model: nn.Module) -> dict:
    out = {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)):
        out[name] = (id(t), t.dtype, t.device, tuple(t.shape), t.requires_grad, t.data_ptr(), digest(t),
                     None if t.grad is None else digest(t.grad))
    for name, mod in model.named_modules(remove_duplicate=False):
        out[f"module '{name}'"] = (id(mod), type(mod), mod.training, hooks(mod))
    out["global module hooks"] = hooks(torch.nn.modules.module)
    return out


def global_state() -> tuple:
    return (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.get_default_dtype(),
            torch.is_grad_enabled(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())


def same_global_state(a, b) -> bool:
    return torch.equal(a[0], b[0]) and bool((a[1] == b[1]).all()) and a[2:] == b[2:]


def storages(obj) -> set[int]:
    """data pointers of every tensor of the modules reachable from a call's result."""
    if isinstance(obj, (tuple, list)):
        return set().union(*(storages(o) for o in obj)) if obj else set()
    mods = [obj] if isinstance(obj, nn.Module) else \
        [getattr(obj, a) for a in ("model", "module") if isinstance(getattr(obj, a, None), nn.Module)]
    return {t.untyped_storage().data_ptr() for m in mods for t in itertools.chain(m.parameters(), m.buffers())
            if t.numel()}


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

CALLS = {
    "find_groups": lambda m, tmp: pathfx.find_groups(m, X),
    "find_groups(train)": lambda m, tmp: pathfx.find_groups(m, X, train=True),
    "enorm": lambda m, tmp: pathfx.enorm(m, X),
    "transform(balance)": lambda m, tmp: pathfx.transform(m, X, mode="balance"),
    "transform(path)": lambda m, tmp: pathfx.transform(m, X, mode="path"),
    "reparameterize": lambda m, tmp: pathfx.reparameterize(m, X),
    "reparameterize(global, no pbn)": lambda m, tmp: pathfx.reparameterize(m, X, policy="global", pbn=False),
    "reparameterize(paper)": lambda m, tmp: pathfx.reparameterize(m, X, init="paper"),
    "verify": lambda m, tmp: pathfx.verify(m, copy.deepcopy(m), X),
    "export_onnx": lambda m, tmp: pathfx.export_onnx(m, tmp / "m.onnx", X),
    "path_norm": lambda m, tmp: path_norm(m, (1, 3, 8, 8)),
    "diagnose": lambda m, tmp: diagnose(m, X),
    "train.prepare(enorm)": lambda m, tmp: lab.train.prepare(m, "enorm", X),
    "train.prepare(gsgd)": lambda m, tmp: lab.train.prepare(m, "gsgd", X),
}
DRAWS_RANDOM = {"reparameterize(paper)", "train.prepare(gsgd)"}  # init="paper" draws fresh weights, as nn.init does


@pytest.mark.parametrize("call", list(CALLS))
def test_call_leaves_the_caller_alone(call, tmp_path):
    model = caller_model()
    before, glob = snapshot(model), global_state()
    mine = storages(model)
    result = CALLS[call](model, tmp_path)
    after = snapshot(model)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"{call} changed the caller's {changed}"
    if call not in DRAWS_RANDOM:
        assert same_global_state(glob, global_state()), f"{call} changed torch/numpy/random global state"
    if call not in ("find_groups", "find_groups(train)"):  # their .source may share leaves, as documented
        assert not storages(result) & mine, f"the result of {call} shares memory with the caller's model"


@pytest.mark.parametrize("mode", ["balance", "path"])
def test_training_the_transformed_model_leaves_the_caller_alone(mode):
    model = caller_model()
    before = snapshot(model)
    r = pathfx.transform(model, X, mode=mode)
    start = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    net = r.model.train()
    opt = r.plan.optimizer(net, X)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(4, 3, 8, 8, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
        opt.step()
        r.plan.after_step()
    assert any(not torch.equal(p, start[n]) for n, p in net.named_parameters())  # it did train
    assert snapshot(model) == before


# -- param_map: what a checkpoint means on each side -------------------------------------------------

def x64():
    return X.double()


def out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_balance_param_map_round_trip():
    """Without BatchNorm the balanced model has the original's parameters, rescaled, and the one
    BatchNorm its ENorm plan adds after the classifier: the map is the identity on the original's,
    the original's raw weights are a valid (unbalanced) point of the transformed model, and the
    balanced weights load back into the user's own class as the same function."""
    torch.manual_seed(0)
    original = lively(Net(bn=False)).double().eval()
    r = pathfx.transform(original, x64(), mode="balance")
    names = [n for n, _ in original.named_parameters()]
    assert r.plan.final_bn == "added"
    assert r.param_map == {n: n for n in names}
    assert [n for n, _ in r.model.named_parameters()] == names + ["final_bn.weight", "final_bn.bias"]
    assert any(not torch.equal(r.model.get_parameter(n), original.get_parameter(n)) for n in names)  # rescaled

    unbalanced = copy.deepcopy(r.model)
    unbalanced.load_state_dict({t: original.state_dict()[o] for t, o in r.param_map.items()}, strict=False)
    torch.testing.assert_close(out(unbalanced, x64()), out(original, x64()), rtol=1e-14, atol=0)

    back = Net(bn=False).double()
    back.load_state_dict({o: r.model.state_dict()[t] for t, o in r.param_map.items()})
    torch.testing.assert_close(out(back, x64()), out(r.model, x64()), rtol=1e-14, atol=0)
    assert pathfx.verify(back, original, x64()).max_rel <= 1e-10


def test_balance_param_map_with_batchnorm_maps_folded_layers():
    """With BatchNorm the balanced model is the BN-folded network: the map names each folded
    layer's source layer, BatchNorm parameters have no counterpart, and the mapped values are
    folded weights. Loading them back is the same function once the BatchNorms are identities."""
    torch.manual_seed(0)
    original = lively(Net()).double().eval()
    r = pathfx.transform(original, x64(), mode="balance")
    bn = {n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert not {o.rpartition(".")[0] for o in r.param_map.values()} & bn
    assert set(r.param_map) | {"final_bn.weight", "final_bn.bias"} == {n for n, _ in r.model.named_parameters()}

    back = copy.deepcopy(original)
    sd = r.model.state_dict()
    back.load_state_dict({o: sd[t] for t, o in r.param_map.items() if o in back.state_dict()}, strict=False)
    for name in bn:
        m = back.get_submodule(name)
        with torch.no_grad():
            m.running_mean.zero_(), m.running_var.fill_(1 - m.eps), m.weight.fill_(1), m.bias.zero_()
    assert pathfx.verify(back, original, x64()).max_rel <= 1e-10


def sequential_cnn(seed=0, bn=True):
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return lively(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                norm(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(),
                                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10)), seed=seed)


def test_path_param_map_round_trip_through_effective_weights():
    """In path form V has the weight's shape but holds path values, not weights: a checkpoint of the
    original does not load into it. What goes back is each path layer's effective weight (V / b with
    the red ±1) and bias, in the network's units: into the original class they compute the transformed
    function."""
    original = sequential_cnn(bn=False).double().eval()
    r = pathfx.transform(original, x64(), mode="path")
    layers = {n: m for n, m in r.model.named_modules() if isinstance(m, PathLayer)}
    assert {f"{n}.V" for n in layers} <= set(r.param_map)
    sd = r.model.state_dict()
    back_sd = {}
    for t, o in r.param_map.items():
        owner, _, leaf = t.rpartition(".")
        layer = layers.get(owner.removesuffix(".base"))
        back_sd[o] = layer.effective_weight().detach() if leaf == "V" else \
            layer.effective_bias().detach() if layer is not None and leaf == "bias" else sd[t]
        assert back_sd[o].shape == original.state_dict()[o].shape
    assert set(back_sd) == set(original.state_dict())
    back = sequential_cnn(seed=1, bn=False).double()
    back.load_state_dict(back_sd)
    assert pathfx.verify(back, r.model, x64()).max_rel <= 1e-12
    assert pathfx.verify(back, original, x64()).max_rel <= 1e-10

    raw = copy.deepcopy(r.model)  # V <- the original's weight: not the original function
    raw.load_state_dict({**raw.state_dict(), **{t: original.state_dict()[o] for t, o in r.param_map.items()}})
    assert pathfx.verify(raw, original, x64()).max_rel > 1e-3


def test_path_param_map_covers_nested_layers_and_pbn():
    original = Net().eval()
    r = pathfx.transform(original, X, mode="path")
    assert r.param_map.get("body.0.V") == "body.0.weight"
    assert r.param_map.get("body.3.bn.weight") == "body.4.weight"


# -- state_dict round trips of transformed models ------------------------------------------------

@pytest.mark.parametrize("mode", ["balance", "path"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_state_dict_round_trip_into_a_fresh_transform(mode, train, tmp_path):
    """Save a transformed model, load it (weights_only) into the transform of another instance of the
    architecture: the same outputs, bit for bit. Another seed gives other red signs in path form."""
    a = pathfx.transform(sequential_cnn(seed=0).eval(), X, mode=mode).model
    b = pathfx.transform(sequential_cnn(seed=1).eval(), X, mode=mode).model
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out(a, x), out(b, x))
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    a.train(train), b.train(train)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    buf = io.BytesIO()  # and again after a training step, optimizer state included
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    F.cross_entropy(a.train()(x), torch.arange(4)).backward()
    opt.step()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(out(a, x), out(b, x))
