"""passes.onnx_export / pathfx.export_onnx: folding, onnx.checker, onnxruntime vs torch, atomic writes."""
import os
import tempfile

import onnx
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import pathfx
from pathfx.cli import main
import zoo
from passes import onnx_export
from passes.errors import InputError, PathfxError, ShapeError, VerificationError


def _no_temp_files(directory):
    return not [f for f in os.listdir(directory) if f.startswith(".pathfx-")]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return zoo.build("resnet18").eval(), torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18_export(resnet18, tmp_path_factory):
    model, x = resnet18
    path = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    return pathfx.export_onnx(model, path, x)


def test_resnet18_matches_onnxruntime(resnet18_export):
    r = resnet18_export
    assert os.path.isfile(r.path) and _no_temp_files(os.path.dirname(r.path))
    onnx.checker.check_model(onnx.load(r.path))
    assert r.verification.ok and r.max_rel <= 1e-4
    print(f"\nresnet18 1x3x64x64: {r.exporter} exporter, max rel {r.max_rel:.2e}, max abs {r.max_abs:.2e}")
    assert pathfx.onnx_op_counts(r.path) == r.ops
    assert r.ops["Conv"] == 20 and r.ops["Gemm"] == 1 and r.ops["Add"] == 8
    assert "BatchNormalization" not in r.ops  # folded into the convs


def test_balanced_resnet18_exports_the_same_operator_graph(resnet18, resnet18_export, tmp_path):
    model, x = resnet18
    balanced, report = pathfx.enorm(model, x, cycles=2)
    assert report.objective[-1] < report.objective[0]
    assert pathfx.verify(model, balanced, x, n_random=2, rtol=1e-5).ok  # float32 weights
    r = pathfx.export_onnx(balanced, tmp_path / "balanced.onnx", x)
    assert r.max_rel <= 1e-4
    assert r.ops == resnet18_export.ops, (r.ops, resnet18_export.ops)
    a, b = onnx.load(resnet18_export.path), onnx.load(r.path)
    conv_w = [i for i in b.graph.initializer if len(i.dims) == 4]
    assert conv_w and onnx.numpy_helper.to_array(conv_w[0]).shape == tuple(conv_w[0].dims)
    assert [i.dims for i in a.graph.initializer if len(i.dims) == 4] == [i.dims for i in conv_w]


@pytest.fixture(scope="module")
def typec_export(tmp_path_factory):
    torch.manual_seed(0)  # as the CLI builds it (--seed 0)
    model = zoo.build("resnet18_typec").eval()
    return pathfx.export_onnx(model, tmp_path_factory.mktemp("typec") / "typec.onnx", torch.randn(1, 3, 32, 32))


def test_type_c_resnet18(typec_export):
    r = typec_export
    print(f"\nresnet18_typec 1x3x32x32: max rel {r.max_rel:.2e}")
    assert r.max_rel <= 1e-4 and r.ops["Conv"] > 0


