"""The papers' architectures of the zoo: shapes, documented initialisations and hyper-parameters, the
initialisations' statistics, analysable and sound."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from lab.data import digits, mnist1d
from passes.soundness import check_soundness

# small widths: the group structure does not depend on the width, the run time does
SMALL = {"resnet18_cifar": {"width": 16}, "resnet34_cifar": {"width": 8}, "resnet50_cifar": {"width": 8},
         "plainnet34": {"width": 8}, "cifar_nv": {"width": 16}, "enorm_fc": {"width": 40},
         "pbn_mlp": {"width": 64}, "plainnet18": {"width": 8}, "stacked_cnn": {"depth": 4, "width": 16},
         "resnet18_typec": {"width": 8}, "mnist1d_mlp": {"width": 32}, "mnist1d_cnn": {"width": 8},
         "mnist1d_plain": {"width": 4}}

# What each paper says (builders' docstrings): Xavier for ENorm's fully connected net and CIFAR-NV (§6.1–6.2),
# Kaiming for its ResNet (§6.3) and for the P-BN paper's networks (He et al. 2015a/2016).
INIT = {"enorm_fc": "xavier", "cifar_nv": "xavier", "mnist1d_mlp": "xavier", "resnet18_typec": "kaiming",
        "plainnet18": "kaiming", "plainnet34": "kaiming", "resnet18_cifar": "kaiming", "resnet34_cifar": "kaiming",
        "resnet50_cifar": "kaiming", "pbn_mlp": "kaiming", "stacked_cnn": "kaiming", "mnist1d_cnn": "kaiming",
        "mnist1d_plain": "kaiming"}
# (name, builder arguments): widths at which every layer has a few hundred weights or more, so that the
# empirical std is within a few percent of the drawn one; the variants without BN have biases to check
INIT_CASES = [("enorm_fc", {"width": 40}), ("enorm_fc", {"width": 40, "norm": "bn"}), ("cifar_nv", {"width": 32}),
              ("mnist1d_mlp", {}), ("mnist1d_mlp", {"norm": "bn"}), ("resnet18_typec", {"width": 16}),
              ("resnet18_typec", {"width": 16, "norm": "bn"}), ("plainnet18", {"width": 8}),
              ("plainnet18", {"width": 8, "norm": False}), ("plainnet34", {"width": 8}),
              ("resnet18_cifar", {"width": 16}), ("resnet34_cifar", {"width": 16}), ("resnet50_cifar", {"width": 16}),
              ("pbn_mlp", {"width": 64}), ("stacked_cnn", {"depth": 4, "width": 16}),
              ("stacked_cnn", {"depth": 4, "width": 16, "norm": False}), ("mnist1d_cnn", {}),
              ("mnist1d_cnn", {"norm": "none"}), ("mnist1d_plain", {"width": 64}),
              ("mnist1d_plain", {"width": 64, "norm": "none"})]
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _fans(w: torch.Tensor) -> tuple[int, int]:
    k = w[0, 0].numel()  # kernel size (1 for a linear layer)
    return w.shape[1] * k, w.shape[0] * k


def _std_deviations(model: nn.Module, scheme: str) -> list[tuple[str, float, float]]:
    """(layer, |empirical std / the formula's − 1|, tolerance) for every conv and linear layer. Formulas:
    Kaiming (He et al. 2015a eq. 10) std = √(2/fan_in); Xavier (Glorot & Bengio 2010 eq. 16) U(±√(6/(fan_in +
    fan_out))), std = √(2/(fan_in + fan_out)). Tolerance: 5 standard errors of a sample std, 5/√(2n)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LAYERS):
            w = mod.weight.detach().double()
            fan_in, fan_out = _fans(w)
            want = math.sqrt(2 / fan_in) if scheme == "kaiming" else math.sqrt(2 / (fan_in + fan_out))
            out.append((name, abs(float(w.std()) / want - 1), 5 / math.sqrt(2 * w.numel())))
    return out


