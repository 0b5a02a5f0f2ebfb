"""ONNX export with folding, checking and an onnxruntime comparison (DESIGN §5).

Steps: fold a copy of the model into static weights (each ``FOLDS`` hook: parametrizations,
eval-mode path layers and P-BN); export with torch.onnx into memory; ``onnx.checker``; run
onnxruntime (CPU) against the original model in float32; only then write the file —
through a temporary file in the target directory, renamed into place. The temporary file
is created first, so a missing or unwritable directory fails before any work, and it is
removed on every failure: no partial file is ever left behind.

With ``quantize="int8"`` the checked float graph is then quantized by onnxruntime.quantization
(passes/quantize.py: QDQ, MinMax calibration on the caller's data) and the int8 model is the file
written, through the same temporary file; the report gives the float-vs-int8 output error and,
with labelled data, both accuracies.

Exporter: the torch.export-based one (``dynamo=True``, the default of torch 2.13) is tried
first; it gives a clean graph (no Identity nodes, BatchNorm folded by its optimizer). If it
cannot capture a model, the TorchScript exporter is the fallback; the report names which
one produced the file.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .errors import InputError, PathfxError
from .files import temp_beside
from .finite import check_finite
from .modules import cast_floating
from .quantize import (QUANTIZE, QuantizationReport, accuracy, calibration_batches, int8_error, labelled_batches,
                       quantize_int8)
from .shapes import as_tuple
from .verify import Verification, compare, random_like, run_checked

EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportReport:
    path: str
    exporter: str
    opset: int
    ops: Counter
    folded: list[str] = field(default_factory=list)
    verification: Verification | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    fallback_reason: str = ""  # why the dynamo exporter was not used, when it was not
    quantization: QuantizationReport | None = None  # the file is the int8 model when set

    @property
    def max_abs(self) -> float | None:
        return None if self.verification is None else self.verification.max_abs

    @property
    def max_rel(self) -> float | None:
        return None if self.verification is None else self.verification.max_rel

    def __str__(self) -> str:
        ops = ", ".join(f"{op} ×{n}" for op, n in self.ops.most_common())
        lines = [f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {self.exporter} exporter, opset {self.opset}, "
                 f"{sum(self.ops.values())} nodes, {self.seconds:.1f} s)", f"ops: {ops}"]
        if self.folded:
            lines.append(f"folded into static weights: {len(self.folded)} ({', '.join(self.folded[:6])}"
                         f"{', ...' if len(self.folded) > 6 else ''})")
        if self.fallback_reason:
            lines.append(f"dynamo exporter failed, used torchscript: {self.fallback_reason}")
        if self.verification is not None:
            lines.append(str(self.verification))
        if self.quantization is not None:
            lines.append(str(self.quantization))
        return "\n".join(lines)


# -- folding hooks: each takes the private copy and returns (model, names of what it folded) --

def fold_parametrizations(model: nn.Module):
    from torch.nn.utils import parametrize

    done = []
    for name, mod in list(model.named_modules()):
        if not parametrize.is_parametrized(mod):
            continue
        # Not parametrize.remove_parametrizations: a deep copy shares the injected class with the
        # original, and removal deletes the property from that class, breaking the caller's model.
        with torch.no_grad():
            values = {p: getattr(mod, p).detach().clone() for p in mod.parametrizations}
        mod.__class__ = type(mod).__bases__[0]
        del mod._modules["parametrizations"]
        for pname, value in values.items():
            mod.register_parameter(pname, nn.Parameter(value, requires_grad=False))
            done.append(f"{name}.{pname}" if name else pname)
    return model, done


def fold_path_modules(model: nn.Module):
    from .fold import fold
    from .pathnn import PBN, PathLayer
    from .trace import trace

    names = [n for n, m in model.named_modules() if isinstance(m, (PathLayer, PBN))]
    if not names:
        return model, []
    gm = model if isinstance(model, torch.fx.GraphModule) else \
        trace(model, leaf_modules=(PathLayer, PBN), copy_model=False)
    # remaining BatchNorms stay: the exporter folds those after convolutions as it does for any model
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    return fold(gm, fold_batchnorm=False), outer


FOLDS: list[Callable] = [fold_parametrizations, fold_path_modules]


def fold_for_export(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """An eval-mode copy of ``model`` with static weights only; ``model`` is not touched."""
    out = copy.deepcopy(model).eval()
    folded = []
    for hook in FOLDS:
        out, names = hook(out)
        folded += names
    return out.eval(), folded


# -- export -----------------------------------------------------------------------------------

def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the dynamo exporter colours its messages
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _to_proto(model: nn.Module, args: tuple, opset, dynamo: bool):
    import onnx

    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # both exporters warn about their own future
        if dynamo:
            prog = torch.onnx.export(model, args, dynamo=True, verbose=False, opset_version=opset, input_names=names)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=names)
        return onnx.load_from_string(buf.getvalue())


def export_proto(model: nn.Module, args: tuple, opset=None, exporter: str = "auto"):
    """(ONNX ModelProto, exporter used, why dynamo was not used)."""
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter '{exporter}': expected one of {', '.join(EXPORTERS)}")
    reason = ""
    if exporter in ("auto", "dynamo"):
        try:
            return _to_proto(model, args, opset, dynamo=True), "dynamo", ""
        except Exception as e:
            if exporter == "dynamo":
                raise PathfxError(f"torch.onnx (dynamo) cannot export {type(model).__name__}: {_first_line(e)}") \
                    from None
            reason = _first_line(e)
    try:
        return _to_proto(model, args, opset, dynamo=False), "torchscript", reason
    except Exception as e:
        extra = f" (dynamo exporter: {reason})" if reason else ""
        raise PathfxError(f"torch.onnx cannot export {type(model).__name__}: {_first_line(e)}{extra}") from None


def onnx_op_counts(path_or_model) -> Counter:
    """Node op types of an ONNX file (or ModelProto), with their counts (top-level graph)."""
    import onnx

    proto = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load_onnx(path_or_model)
    return Counter(n.op_type for n in proto.graph.node)


def load_onnx(path: str):
    import onnx

    if not os.path.isfile(path):
        raise InputError(f"ONNX file '{path}' does not exist")
    try:
        return onnx.load(path)
    except Exception as e:
        raise InputError(f"'{path}' is not an ONNX file: {_first_line(e)}") from None


def ort_runner(proto_or_bytes) -> Callable:
    """A function from argument tuples to onnxruntime outputs (CPUExecutionProvider)."""
    import onnxruntime as ort

    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnx.checker passes graphs whose shapes onnxruntime rejects (an uneven Split)
        raise PathfxError(f"onnxruntime cannot load the ONNX model: {_first_line(e)}") from None
    feeds = [i.name for i in sess.get_inputs()]

    def run(args):
        tensors = [x for x in args if torch.is_tensor(x)]
        if len(tensors) != len(feeds):
            raise InputError(f"the ONNX model takes {len(feeds)} input(s), {len(tensors)} were given")
        return sess.run(None, {n: x.detach().numpy() for n, x in zip(feeds, cast_floating(tensors, torch.float32))})
    run.session = sess
    return run


def run_once(model: nn.Module, args: tuple) -> None:
    def run(a):
        with torch.no_grad():
            return model(*a)
    run_checked(run, args, type(model).__name__, "the example input")


def torch_runner(model: nn.Module) -> Callable:
    """A float32 eval-mode copy of ``model`` as a function from argument tuples to outputs."""
    ref = copy.deepcopy(model).float().eval()

    def run(args):
        with torch.no_grad():
            return ref(*cast_floating(args, torch.float32))
    return run


def _open_temp(path: str, overwrite: bool) -> str:
    return temp_beside(path, overwrite, suffix=".onnx.tmp")


def _check_quantize(quantize, calibration, per_channel: bool, labels) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise InputError(f"unknown quantize '{quantize}': expected None or one of {', '.join(QUANTIZE)}")
    if quantize is None:
        given = [n for n, v in (("calibration", calibration), ("labels", labels)) if v is not None]
        given += ["per_channel"] if per_channel else []
        if given:
            raise InputError(f"{', '.join(given)} given without quantize='int8'")


def _quantized(proto, data: bytes, args32: tuple, batches, labelled, per_channel: bool, n_random: int,
               seed: int) -> tuple[bytes, QuantizationReport]:
    qdata = quantize_int8(proto, batches, per_channel)
    run_float, run_int8 = ort_runner(data), ort_runner(qdata)
    report = QuantizationReport(per_channel, len(batches), sum(b[0].shape[0] for b in batches))
    inputs = [args32] + random_like(args32, n_random, seed)
    what = f"the example{f' and {n_random} random input(s)' if n_random else ''}"
    report.errors.append(int8_error(run_float, run_int8, inputs, what)[0])
    if labelled:
        error, fa, qa = int8_error(run_float, run_int8, [args for args, _ in labelled], "the labelled inputs")
        targets = torch.cat([y for _, y in labelled])
        report.errors.append(error)
        report.labelled_samples = len(targets)
        report.accuracy_float, report.accuracy_int8 = accuracy(fa[0], targets), accuracy(qa[0], targets)
    return qdata, report


def export_onnx(model: nn.Module, path: str, example_inputs, verify: bool = True, overwrite: bool = False,
                opset: int | None = None, rtol: float = 1e-4, n_random: int = 2, seed: int = 0,
                exporter: str = "auto", quantize: str | None = None, calibration=None, per_channel: bool = False,
                labels=None) -> ExportReport:
    """Export ``model`` (folded into static weights) to ``path`` and check it under onnxruntime.

    With ``verify`` the ONNX model and the original model (float32, eval) are compared on the
    example and ``n_random`` random inputs of its shapes; a relative error above ``rtol``
    raises ``VerificationError`` and nothing is written. ``model`` is never modified.

    ``quantize="int8"`` writes the int8 (QDQ) model instead, calibrated on ``calibration`` (a
    tensor of N samples, or an iterable of batches such as a DataLoader of ``(x, y)``; cut into
    batches of the example's batch size), weights per tensor or, with ``per_channel``, per output
    channel. ``report.quantization`` gives the float-vs-int8 error on the example and the random
    inputs and, with ``labels`` (``(inputs, targets)`` tensors or an iterable of such batches),
    on those inputs and the accuracy of both models.
    """
    import onnx

    start = time.perf_counter()
    args = as_tuple(example_inputs)
    path = os.fspath(path)
    _check_quantize(quantize, calibration, per_channel, labels)
    check_finite(model)
    tmp = _open_temp(path, overwrite)
    quantization = None
    try:
        args32 = cast_floating(args, torch.float32)
        if quantize:  # the caller's data is read, and refused, before the minutes of an export
            feeds = tuple(a for a in args32 if torch.is_tensor(a))  # what the ONNX graph takes as inputs
            batches = calibration_batches(calibration, feeds)
            labelled = labelled_batches(labels, feeds) if labels is not None else []
        folded, names = fold_for_export(model)
        folded = folded.float()
        run_once(folded, args32)  # a wrong input shape fails here, clearly, before the exporter's traces
        proto, used, reason = export_proto(folded, args32, opset=opset, exporter=exporter)
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise PathfxError(f"the exported graph fails onnx.checker: {_first_line(e)}") from None
        data = proto.SerializeToString()
        check = None
        if verify:
            inputs = [("the example input", args32)] + \
                [(f"random input {i}", x) for i, x in enumerate(random_like(args32, n_random, seed))]
            check = compare(torch_runner(model), ort_runner(data), inputs, rtol=rtol,
                            names=("torch", "onnxruntime")).raise_if_failed()
        if quantize:
            data, quantization = _quantized(proto, data, args32, batches, labelled, per_channel, n_random, seed)
            proto = onnx.load_from_string(data)
        with open(tmp, "wb") as f:
            f.write(data)
        if os.path.exists(path) and not overwrite:  # created while we were exporting
            raise InputError(f"output file '{path}' exists (use overwrite=True, CLI --force, to replace it)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(path=path, exporter=used, opset=opset_used, ops=onnx_op_counts(proto), folded=names,
                        verification=check, size_bytes=len(data), seconds=time.perf_counter() - start,
                        fallback_reason=reason, quantization=quantization)
