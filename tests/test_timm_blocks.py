"""Every BatchNorm spelling folds, buffers used as weights are fixed maps, and timm's models are analysed.

The small hand-written models reproduce, shrunk, what timm's models do: a fused norm-activation
(``BatchNormAct2d``), torchvision's ``FrozenBatchNorm2d``, an anti-aliasing blur whose filter is a
buffer (tresnet), and an ``nn.Linear`` subclass whose forward calls ``F.linear`` (the heads of
fasternet, ghostnet, repghostnet, starnet and swiftformer, which crashed the path builder).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from fuzz_models import Blur, BNActReLU, BNActSiLU, FLinear, FrozenBN
from passes.fold_bn import ChannelAffine
from passes.soundness import check_soundness, lively_init

timm = zoo.timm.timm()
from timm.layers.norm_act import BatchNormAct2d  # noqa: E402 - after the torchvision shim


def _net(*mid, head=nn.Linear, c=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *mid, nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), head(c, 2))
    return lively_init(net.double().eval(), seed=1)


X = torch.randn(2, 3, 8, 8, dtype=torch.float64)


def _free(model, x=X, **kw):
    g = pathfx.find_groups(model, x, **kw)
    assert check_soundness(g, x, reinit=True).ok
    return g


@pytest.mark.parametrize("norm", [BNActReLU(4), BatchNormAct2d(4), nn.SyncBatchNorm(4)],
                         ids=["subclass", "timm-BatchNormAct2d", "SyncBatchNorm"])
def test_every_batchnorm_spelling_folds_into_the_conv_before_it(norm):
    fused = _free(_net(norm))
    plain = _free(_net(nn.BatchNorm2d(4)))
    assert fused.num_free == plain.num_free == 8
    assert not fused.barriers
    assert not any(isinstance(m, ChannelAffine) for m in fused.module.modules())  # folded, not an affine


def test_fused_activation_goes_through_the_rule_table():
    g = pathfx.find_groups(_net(BNActSiLU(4)), X)
    assert any(b.op == "silu" and "not positively homogeneous" in b.reason for b in g.barriers), g.barriers
    assert g.num_free == 4  # the conv after the SiLU still feeds the ReLU


def test_training_mode_functional_batchnorm_is_a_barrier_with_its_reason():
    class TrainBN(nn.BatchNorm2d):
        def forward(self, x):
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True)

    g = pathfx.find_groups(_net(TrainBN(4)), X)
    assert any("training mode" in b.reason for b in g.barriers), g.barriers
    assert g.num_free == 4


def test_frozen_batchnorm_becomes_a_frozen_affine():
    tv = zoo.registry.torchvision()
    frozen = tv.ops.misc.FrozenBatchNorm2d(4)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).uniform_(0.5, 1.5)
    for norm in (frozen, FrozenBN(4)):
        model = _net(norm)
        g = _free(model)
        affines = [m for m in g.module.modules() if isinstance(m, ChannelAffine)]
        assert len(affines) == 1 and not affines[0].weight.requires_grad  # buffers stay untrained
        assert g.num_free == 12  # conv | affine | conv: the affine is a diagonal layer
        with torch.no_grad():
            assert torch.allclose(g.module(X), model(X), rtol=1e-12, atol=0)


def test_buffer_weight_is_a_fixed_channel_preserving_map():
    g = _free(_net(nn.ReLU(), Blur(4)))
    assert g.num_free == 8 and not any("aa" in w or "filt" in w for gr in g.groups
                                       for w in [p.weight for p in gr.producers])
    for mode in ("balance", "path"):  # never a free layer: ENorm and the path form leave it alone
        r = pathfx.transform(_net(nn.ReLU(), Blur(4)), X, mode=mode)
        assert r.verification.ok


def test_fixed_map_that_mixes_channels_is_a_barrier():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.ones(4, 4, 1, 1, dtype=torch.float64))

        def forward(self, x):
            return nn.functional.conv2d(x, self.w)

    g = pathfx.find_groups(_net(nn.ReLU(), Mix()), X)
    assert any("mixes channels" in b.reason for b in g.barriers), g.barriers
    assert g.num_free == 4


@pytest.mark.parametrize("mode", ["balance", "path"])
def test_functional_linear_head_in_both_modes(mode):
    # the shrunk form of the path-mode crash of fasternet_s, ghostnet_050, repghostnet_050, starnet_s1,
    # swiftformer_s: an nn.Linear subclass that calls F.linear (timm's Linear) as the head
    model = _net(nn.BatchNorm2d(4), head=FLinear)
    r = pathfx.transform(model, X, mode=mode)
    assert r.verification.ok and r.groups.num_free == 8
    if mode == "path":
        assert not r.report.weight_space and r.report.variables == 8
        assert "7" in r.report.path_layers  # the head is a path layer like any nn.Linear


def test_caller_model_untouched():
    model = _net(BNActReLU(4), head=FLinear)
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    pathfx.transform(model, X, mode="path")
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- timm's models ----------------------------------------------------------------------------

FUSED = ["densenet121", "dpn68", "gernet_s", "resnetv2_18", "ese_vovnet19b_slim", "mixnet_s"]


def split_norm_act(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNormAct2d written out as nn.BatchNorm2d, its drop and its activation."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BatchNormAct2d):
            bn = nn.BatchNorm2d(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
            bn.load_state_dict(mod.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(bn, mod.drop, mod.act))
    return model.train(model.training)


def _timm(name):
    torch.manual_seed(0)
    return zoo.build(f"timm:{name}").eval(), torch.randn(1, 3, 32, 32)


def _fused_equals_split(name):
    model, x = _timm(name)
    split = split_norm_act(model).eval()
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), split(x))
    fused = pathfx.find_groups(model, x)
    assert fused.num_free > 0 and fused.num_free == pathfx.find_groups(split, x).num_free
    assert check_soundness(fused, x, reinit=True).ok
    return fused


def test_timm_densenet121_matches_torchvision():
    g = _fused_equals_split("densenet121")
    assert g.num_free == 44_576


@pytest.mark.parametrize("name", FUSED[1:])
def test_timm_fused_norm_act_equals_split(name):
    _fused_equals_split(name)


@pytest.mark.parametrize("name", FUSED + ["ghostnet_050"])
@pytest.mark.parametrize("mode", ["balance", "path"])
def test_timm_transform_verifies(name, mode):
    model, x = _timm(name)
    r = pathfx.transform(model, x, mode=mode, n_random=1)
    assert r.verification.ok and r.groups.num_free > 0


# timm models refused whole before automatic leaves: their untraceable blocks (attention with
# shape-dependent control flow) by class, and how many
OPAQUE = {"efficientvit_b0": {"LiteMLA": 4}, "mobilevit_xxs": {"MobileVitBlock": 3},
          "efficientvit_m0": {"LocalWindowAttention": 6}, "cpubone_nano": {"ConvAttention": 1}}


@pytest.mark.parametrize("name", sorted(OPAQUE))
def test_timm_untraceable_blocks_become_opaque_leaves(name):
    model, x = _timm(name)
    with pytest.raises(pathfx.TraceError, match="cannot trace submodule"):
        pathfx.find_groups(model, x, leaf_modules=())
    g = pathfx.find_groups(model, x)
    assert Counter(b.op for b in g.opaque) == OPAQUE[name]
    assert all(b.reason.startswith("opaque leaf: could not be traced: ") and b.module for b in g.opaque)
    assert g.num_free > 0 and check_soundness(g, x, reinit=True).ok
    for mode in ("balance", "path"):
        r = pathfx.transform(model, x, mode=mode, n_random=1)
        assert r.verification.ok and r.groups.num_free == g.num_free


def test_timm_names_resolve_and_misspellings_list_the_closest():
    assert zoo.lookup("timm:resnet18").source == "timm"
    with pytest.raises(pathfx.PathfxError, match="closest: timm:densenet121"):
        zoo.lookup("timm:densnet121")
    assert len(zoo.timm.sweep_names()) == len(zoo.timm.SWEEP) >= 90


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.timm.SWEEP.values())
def test_timm_sweep_fused_equals_split(name):
    model, x = _timm(name)
    if not any(isinstance(m, BatchNormAct2d) for m in model.modules()):
        pytest.skip(f"{name} has no fused norm-activation")
    try:
        fused = pathfx.find_groups(model, x)
    except pathfx.PathfxError as e:  # refused (untraceable, fixed input size): the split model must be too
        with pytest.raises(type(e)):
            pathfx.find_groups(split_norm_act(model).eval(), x)
        return
    assert fused.num_free == pathfx.find_groups(split_norm_act(model).eval(), x).num_free
