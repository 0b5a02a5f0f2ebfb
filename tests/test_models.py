"""Group discovery on real torchvision models: soundness everywhere, exact counts where derived by hand."""
from __future__ import annotations

import pytest
import torch

import pathfx
import zoo
from passes.groupset import apply_factors
from passes.soundness import check_soundness, outputs, random_factors, rel_error
from util import lively

DEFAULT = ["resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "alexnet", "squeezenet1_0", "squeezenet1_1",
           "densenet121", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "regnet_x_400mf",
           "shufflenet_v2_x0_5", "efficientnet_b0", "convnext_tiny", "resnet18_typec"]
SMALL_INPUT = {"inception_v3": (1, 3, 299, 299), "resnet18_typec": (1, 3, 32, 32)}
# Models whose default input (224) is needed, or whose 64×64 input is too small for their pooling.
NEEDS_224 = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
             "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t", "alexnet", "squeezenet1_0", "squeezenet1_1"}


def analysed(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = lively(zoo.build(name).eval(), seed)
    shape = SMALL_INPUT.get(name, (1, 3, 224, 224) if name in NEEDS_224 else (1, 3, 64, 64))
    x = torch.randn(*shape)
    return model, x, pathfx.find_groups(model, x, name=name)


def assert_sound(groups, x):
    res = check_soundness(groups, x, seed=1)
    assert res.ok, f"{groups.model_name}: rel error {res.max_rel_error:.3e}"
    if groups.num_free:
        # the check can fail: a factor on a producer without its consumers changes the output
        m = groups.module.double().eval()
        g0 = groups.groups[-1]
        ref = outputs(m, [x.double()])
        p = g0.producers[0]
        with torch.no_grad():
            m.get_parameter(p.weight).mul_(3.0)
            if p.bias:
                m.get_parameter(p.bias).mul_(3.0)
        assert rel_error(ref, outputs(m, [x.double()]))[0] > 1e-9


@pytest.mark.parametrize("name", DEFAULT)
def test_soundness_default_models(name):
    model, x, groups = analysed(name)
    assert_sound(groups, x)


def test_resnet18_counts():
    _, _, g = analysed("resnet18")
    assert (len(g.groups), g.num_free) == (12, 2880)
    streams = sorted(grp.width for grp in g.groups if "identity-skip" in grp.tags)
    assert streams == [64, 128, 256, 512]
    stem = next(grp for grp in g.groups if any(p.weight == "conv1.weight" for p in grp.producers))
    assert "identity-skip" in stem.tags and stem.width == 64  # the stem joins the first stream
    assert sorted(grp.width for grp in g.groups if "identity-skip" not in grp.tags) == \
        [64, 64, 128, 128, 256, 256, 512, 512]


def test_vgg16_counts():
    _, _, g = analysed("vgg16")
    assert (len(g.groups), g.num_free) == (15, 12416)
    last_conv = next(grp for grp in g.groups if grp.producers[0].weight == "features.28.weight")
    fc1 = next(c for c in last_conv.consumers if c.weight == "classifier.0.weight")
    assert len(fc1.in_vars) == 512 * 7 * 7 and fc1.in_vars[:49] == [0] * 49  # through pool + flatten


def test_resnet50_counts():
    # 4 streams (256+512+1024+2048) + the stem's 64 (layer1.0 has a downsample, so the stem
    # is not in a stream) + 2 internal groups per bottleneck (3·2·64 + 4·2·128 + 6·2·256 + 3·2·512)
    _, _, g = analysed("resnet50")
    assert (len(g.groups), g.num_free) == (37, 3840 + 64 + 7552)


def test_densenet121_counts():
    # per dense layer: the norm1 affine (its input width), conv1 (128), conv2 (32); per
    # transition: its affine and its conv; conv0 (64) and norm5 (1024). See docs/models.md.
    _, _, g = analysed("densenet121")
    assert (len(g.groups), g.num_free) == (182, 44576)
    assert sum("affine" in grp.tags for grp in g.groups) == 58 + 3 + 1


def test_mobilenet_v2_relu6_frozen_streams_free():
    _, _, g = analysed("mobilenet_v2")
    assert g.num_free > 0
    relu6 = [f for f in g.frozen if "ReLU6" in f.reason]
    assert relu6 and all("saturates" in f.reason for f in relu6)
    for grp in g.groups:  # what stays free are the linear-bottleneck streams
        assert all(".conv.2." in p.weight or p.weight.endswith("conv.1.weight") or p.weight.startswith("features.1.")
                   for p in grp.producers), grp.producers
    frozen_layers = {w for f in relu6 for w in f.layers}
    assert "features.0.0.weight" in frozen_layers and "features.2.conv.0.0.weight" in frozen_layers


def test_factors_are_independent_per_variable():
    _, x, g = analysed("resnet18")
    f = random_factors(g, seed=3)
    assert all(len(v) == grp.width for grp, v in zip(g.groups, f.values()))
    m = g.module
    before = m.get_parameter("fc.weight").clone()
    apply_factors(m, g, f)
    assert not torch.equal(before, m.get_parameter("fc.weight"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(zoo.torchvision_names()) - set(DEFAULT)))
def test_soundness_all_torchvision(name):
    if name in {"vit_h_14", "regnet_y_128gf"}:
        pytest.skip("several GiB in float64: measured by the large-model run, not here")
    model, x, groups = analysed(name)
    assert_sound(groups, x)
