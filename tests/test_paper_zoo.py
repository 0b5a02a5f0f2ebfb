"""The papers' architectures of zoo/paper.py: shapes, documented hyper-parameters, analysable and sound."""
from __future__ import annotations

import pytest
import torch

import pathfx
import zoo
from passes.soundness import check_soundness

# small widths: the group structure does not depend on the width, the run time does
SMALL = {"resnet18_cifar": {"width": 16}, "resnet34_cifar": {"width": 8}, "resnet50_cifar": {"width": 8},
         "plainnet34": {"width": 8}, "cifar_nv": {"width": 16}, "enorm_fc": {"width": 40},
         "pbn_mlp": {"width": 64}}


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
