"""passes.quantize through pathfx.export_onnx(quantize="int8"): onnxruntime.quantization, QDQ, calibration,
the float-vs-int8 report, atomic writes, and the CLI's --quantize."""
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper
from torch.utils.data import DataLoader, TensorDataset

import pathfx
from pathfx.cli import main
from passes import onnx_export
from passes.errors import InputError, PathfxError

BATCH = 2


def small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # channels of very different scales: per-tensor and per-channel int8 then differ
        net[0].weight.mul_(torch.logspace(-1, 1, 8).view(8, 1, 1, 1))
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 8, 8, generator=g)
    cal = torch.randn(24, 3, 8, 8, generator=g)
    test = torch.randn(40, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = small_cnn()(test).argmax(1)
    y[::4] = (y[::4] + 1) % 5  # a quarter wrong on purpose: accuracy well away from 0 and 1
    return x, cal, test, y


def export(path, x, **kw):
    return pathfx.export_onnx(small_cnn(), path, x, exporter="torchscript", **kw)


def session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_batches(sess, xs):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: xs[i:i + BATCH].numpy()})[0] for i in range(0, len(xs), BATCH)])


def weight_scales(path) -> dict:
    """Scale shapes of the DequantizeLinear nodes whose input is a stored int8 weight (not an activation)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8:
            w = inits[n.input[0]]
            if len(w.dims) > 1:
                out[n.input[0]] = tuple(inits[n.input[1]].dims)
    return out


@pytest.fixture(scope="module")
def int8(data, tmp_path_factory):
    x, cal, test, y = data
    d = tmp_path_factory.mktemp("int8")
    float_report = export(d / "float.onnx", x)
    report = export(d / "int8.onnx", x, quantize="int8", calibration=cal, labels=(test, y))
    return d, float_report, report


def test_int8_file_runs_in_onnxruntime_with_qdq_nodes(int8, data):
    d, float_report, r = int8
    x = data[0]
    ops = pathfx.onnx_op_counts(str(d / "int8.onnx"))
    assert ops == r.ops and ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 6
    assert "QuantizeLinear" not in float_report.ops
    out = session(d / "int8.onnx").run(None, {"input": x.numpy()})[0]
    assert out.shape == (BATCH, 5) and np.isfinite(out).all()
    assert r.verification.ok and r.max_rel <= 1e-4  # the float graph was checked against torch first
    assert r.size_bytes == os.path.getsize(d / "int8.onnx")
    assert not [f for f in os.listdir(d) if f.startswith(".pathfx-")]


def test_report_errors_and_accuracy_are_those_of_onnxruntime(int8, data):
    d, _, r = int8
    x, _, test, y = data
    q, f = r.quantization, session(d / "float.onnx")
    assert q.calibration_samples == 24 and q.calibration_batches == 12 and not q.per_channel
    # the example and two random inputs, drawn as export_onnx draws them (seed 0)
    g = torch.Generator().manual_seed(0)
    inputs = torch.cat([x] + [torch.randn(x.shape, generator=g, dtype=torch.float64).float() for _ in range(2)])
    want, got = run_batches(f, inputs), run_batches(session(d / "int8.onnx"), inputs)
    e = q.errors[0]
    assert e.samples == 6 and e.max_abs == pytest.approx(np.abs(want - got).max(), rel=1e-6)
    assert e.max_rel == pytest.approx(np.abs(want - got).max() / np.abs(want).max(), rel=1e-6)
    assert 0 < e.max_abs < 0.1 * np.abs(want).max()  # int8 is not exact, and not wild either
    want, got = run_batches(f, test), run_batches(session(d / "int8.onnx"), test)
    e = q.errors[1]
    assert e.samples == 40 and e.max_abs == pytest.approx(np.abs(want - got).max(), rel=1e-6)
    assert e.mean_abs == pytest.approx(np.abs(want - got).mean(), rel=1e-6)
    assert e.argmax_agreement == pytest.approx((want.argmax(1) == got.argmax(1)).mean())
    assert q.labelled_samples == 40
    assert q.accuracy_float == pytest.approx((want.argmax(1) == y.numpy()).mean()) == pytest.approx(0.75)
    assert q.accuracy_int8 == pytest.approx((got.argmax(1) == y.numpy()).mean())
    assert "accuracy on 40 labelled samples" in str(r) and "per tensor" in str(r)


def test_per_channel_weight_scales_are_vectors(int8, data, tmp_path):
    d, _, per_tensor = int8
    x, cal, test = data[:3]
    r = export(tmp_path / "pc.onnx", x, quantize="int8", calibration=cal, per_channel=True)
    assert r.quantization.per_channel
    tensor, channel = weight_scales(d / "int8.onnx"), weight_scales(tmp_path / "pc.onnx")
    assert len(tensor) == len(channel) == 3  # two convs, one linear
    assert all(s in ((), (1,)) for s in tensor.values())
    assert sorted(channel.values()) == [(5,), (8,), (8,)]
    # the first conv's rows span 100× in scale: one scale per row loses less than one per tensor (on
    # average: the largest errors are where the output leaves its calibrated range, the same in both)
    want = run_batches(session(d / "float.onnx"), test)
    errors = [np.abs(want - run_batches(session(p), test)).mean() for p in (d / "int8.onnx", tmp_path / "pc.onnx")]
    assert errors[1] < 0.95 * errors[0]


def activation_scales(path) -> list:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [float(numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


def test_calibration_from_a_tensor_and_from_a_loader(int8, data, tmp_path):
    d, _, base = int8
    x, cal, test, y = data
    loader = DataLoader(TensorDataset(cal, torch.zeros(len(cal))), batch_size=6, shuffle=False)
    r = export(tmp_path / "loader.onnx", x, quantize="int8", calibration=loader)
    assert r.quantization.calibration_samples == 24 and r.quantization.calibration_batches == 12
    assert (tmp_path / "loader.onnx").read_bytes() == (d / "int8.onnx").read_bytes()  # same samples, same model
    r = export(tmp_path / "list.onnx", x, quantize="int8", calibration=[cal[:10], cal[10:]],
               labels=DataLoader(TensorDataset(test, y), batch_size=8))
    q = base.quantization
    assert (r.quantization.accuracy_int8, r.quantization.errors[1]) == (q.accuracy_int8, q.errors[1])
    assert (tmp_path / "list.onnx").read_bytes() == (d / "int8.onnx").read_bytes()
    export(tmp_path / "other.onnx", x, quantize="int8", calibration=4 * cal[:8])  # wider activation ranges
    wide, base = activation_scales(tmp_path / "other.onnx"), activation_scales(d / "int8.onnx")
    assert len(wide) == len(base) >= 3 and all(w > b for w, b in zip(wide, base))


@pytest.mark.parametrize("kw, match", [
    ({"quantize": "int4", "calibration": torch.zeros(2, 3, 8, 8)}, "unknown quantize 'int4'"),
    ({"quantize": "int8"}, "needs calibration="),
    ({"per_channel": True}, "per_channel given without quantize='int8'"),
    ({"calibration": torch.zeros(2, 3, 8, 8)}, "calibration given without quantize"),
    ({"quantize": "int8", "calibration": torch.zeros(3, 3, 8, 8)}, "3 samples in a batch, not a multiple of"),
    ({"quantize": "int8", "calibration": torch.zeros(2, 3, 9, 9)}, "does not fit the example input 2x3x8x8"),
    ({"quantize": "int8", "calibration": []}, "gave no batches"),
    ({"quantize": "int8", "calibration": 5}, "expected a tensor or an iterable"),
    ({"quantize": "int8", "calibration": torch.zeros(2, 3, 8, 8), "labels": 5}, "labels: expected (inputs, targets)"),
    ({"quantize": "int8", "calibration": torch.zeros(2, 3, 8, 8), "labels": [torch.zeros(2, 3, 8, 8)]},
     "labels: expected (inputs, targets) tensors or an iterable of (inputs, targets) batches, got Tensor"),
    ({"quantize": "int8", "calibration": torch.zeros(2, 3, 8, 8), "labels": (torch.zeros(2, 3, 8, 8),
                                                                            torch.zeros(3, dtype=torch.long))},
     "3 targets for 2 samples"),
])
def test_bad_arguments_leave_nothing(tmp_path, data, kw, match):
    with pytest.raises(InputError, match=re.escape(match)):
        export(tmp_path / "m.onnx", data[0], **kw)
    assert os.listdir(tmp_path) == []


def test_failed_quantization_leaves_nothing(tmp_path, data, monkeypatch):
    def fails(*args, **kw):
        raise PathfxError("onnxruntime.quantization cannot quantize the model: injected")

    monkeypatch.setattr(onnx_export, "quantize_int8", fails)
    with pytest.raises(PathfxError, match="injected"):
        export(tmp_path / "m.onnx", data[0], quantize="int8", calibration=data[1])
    assert os.listdir(tmp_path) == []


def test_existing_file_is_refused_and_unchanged(tmp_path, data):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        export(target, data[0], quantize="int8", calibration=data[1])
    assert target.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["m.onnx"]
    r = export(target, data[0], quantize="int8", calibration=data[1], overwrite=True)
    assert r.ops["QuantizeLinear"] > 0 and pathfx.onnx_op_counts(str(target)) == r.ops


def test_cli_transform_exports_int8(tmp_path, capsys):
    path = tmp_path / "mlp8.onnx"
    argv = ["transform", "cli_models:mlp", "--mode", "balance", "--export", str(path), "--quantize", "int8",
            "--per-channel", "--calibration", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per channel" in out and "MinMax calibration on 8 samples in 4 batches" in out
    assert "float vs int8 on the example and 2 random input(s)" in out
    assert pathfx.onnx_op_counts(str(path))["DequantizeLinear"] > 0
    assert sorted(weight_scales(path).values()) == [(2,), (4,), (5,)]
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main(["transform", "cli_models:mlp", "--quantize", "int8"]) == 2
    assert "pass --export FILE" in capsys.readouterr().err
    assert main(argv + ["--force", "--calibration", "0"]) == 2
    assert "--calibration must be at least 1" in capsys.readouterr().err
