"""`pathfx quantization` (lab/quantization.py): the CLE pairs torch.ao supports, the study's variants, and a
quick run end to end: report, figure, no overwrite without --force."""
import math

import pytest
import torch
from PIL import Image

import pathfx
import zoo
from passes.soundness import check_soundness
from lab.quantization import cle_pairs, p_inf_available, variants
from pathfx.analysis import prepare
from pathfx.cli import main


def folded(name, **kw):
    torch.manual_seed(0)
    model = zoo.build(name, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, prepare(model, x)


SMALL = {"vgg11_bn_small": {"width": 4}, "dwsep_net": {"width": 4}, "mobilenet_v2_relu": {"width_mult": 0.25}}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_study_models_are_free_relu_networks(name):
    model, x, _ = folded(name, **SMALL[name])
    assert zoo.lookup(name).input_shape == (1, 3, 32, 32) and zoo.lookup(name).build.__doc__
    assert model(x).shape == (2, 10)
    assert not any(isinstance(m, (torch.nn.ReLU6, torch.nn.Hardtanh)) for m in model.modules())
    groups = pathfx.find_groups(model, x, name=name)
    assert groups.num_free > 0 and not groups.barriers
    assert check_soundness(groups, x, reinit=True).ok


def test_mobilenet_v2_relu_has_the_papers_blocks():
    model = zoo.build("mobilenet_v2_relu")
    blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual"]
    assert len(blocks) == 17 and sum(b.skip for b in blocks) == 10  # 17 blocks, 10 identity skips
    groups = pathfx.find_groups(model, torch.randn(1, 3, 32, 32))
    assert any("depthwise" in g.tags for g in groups.groups) and any("identity-skip" in g.tags for g in groups.groups)


def test_cle_pairs_stop_at_adds_and_depthwise_inputs():
    _, _, gm = folded("resnet18")
    pairs = cle_pairs(gm)
    # each basic block's conv1 → conv2; the stem, the blocks' conv2 and the downsamples feed residual adds
    assert pairs == [[f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"] for s in range(1, 5) for b in range(2)]
    _, _, gm = folded("dwsep_net", width=4)
    pairs = cle_pairs(gm)
    # depthwise → pointwise in each of the 7 blocks, the last pointwise → fc; never a layer → depthwise conv
    assert len(pairs) == 8 and pairs[-1] == ["features.42", "fc"]
    mods = dict(gm.named_modules())
    assert all(mods[a].groups > 1 and mods[b].groups == 1 for a, b in pairs[:-1])


@torch.no_grad()
def test_variants_compute_the_same_function_with_other_weights():
    model, x, _ = folded("dwsep_net", width=4)
    measured = ("trained", "cle", "p2", "per_channel")
    nets, n_pairs = variants(model, x, measured)
    assert n_pairs == 8 and set(nets) == set(measured) and nets["per_channel"] == (nets["trained"][0], True)
    base = dict(nets["trained"][0].named_parameters())
    for v in ("cle", "p2"):
        net, per_channel = nets[v]
        assert not per_channel and pathfx.verify(model, net, x, n_random=2, rtol=1e-9).ok
        moved = max(float((p - base[n]).abs().max() / base[n].abs().max()) for n, p in net.named_parameters())
        assert moved > 1e-3, v  # the weights were rescaled
    assert all(torch.equal(a, b) for a, b in zip(base.values(), nets["trained"][0].parameters()))


def test_p_inf_is_measured_exactly_when_pathfx_enorm_accepts_it():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    try:
        pathfx.enorm(net, torch.ones(1, 2), p=math.inf, cycles=1)
        accepted = True
    except pathfx.InputError:
        accepted = False
    assert p_inf_available() == accepted


def test_quick_study_writes_report_and_figure(tmp_path, capsys):
    out = tmp_path / "quantization.md"
    assert main(["quantization", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("`pathfx quantization --quick --out", "| model | float | as trained | torch.ao CLE | pathfx p = 2 |",
                   "| vgg11_bn_small | 0 |", "## What the numbers say", "MinMax calibration on the first 50 training",
                   "![accuracy lost to int8 and logit error per variant](quantization.png)"):
        assert needle in text, needle
    assert ("pathfx p = ∞ |" in text) == p_inf_available()
    row = next(line for line in text.splitlines() if line.startswith("| vgg11_bn_small | 0 |"))
    cells = [float(c) for c in row.strip("|").split("|")[3:]]
    assert all(0 <= c <= 100 for c in cells) and abs(cells[0] - cells[1]) <= 100 / 450  # torch and ONNX float
    png = tmp_path / "quantization.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    capsys.readouterr()
    assert main(["quantization", "--quick", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == text


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds '0,x' does not parse"),
    (["--calibration", "70"], "calibration (70) must be a multiple of batch (50)"),
    (["--models", "vgg11_bn_smal"], "unknown model 'vgg11_bn_smal'; closest: vgg11_bn_small"),
    (["--out", "{tmp}/q.txt"], "does not end in .md"),
    (["--out", "{tmp}/no/q.md"], "does not exist"),
])
def test_user_errors_fail_before_training(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "q.md")]
    assert main(["quantization"] + out + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []
