"""Static int8 quantization of an exported ONNX model through onnxruntime.quantization (DESIGN §6).

Steps: onnxruntime's pre-processing (``quant_pre_process``: symbolic shape inference and the
graph optimisations its quantizer expects), then ``quantize_static`` in the QDQ format —
QuantizeLinear / DequantizeLinear pairs around the float operators, which onnxruntime fuses
into integer kernels when it loads the file.

Choices (``SETTINGS``):

* activations int8, asymmetric (a zero point per tensor): after a ReLU the range is [0, max],
  and a symmetric scale would leave the negative half of the codes unused;
* weights int8, symmetric (zero point 0, scale max|w| / 127): per tensor by default, per output
  channel with ``per_channel``; biases int32 at input scale × weight scale (onnxruntime's rule);
* calibration MinMax: each activation's range is its minimum and maximum over the calibration
  batches. No clipping, so the ranges depend on those batches only (no histogram bins or
  percentile to choose), and per-tensor weight scales are set by the largest weight of a layer:
  the quantity that balancing with p = ∞ equalises across channels.

The exported graph has a fixed batch size (the example's), so calibration and labelled data
are cut into batches of that size; a sample count it does not divide is refused, not padded.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError, PathfxError
from .modules import cast_floating
from .verify import compare

QUANTIZE = ("int8",)
SETTINGS = {"format": "QDQ", "activations": "int8, asymmetric, per tensor", "weights": "int8, symmetric",
            "calibration": "MinMax"}


@dataclass
class Int8Error:
    """Float against int8 outputs (both under onnxruntime) on one set of inputs."""
    inputs: str
    samples: int
    max_abs: float
    max_rel: float  # max |float − int8| / max |float|, per output, the worst output
    mean_abs: float  # mean |float − int8| over every output element: max abs is often one clipped value
    argmax_agreement: float | None  # fraction of samples whose largest output is the same; None unless N×K


@dataclass
class QuantizationReport:
    per_channel: bool
    calibration_batches: int
    calibration_samples: int
    errors: list[Int8Error] = field(default_factory=list)
    labelled_samples: int = 0
    accuracy_float: float | None = None  # of the float ONNX model on the labelled data
    accuracy_int8: float | None = None
    settings: dict = field(default_factory=lambda: dict(SETTINGS))

    def __str__(self) -> str:
        s = self.settings
        lines = [f"int8 ({s['format']}; weights {s['weights']}, {'per channel' if self.per_channel else 'per tensor'}; "
                 f"activations {s['activations']}; {s['calibration']} calibration on {self.calibration_samples} "
                 f"samples in {self.calibration_batches} batches)"]
        for e in self.errors:
            agree = "" if e.argmax_agreement is None else f", argmax agrees on {e.argmax_agreement:.1%}"
            lines.append(f"float vs int8 on {e.inputs} ({e.samples} samples): max abs {e.max_abs:.3g}, "
                         f"max rel {e.max_rel:.3g}, mean abs {e.mean_abs:.3g}{agree}")
        if self.accuracy_float is not None:
            lines.append(f"accuracy on {self.labelled_samples} labelled samples: float {self.accuracy_float:.2%}, "
                         f"int8 {self.accuracy_int8:.2%}")
        return "\n".join(lines)


# -- data -------------------------------------------------------------------------------------

def _inputs_of(item, n_inputs: int, what: str) -> tuple:
    """The model's arguments in one item of ``what``: a tensor, or the first ``n_inputs`` of a tuple
    (a DataLoader's ``(x, y)`` batch)."""
    if torch.is_tensor(item):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) >= n_inputs and all(torch.is_tensor(t) for t in item[:n_inputs]):
        return tuple(item[:n_inputs])
    raise InputError(f"{what}: expected tensors or (inputs, ...) tuples of tensors, got {type(item).__name__}")


def _cut(args: tuple, example: tuple, what: str) -> list[tuple]:
    """``args`` cut along the batch dimension into batches of the example's size."""
    b = example[0].shape[0] if example[0].dim() else 1
    n = args[0].shape[0] if args[0].dim() else 0
    for a, e in zip(args, example):
        if a.dim() != e.dim() or tuple(a.shape[1:]) != tuple(e.shape[1:]) or a.shape[0] != n:
            raise InputError(f"{what}: a batch of shape {'x'.join(map(str, a.shape))} does not fit the example "
                             f"input {'x'.join(map(str, e.shape))} (same shape after the batch dimension)")
    if n == 0 or n % b:
        raise InputError(f"{what}: {n} samples in a batch, not a multiple of the example's batch size {b} "
                         f"(the exported graph has a fixed batch size)")
    return [cast_floating(tuple(a[i:i + b] for a in args), torch.float32) for i in range(0, n, b)]


