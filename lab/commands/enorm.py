"""`pathfx enorm MODEL`: balance a model by Equi-normalization and show where the energy went."""
from __future__ import annotations

import inspect
import io

import pathfx
from pathfx import InputError
from pathfx.commands import add_model_arguments, load_model, write_atomic

from ..plots import enorm_plot

NAME = "enorm"
DEFAULT_TOL = inspect.signature(pathfx.enorm).parameters["tol"].default
HELP = "balance a model's weights by Equi-normalization (ENorm) and report the energy per layer"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--cycles", type=int, help="run exactly this many cycles (default: until --tol)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="stop at a fixed point: when a cycle moves no "
                   f"weight or bias by more than this relative amount (default {DEFAULT_TOL:g})")
    p.add_argument("--p", type=float, default=2.0, help="the norm: minimise the sum of |w|^p (default 2; any p ≥ 1, "
                                                        "or inf to balance the largest |w| of every channel)")
    p.add_argument("--c", type=float, default=1.0, help="asymmetric variant: c > 1 moves energy toward the "
                                                        "output (default 1)")
    p.add_argument("--plot", metavar="PNG", help="draw per-unit energy of every layer before/after and the "
                                                 "objective per cycle")
    p.add_argument("--force", action="store_true", help="overwrite the --plot file")


def run(args) -> int:
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot writes a PNG file: '{args.plot}' does not end in .png")
    model, x, name = load_model(args)
    _, report = pathfx.enorm(model, x, p=args.p, c=args.c, cycles=args.cycles, tol=args.tol)
    print(f"{name}: ENorm\n")
    print(report)
    if report.dead:
        print("\ndead channels (skipped): " + ", ".join(f"group {d.group}: {len(d.variables)}" for d in report.dead))
    if args.plot:
        fig = enorm_plot(report, name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        write_atomic(args.plot, buf.getvalue(), force=args.force, binary=True)
        print(f"\nwrote {args.plot}")
    return 0
