"""`pathfx transform MODEL`: balance or path-reparameterize a model, verify it, emit its plan, export to ONNX."""
from __future__ import annotations

import os

import torch

import pathfx
from passes.errors import InputError

from . import add_front_end_arguments, add_model_arguments, front_end, load_model, write_atomic

NAME = "transform"
HELP = "rewrite a model into balanced (ENorm) or path (P-BN) form, verify it, write its plan and ONNX export"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_front_end_arguments(p)
    p.add_argument("--mode", choices=["path", "balance"], default="path")
    p.add_argument("--plan", choices=["enorm", "gsgd", "sgd"], help="default: the plan matched to the mode")
    p.add_argument("--plan-out", metavar="FILE", help="write the plan as JSON")
    p.add_argument("--export", metavar="FILE", help="export the transformed model to ONNX and check it with onnxruntime")
    p.add_argument("--force", action="store_true", help="overwrite --plan-out / --export files")
    p.add_argument("--policy", choices=["per-block", "global"], help="path mode: which groups to reparameterize")
    p.add_argument("--cycles", type=int, help="balance mode: ENorm cycles (default: until --tol)")
    p.add_argument("--n-random", type=int, default=8, help="random inputs the verification adds to the example")
    p.add_argument("--quantize", choices=["int8"], help="--export writes the int8 model (onnxruntime.quantization, "
                                                        "QDQ, MinMax calibration)")
    p.add_argument("--per-channel", action="store_true", help="--quantize: weight scales per output channel "
                                                              "(default: one per tensor)")
    p.add_argument("--calibration", type=int, default=16, metavar="N",
                   help="--quantize: calibrate on N batches — the example input and N-1 standard normal batches "
                        "of its shape (default 16). Random inputs exercise the export, they do not stand for a "
                        "deployment's data: calibrate on real data through pathfx.export_onnx(calibration=...)")


def calibration_inputs(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The example followed by n - 1 standard normal batches of its shape (their own generator: not the
    verification's random inputs)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.cat([x] + [torch.randn(x.shape, generator=g) for _ in range(n - 1)])


def run(args) -> int:
    if (args.quantize or args.per_channel) and not args.export:
        raise InputError("--quantize and --per-channel apply to the --export file: pass --export FILE")
    if args.per_channel and not args.quantize:
        raise InputError("--per-channel needs --quantize int8")
    if args.calibration < 1:
        raise InputError(f"--calibration must be at least 1 (got {args.calibration})")
    for path in (args.plan_out, args.export):  # refuse before any work, not after minutes of it
        if path and os.path.exists(path) and not args.force:
            raise InputError(f"output file '{path}' exists (use --force to overwrite)")
    model, x, name = load_model(args)
    options = {k: v for k, v in (("policy", args.policy), ("cycles", args.cycles)) if v is not None}
    # the model was built here only to be transformed: no second copy of its weights
    result = pathfx.transform(model, x, mode=args.mode, plan=args.plan, name=name, n_random=args.n_random,
                              copy_model=False, **options, **front_end(args))
    print(result)
    print("\n".join(str(result.plan).splitlines()[1:]))  # its first line is in the summary
    code = 0
    if args.plan_out:
        write_atomic(args.plan_out, result.plan.to_json(indent=1), force=args.force)
        print(f"\nplan written to {args.plan_out}")
    if args.export:
        quant = dict(quantize=args.quantize, calibration=calibration_inputs(x, args.calibration, args.seed),
                     per_channel=args.per_channel) if args.quantize else {}
        rep = pathfx.export_onnx(result.model, args.export, x, overwrite=args.force, **quant)
        print(f"\nONNX: {args.export} ({rep.exporter} exporter, opset {rep.opset}, {sum(rep.ops.values())} nodes): "
              f"onnxruntime vs torch max rel error {rep.max_rel:.2e} (float32)")
        if rep.quantization is not None:
            print(rep.quantization)
    return code