def calibration_batches(calibration, example: tuple) -> list[tuple]:
    """Argument tuples of the example's batch size from a tensor (or a tuple of a multi-input model's
    tensors) of N samples, or from an iterable of batches (a DataLoader of ``(x, y)``)."""
    what = "calibration data"
    if calibration is None:
        raise InputError("quantize='int8' needs calibration=: a tensor of inputs or an iterable of batches "
                         "(a DataLoader)")
    if torch.is_tensor(calibration) or (isinstance(calibration, tuple) and len(example) > 1):
        items = [calibration]
    else:
        try:
            items = list(calibration)
        except TypeError:
            raise InputError(f"{what}: expected a tensor or an iterable of batches, got "
                             f"{type(calibration).__name__}") from None
    out = [b for item in items for b in _cut(_inputs_of(item, len(example), what), example, what)]
    if not out:
        raise InputError(f"{what}: the iterable gave no batches")
    return out


def labelled_batches(labels, example: tuple) -> list[tuple[tuple, torch.Tensor]]:
    """(arguments, targets) pairs of the example's batch size from ``(inputs, targets)`` tensors or an
    iterable of ``(inputs, targets)`` batches."""
    what = "labels"
    pair = isinstance(labels, (tuple, list)) and len(labels) == 2 and torch.is_tensor(labels[1]) and \
        (torch.is_tensor(labels[0]) or isinstance(labels[0], (tuple, list)))
    try:
        items = [labels] if pair else list(labels)
    except TypeError:
        raise InputError(f"{what}: expected (inputs, targets) tensors or an iterable of batches, got "
                         f"{type(labels).__name__}") from None
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and torch.is_tensor(item[1])):
            raise InputError(f"{what}: expected (inputs, targets) tensors or an iterable of (inputs, targets) "
                             f"batches, got {type(item).__name__}")
        x, y = item
        args = _inputs_of(tuple(x) if isinstance(x, (tuple, list)) else x, len(example), what)
        batches = _cut(args, example, what)
        if y.dim() != 1 or len(y) != args[0].shape[0]:
            raise InputError(f"{what}: {len(y) if y.dim() else 0} targets for {args[0].shape[0]} samples "
                             f"(expected one class index per sample)")
        b = batches[0][0].shape[0]
        out += [(a, y[i * b:(i + 1) * b]) for i, a in enumerate(batches)]
    if not out:
        raise InputError(f"{what}: no labelled batches")
    return out


def _reader(names: list[str], batches: list[tuple]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            args = next(self.it, None)
            return None if args is None else {n: a.numpy() for n, a in zip(names, args)}

        def rewind(self):
            self.it = iter(batches)

    return Reader()


# -- quantization -----------------------------------------------------------------------------

def quantize_int8(proto, batches: list[tuple], per_channel: bool = False) -> bytes:
    """The int8 QDQ model (serialised) of a float ONNX ``proto``, calibrated on ``batches``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    try:
        with tempfile.TemporaryDirectory(prefix="pathfx-int8-") as d, contextlib.redirect_stdout(io.StringIO()):
            pre, out = os.path.join(d, "pre.onnx"), os.path.join(d, "int8.onnx")
            quant_pre_process(proto, pre)
            quantize_static(pre, out, _reader(names, batches), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            with open(out, "rb") as f:
                return f.read()
    except PathfxError:
        raise
    except Exception as e:
        msg = [s for s in str(e).strip().splitlines() if s.strip()]
        raise PathfxError(f"onnxruntime.quantization cannot quantize the model: "
                          f"{msg[0][:300] if msg else type(e).__name__}") from None


# -- float against int8 -----------------------------------------------------------------------

def _outputs(run, batches: list[tuple]) -> list[torch.Tensor]:
    """Each output of ``run`` over all batches, concatenated along the batch dimension."""
    outs = [[torch.from_numpy(np.asarray(o)) for o in run(args)] for args in batches]
    return [torch.cat(parts) if parts[0].dim() else torch.stack(parts) for parts in zip(*outs)]


def _argmax_agreement(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.dim() != 2 or a.shape[1] < 2:
        return None
    return float((a.argmax(1) == b.argmax(1)).double().mean())


def int8_error(run_float, run_int8, batches: list[tuple], label: str) -> tuple[Int8Error, list, list]:
    """The error of ``run_int8`` against ``run_float`` on ``batches`` (and both sets of outputs)."""
    fa, qa = _outputs(run_float, batches), _outputs(run_int8, batches)
    v = compare({label: fa}, lambda _: qa, [(label, ())], rtol=float("inf"), names=("float", "int8"))
    samples = sum(args[0].shape[0] if args[0].dim() else 1 for args in batches)
    diff = torch.cat([(a.double() - b.double()).abs().reshape(-1) for a, b in zip(fa, qa)])
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    return Int8Error(label, samples, v.max_abs, v.max_rel, mean_abs, _argmax_agreement(fa[0], qa[0])), fa, qa


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    if outputs.dim() != 2 or outputs.shape[0] != targets.shape[0]:
        raise InputError(f"labels: accuracy needs an N×classes first output, the model gives "
                         f"{'x'.join(map(str, outputs.shape))} for {targets.shape[0]} targets")
    return float((outputs.argmax(1) == targets).double().mean())