@pytest.mark.parametrize("name, kw", INIT_CASES, ids=[f"{n}-{'-'.join(map(str, kw.values()))}" for n, kw in INIT_CASES])
def test_init_statistics(name, kw):
    scheme = INIT[name]
    assert zoo.lookup(name).build.hparams["init"] == scheme
    torch.manual_seed(0)
    model = zoo.build(name, **kw)
    deviations = _std_deviations(model, scheme)
    assert deviations and all(dev <= tol for _, dev, tol in deviations), deviations
    for mod in model.modules():
        if isinstance(mod, LAYERS):
            w = mod.weight.detach().double()
            fan_in, fan_out = _fans(w)
            if scheme == "xavier":  # uniform: nothing beyond the bound
                assert float(w.abs().max()) <= math.sqrt(6 / (fan_in + fan_out)) * (1 + 1e-6)
            else:  # normal: about 8 % beyond √3 σ, where a uniform of the same std has none
                assert float((w.abs() > math.sqrt(3) * math.sqrt(2 / fan_in)).double().mean()) > 0.03
            assert mod.bias is None or not mod.bias.any()
        if isinstance(mod, NORMS):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and not mod.bias.any()
    if "norm" in kw and kw["norm"] in ("none", False):
        assert any(mod.bias is not None for mod in model.modules() if isinstance(mod, LAYERS))
    # the tolerance tells the formula from PyTorch's default init (std·√fan_in = 1/√3) on every layer
    for mod in model.modules():
        if isinstance(mod, LAYERS):
            mod.reset_parameters()
    assert all(dev > tol for _, dev, tol in _std_deviations(model, scheme))


def test_every_paper_model_has_its_init_stated():
    for name in INIT:
        doc = zoo.lookup(name).build.__doc__
        assert "Init: " + {"xavier": "Xavier", "kaiming": "Kaiming"}[INIT[name]] in doc, name
    assert {n for n, _ in INIT_CASES} == set(INIT) == set(SMALL)


def test_plainnet18_folded_logits_vary_across_a_batch():
    # With every BN folded (as the balance form trains it) the signal must reach the logits: PyTorch's default
    # init shrinks it by ~√6 per layer, and plainnet18's logits then differed by ~1e-8 across a batch.
    x = digits((3, 32, 32)).train[0][:64]
    spread = {}
    for init in ("paper", "pytorch"):
        torch.manual_seed(0)
        model = zoo.build("plainnet18").eval()
        if init == "pytorch":
            for mod in model.modules():
                if isinstance(mod, LAYERS):
                    mod.reset_parameters()
        # plan "sgd": the folded network alone, without the BatchNorm the ENorm plan adds after the classifier
        folded = pathfx.transform(model, x[:1], mode="balance", plan="sgd", cycles=0, verify=False).model
        assert not any(isinstance(m, NORMS) for m in folded.modules())
        with torch.no_grad():
            spread[init] = float(folded(x).std(0).max())  # measured: 0.12 (paper) vs 1.4e-8 (pytorch)
    assert spread["paper"] > 0.05 and spread["pytorch"] < 1e-6, spread


@pytest.mark.parametrize("name", sorted(SMALL))
def test_free_groups_and_sound(name):
    torch.manual_seed(0)
    model = zoo.build(name, **SMALL[name]).eval()
    x = torch.randn(2, *zoo.lookup(name).input_shape[1:])
    assert model(x).shape == (2, 10)
    groups = pathfx.find_groups(model, x, name=name)
    assert groups.num_free > 0 and not groups.barriers
    res = check_soundness(groups, x, reinit=True)
    assert res.ok, res


@pytest.mark.parametrize("name", sorted(SMALL))
def test_documented(name):
    fn = zoo.lookup(name).build
    assert fn.__doc__ and "Paper's training" in fn.__doc__
    assert fn.hparams


def test_resnet18_cifar_groups_match_torchvision_structure():
    # the CIFAR stem has no max-pool, otherwise resnet18's streams and block groups (DESIGN §1: 12 groups)
    model = zoo.build("resnet18_cifar", width=16).eval()
    g = pathfx.find_groups(model, torch.randn(1, 3, 32, 32))
    assert (len(g.groups), g.num_free) == (12, 2880 // 4)
    assert sorted(grp.width for grp in g.groups if "identity-skip" in grp.tags) == [16, 32, 64, 128]


def test_sizes_at_paper_width():
    counts = {n: sum(p.numel() for p in zoo.build(n).parameters()) for n in ("enorm_fc", "cifar_nv")}
    # 3072·500+500 + 3·(500·500+500) + 500·10+10; CIFAR-NV conv weights+biases and the final BN
    assert counts["enorm_fc"] == 3072 * 500 + 500 + 3 * (500 * 500 + 500) + 5010
    convs = [(3, 128, 9), (128, 128, 9), (128, 128, 9), (128, 256, 9), (256, 256, 9), (256, 256, 9),
             (256, 320, 9), (320, 320, 1), (320, 10, 1)]
    assert counts["cifar_nv"] == sum(i * o * k + o for i, o, k in convs) + 2 * 10
    mlp = zoo.build("pbn_mlp", width=32)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 32, 32, 32, 10]


