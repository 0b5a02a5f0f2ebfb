"""`pathfx verify A.onnx MODEL`: compare an ONNX file under onnxruntime with a model built by pathfx."""
from __future__ import annotations

import argparse

from passes.errors import InputError
from passes.onnx_export import load_onnx, ort_runner, torch_runner
from passes.verify import compare, random_like

from . import add_model_arguments, load_model

NAME = "verify"
HELP = "compare an ONNX file (onnxruntime, float32) with a model on the example and random inputs"


def add_arguments(p) -> None:
    p.add_argument("onnx", help="the ONNX file")
    add_model_arguments(p)
    p.add_argument("--n-random", type=int, default=4, help="random inputs besides the example (default 4)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative error per output (default 1e-4)")


def _static_shape(value_info) -> tuple | None:
    dims = value_info.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shape if shape and all(shape) else None


def run(args) -> int:
    proto = load_onnx(args.onnx)
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise InputError(f"'{args.onnx}' takes {len(inputs)} inputs: pathfx verify supports single-input models")
    expected = _static_shape(inputs[0])
    if args.input_shape is None and expected is not None:
        args = argparse.Namespace(**{**vars(args), "input_shape": ",".join(map(str, expected))})
    model, x, name = load_model(args)
    if expected is not None and tuple(x.shape) != expected:
        raise InputError(f"input shape {','.join(map(str, x.shape))} does not match the ONNX model's input "
                         f"{','.join(map(str, expected))}")
    if args.n_random < 0:
        raise InputError("--n-random must be >= 0")
    labelled = [("the example input", (x,))] + \
        [(f"random input {i}", r) for i, r in enumerate(random_like((x,), args.n_random, args.seed))]
    res = compare(torch_runner(model), ort_runner(proto), labelled, rtol=args.rtol, names=(name, args.onnx))
    print(res)
    if not res.ok:
        print("\n" + res.diff())
        return 1
    return 0
