"""`pathfx transform MODEL`: balance or path-reparameterize a model, verify it, emit its plan, export to ONNX."""
from __future__ import annotations

import os

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


def run(args) -> int:
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
        rep = pathfx.export_onnx(result.model, args.export, x, overwrite=args.force)
        print(f"\nONNX: {args.export} ({rep.exporter} exporter, opset {rep.opset}, {sum(rep.ops.values())} nodes): "
              f"onnxruntime vs torch max rel error {rep.max_rel:.2e} (float32)")
    return code