def test_resnet50_cifar_has_bottlenecks_and_projections():
    m = zoo.build("resnet50_cifar", width=8)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 * 3 + 4  # stem, 16 bottlenecks, 4 projection shortcuts
    assert m.fc.in_features == 8 * 8 * 4


# (name, arguments, free variables = hidden channels (mlp: 4 × 256; cnn: 3 × 32; plain: stem 16 + 4 convs × 16,
# 32, 64, 128), has BatchNorm: the defaults are the mlp without, the convnets with)
MNIST1D = [("mnist1d_mlp", {}, 1024, False), ("mnist1d_mlp", {"norm": "bn"}, 1024, True),
           ("mnist1d_cnn", {}, 96, True), ("mnist1d_cnn", {"norm": "none"}, 96, False),
           ("mnist1d_plain", {}, 976, True), ("mnist1d_plain", {"norm": "none"}, 976, False)]


@pytest.mark.parametrize("name, kw, free, bn", MNIST1D, ids=[f"{n}-{'bn' if b else 'none'}" for n, _, _, b in MNIST1D])
def test_mnist1d_models_are_sound_and_transform_in_both_modes(name, kw, free, bn):
    torch.manual_seed(0)
    model = zoo.build(name, **kw).eval()
    x = mnist1d().train[0][:8]
    assert zoo.lookup(name).input_shape == (1, 1, 40) and model(x).shape == (8, 10)
    groups = pathfx.find_groups(model, x, name=name)
    assert groups.num_free == free and not groups.barriers
    res = check_soundness(groups, x, reinit=True)
    assert res.ok, res
    for mode in ("balance", "path"):
        r = pathfx.transform(model, x, mode=mode)
        assert r.verification.ok and r.verification.max_rel <= 1e-10, (mode, r.verification)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == bn
    assert any(type(m).__name__ == "PBN" for m in r.model.modules()) == bn  # the path form's BNs are P-BNs


def test_mnist1d_models_shapes_and_norm_option():
    cnn = zoo.build("mnist1d_cnn")
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in cnn.modules()
            if isinstance(m, nn.Conv1d)] == [(1, 32, 5, 2), (32, 32, 3, 2), (32, 32, 3, 2)]
    assert cnn.fc.in_features == 32 * 5 and sum(isinstance(m, nn.BatchNorm1d) for m in cnn.modules()) == 3
    plain = zoo.build("mnist1d_plain")
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 17 and sum(isinstance(m, nn.BatchNorm1d) for m in plain.modules()) == 17
    assert len([m for m in zoo.build("mnist1d_plain", blocks=(3, 4, 6, 3)).modules() if isinstance(m, nn.Conv1d)]) == 33
    assert not any(isinstance(m, nn.BatchNorm1d) for m in zoo.build("mnist1d_plain", norm="none").modules())
    mlp = zoo.build("mnist1d_mlp")
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [256, 256, 256, 256, 10]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in mlp.modules())
    with pytest.raises(pathfx.PathfxError, match="unknown norm 'gn'"):
        zoo.build("mnist1d_cnn", norm="gn")


@pytest.mark.slow
def test_mnist1d_cnn_sgd_bn_reaches_90_percent():
    # 30 epochs of the SGD+BN plan (lr 0.1, momentum 0.9, batch 128): 93.5–94.9 % over seeds 0–4, ~9 s each
    from lab.train import train

    torch.set_num_threads(1)
    data = mnist1d()
    for seed in (0, 1, 2):
        r = train("mnist1d_cnn", "sgd", data, 30, seed=seed, progress=False)
        assert r.ok and r.rows[-1]["test_acc"] >= 0.90, (seed, r.rows[-1])
