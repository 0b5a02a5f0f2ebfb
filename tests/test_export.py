"""The torch.export front end (passes/export.py): the same groups as symbolic tracing, transform and
ONNX export through it, models only it can follow, and its errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
import zoo
from passes.errors import InputError, TraceError
from passes.soundness import check_soundness
from pathfx.cli import main
from util import lively

QUICK = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x0_5", "resnet18_typec", "cifar_nv", "enorm_fc",
         "pbn_mlp", "stacked_cnn"]


def built(name: str, size: int = 32):
    torch.manual_seed(0)
    model = lively(zoo.build(name).eval(), 0)
    shape = tuple(zoo.lookup(name).input_shape)
    if len(shape) == 4 and min(shape[2:]) > size:
        shape = shape[:2] + (size, size)
    return model, torch.randn(*shape)


def structure(groups) -> list:
    return sorted((g.width, tuple(sorted(p.weight for p in g.producers)), tuple(sorted(c.weight for c in g.consumers)))
                  for g in groups.groups)


@pytest.mark.parametrize("name", QUICK)
def test_same_groups_as_symbolic_trace(name):
    model, x = built(name)
    fx_groups = pathfx.find_groups(model, x)
    ex = pathfx.find_groups(model, x, frontend="export")
    assert ex.num_free == fx_groups.num_free and ex.num_free > 0
    assert structure(ex) == structure(fx_groups)  # the same parameters, by their own names
    assert check_soundness(ex, x, reinit=True).ok


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.all_names())
def test_same_num_free_on_every_model(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    shape = tuple(zoo.lookup(name).input_shape)
    x = torch.randn(*(shape[:2] + (64, 64) if len(shape) == 4 and min(shape[2:]) > 64 and name not in NEEDS_SIZE
                      else shape))
    fx_groups = pathfx.find_groups(model, x)
    ex = pathfx.find_groups(model, x, frontend="export")
    assert (ex.num_free, len(ex.groups)) == (fx_groups.num_free, len(fx_groups.groups))


# models with a fixed input size (ViT, Swin, MaxViT) or pooling that 64 px inputs are too small for
NEEDS_SIZE = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b", "swin_v2_t",
              "swin_v2_s", "swin_v2_b", "maxvit_t", "alexnet", "squeezenet1_0", "squeezenet1_1", "inception_v3"}


def transform_and_export(model, x, tmp_path, mode):
    r = pathfx.transform(model, x, mode=mode, frontend="export", n_random=2, **({"cycles": 5} if mode == "balance"
                                                                                else {}))
    assert r.verification.ok and r.verification.max_rel <= 1e-10, str(r.verification)
    rep = pathfx.export_onnx(r.model, str(tmp_path / f"{mode}.onnx"), x, exporter="torchscript")
    assert rep.verification.ok and rep.max_rel <= 1e-4
    return r


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("mode", ["balance", "path"])
def test_transform_verifies_and_exports(name, mode, tmp_path):
    model, x = built(name)
    r = transform_and_export(model, x, tmp_path, mode)
    assert r.groups.num_free == pathfx.find_groups(model, x).num_free
    if mode == "path":
        assert r.report.path_layers and r.report.pbn_layers


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["balance", "path"])
def test_densenet121_transform_verifies_and_exports(mode, tmp_path):
    model, x = built("densenet121")
    assert transform_and_export(model, x, tmp_path, mode).groups.num_free == 44576


# -- what only the export front end follows ------------------------------------------------------

class ShapeBranch(nn.Module):
    """A branch on the input's size in the model's own forward: symbolic tracing cannot take it,
    and no submodule can be kept opaque instead."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        if h.shape[-1] > 8:  # large inputs are pooled first
            h = F.max_pool2d(h, 2)
        h = torch.relu(self.c2(h)) + h
        return self.fc(h.mean((2, 3)))


def shape_branch():
    torch.manual_seed(0)
    return lively(ShapeBranch().eval(), 0), torch.randn(2, 3, 16, 16)


def test_shape_dependent_control_flow_is_followed(tmp_path):
    model, x = shape_branch()
    with pytest.raises(TraceError, match="(?s)cannot trace the forward of ShapeBranch.*frontend=\"export\""):
        pathfx.find_groups(model, x)
    g = pathfx.find_groups(model, x, frontend="export")
    assert g.num_free == 8 and [sorted(p.weight for p in gr.producers) for gr in g.groups] == \
        [["c1.weight", "c2.weight"]]  # c1 (BatchNorm folded) and c2 add into one stream
    assert "identity-skip" in g.groups[0].tags and "maxpool" in g.groups[0].tags
    assert check_soundness(g, x, reinit=True).ok
    for mode in ("balance", "path"):
        transform_and_export(model, x, tmp_path, mode)


def timm_model(name, size):
    torch.manual_seed(0)
    return zoo.build(f"timm:{name}").eval(), torch.randn(1, 3, size, size)


def test_export_sees_through_what_fx_keeps_opaque():
    model, x = timm_model("mobilevit_xxs", 32)
    fx_groups = pathfx.find_groups(model, x)
    ex = pathfx.find_groups(model, x, frontend="export")
    assert len(fx_groups.opaque) == 3 and not ex.opaque
    assert ex.num_free > fx_groups.num_free > 0  # the convolutions inside the blocks fx keeps opaque
    assert check_soundness(ex, x, reinit=True).ok


@pytest.mark.slow
def test_a_timm_model_fx_cannot_trace_at_all():
    model, x = timm_model("crossvit_tiny_240", 240)
    with pytest.raises(TraceError, match="cannot trace the forward of CrossVit"):
        pathfx.find_groups(model, x)
    ex = pathfx.find_groups(model, x, frontend="export")
    assert ex.num_free == 0 and ex.barriers  # attention and LayerNorm: barriers, each with its reason


def test_callers_model_unchanged():
    model, x = shape_branch()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    pathfx.find_groups(model, x, frontend="export")
    pathfx.transform(model, x, mode="balance", frontend="export", cycles=2, n_random=1)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p is params[n] for n, p in model.named_parameters())


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = self.c(x)
        return h if h.sum() > 0 else -h


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: pathfx.find_groups(ValueBranch(), x, frontend="export"), TraceError,
     ["torch.export cannot capture ValueBranch"]),
    (lambda m, x: pathfx.find_groups(m, x, frontend="export", train=True), InputError, ["eval mode only"]),
    (lambda m, x: pathfx.find_groups(m, x, frontend="export", leaf_modules=["c2"]), InputError, ["fx front end"]),
    (lambda m, x: pathfx.find_groups(m, x, frontend="jit"), InputError, ["unknown frontend 'jit'"]),
])
def test_errors_are_one_line(call, error, words):
    model, x = shape_branch()
    with pytest.raises(error) as e:
        call(model, x)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_cli_front_end_option(capsys):
    here = os.path.dirname(__file__)
    code = main(["groups", f"{os.path.join(here, 'cli_models.py')}:mlp", "--frontend", "export"])
    out = capsys.readouterr().out
    assert code == 0 and "2 groups" in out and "0.weight" in out