def test_cli_verify(typec_export, tmp_path, capsys):
    path = typec_export.path
    assert main(["verify", path, "resnet18_typec", "--n-random", "3"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_typec vs" in out and ": ok" in out and "on 4 input(s)" in out
    assert main(["verify", path, "resnet18_typec", "--seed", "1", "--n-random", "0"]) == 1  # other weights
    out = capsys.readouterr().out
    assert "FAILED" in out and "worst element" in out
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    for argv, msg in [([path, "resnet18_typec", "--input-shape", "1,3,64,64"], "does not match the ONNX model's input"),
                      ([str(tmp_path / "none.onnx"), "resnet18_typec"], "does not exist"),
                      ([str(junk), "resnet18_typec"], "is not an ONNX file")]:
        assert main(["verify"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]


class Positive(nn.Module):
    def forward(self, w):
        return torch.exp(w)


def parametrized_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    parametrize.register_parametrization(net[0], "weight", Positive())
    parametrize.register_parametrization(net[3], "weight", nn.utils.parametrizations.orthogonal(
        nn.Linear(4 * 6 * 6, 5)).parametrizations.weight[0])
    return net.eval()


def test_parametrizations_are_folded_into_static_weights(tmp_path):
    net = parametrized_net()
    x = torch.randn(2, 3, 8, 8)
    before = net(x)
    r = pathfx.export_onnx(net, tmp_path / "p.onnx", x, exporter="torchscript")
    assert torch.equal(net(x), before)  # the caller's parametrized model still works
    assert sorted(r.folded) == ["0.weight", "3.weight"]
    assert r.max_rel <= 1e-4
    assert parametrize.is_parametrized(net[0]) and parametrize.is_parametrized(net[3])  # caller's model kept
    proto = onnx.load(r.path)
    assert "Exp" not in pathfx.onnx_op_counts(proto)  # the parametrization is not in the graph
    assert len(proto.graph.initializer) == 4


def test_path_model_folds_to_plain_layers(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 8 * 8, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    path, rep = pathfx.reparameterize(net, x)
    assert rep.pbn_layers
    plain = pathfx.export_onnx(net, tmp_path / "plain.onnx", x, exporter="torchscript")  # the faster one
    r = pathfx.export_onnx(path, tmp_path / "path.onnx", x, exporter="torchscript")
    assert sorted(r.folded) == sorted(rep.path_layers)
    assert r.max_rel <= 1e-4 and r.ops == plain.ops


def test_wrong_input_shape(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ShapeError, match=r"failed on the example input \(shape 1x3x9x9\)"):
        pathfx.export_onnx(net, tmp_path / "m.onnx", torch.randn(1, 3, 9, 9))
    assert os.listdir(tmp_path) == []


def test_existing_file_is_refused_and_unchanged(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        pathfx.export_onnx(nn.Linear(3, 2), target, torch.randn(1, 3))
    assert target.read_bytes() == b"keep me" and _no_temp_files(tmp_path)
    r = pathfx.export_onnx(nn.Linear(3, 2), target, torch.randn(1, 3), overwrite=True)
    assert r.verification.ok and onnx.load(target).graph.node[0].op_type == "Gemm"


def _unwritable_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if not os.access(d, os.W_OK) or os.geteuid() != 0:
        return d
    try:  # root ignores modes; sysfs refuses new files even to root
        fd, probe = tempfile.mkstemp(dir="/sys")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return "/sys"
    pytest.skip("no unwritable directory available")


def test_unwritable_or_missing_directory(tmp_path):
    d = _unwritable_dir(tmp_path)
    with pytest.raises(InputError, match="not writable"):
        pathfx.export_onnx(nn.Linear(3, 2), os.path.join(d, "m.onnx"), torch.randn(1, 3))
    with pytest.raises(InputError, match="does not exist"):
        pathfx.export_onnx(nn.Linear(3, 2), tmp_path / "no" / "m.onnx", torch.randn(1, 3))


@torch.library.custom_op("pathfx_tests::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class NotExportable(nn.Module):
    def forward(self, x):
        return twice(x)  # an op with no ONNX translation in either exporter


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(PathfxError, match="cannot export NotExportable"):
        pathfx.export_onnx(NotExportable(), tmp_path / "m.onnx", torch.randn(1, 3))
    assert os.listdir(tmp_path) == []


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    def corrupt(model):  # a folding step that changes the function: onnxruntime must disagree
        with torch.no_grad():
            model.weight.add_(0.1)
        return model, ["weight"]

    monkeypatch.setattr(onnx_export, "FOLDS", onnx_export.FOLDS + [corrupt])
    torch.manual_seed(0)
    with pytest.raises(VerificationError) as e:
        pathfx.export_onnx(nn.Linear(3, 2), tmp_path / "m.onnx", torch.randn(1, 3), exporter="torchscript")
    assert "torch and onnxruntime differ" in str(e.value) and "worst element" in str(e.value)
    assert os.listdir(tmp_path) == []


SLOW = ["resnet50", "vgg16", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny", "regnet_x_400mf"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_torchvision_models_match_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    r = pathfx.export_onnx(model, tmp_path / f"{name}.onnx", torch.randn(*zoo.lookup(name).input_shape))
    print(f"\n{name}: {r.exporter}, max rel {r.max_rel:.2e}")
    assert r.max_rel <= 1e-4
