"""`pathfx diagnose MODEL`: per-layer conditioning, BN σ, weight energy and path-norm on one batch."""
from __future__ import annotations

from pathfx import InputError
from pathfx.commands import add_model_arguments, load_model, write_atomic

from .. import data
from ..diagnose import diagnose

NAME = "diagnose"
HELP = "layer-wise conditioning (input / output-gradient covariance), BN σ, weight energy and ℓ1 path-norm"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--data", choices=("digits", "random"), default="digits",
                   help="digits: scikit-learn's digits resized to the input shape (default); random: Gaussian")
    p.add_argument("--p", type=float, default=1.0, help="fraction of the spectrum for the generalised condition "
                                                        "number κ_p (default 1.0: κ_100%%)")
    p.add_argument("--eval", action="store_true", help="run BatchNorms with running statistics (default: batch)")
    p.add_argument("--png", metavar="FILE", help="write the figure as PNG")
    p.add_argument("--csv", metavar="FILE", help="write the figures as CSV")
    p.add_argument("--force", action="store_true", help="overwrite --png / --csv")


def run(args) -> int:
    if args.batch < 2:
        raise InputError("--batch must be at least 2 (BatchNorm needs two samples)")
    if not 0 < args.p <= 1:
        raise InputError("--p must be in (0, 1]")
    model, x, name = load_model(args)
    xb, yb = data.sample_batch(tuple(x.shape[1:]), args.batch, args.data, args.seed)
    result = diagnose(model, xb, yb, p=args.p, train=not args.eval, seed=args.seed)
    print(f"{name}: batch of {len(xb)} ({args.data if yb is not None else 'random'}), "
          f"{'training' if not args.eval else 'eval'}-mode BatchNorm\n")
    print(result)
    if args.csv:
        write_atomic(args.csv, result.to_csv(), force=args.force)
    if args.png:
        write_atomic(args.png, result.plot, force=args.force, binary=True)
    return 0
