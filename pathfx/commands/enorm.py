"""`pathfx enorm MODEL`: balance a model by Equi-normalization and show where the energy went."""
from __future__ import annotations

import io

import pathfx
from passes.errors import InputError

from ._common import add_model_arguments, load_model, write_atomic

NAME = "enorm"
HELP = "balance a model's weights by Equi-normalization (ENorm) and report the energy per layer"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--cycles", type=int, help="run exactly this many cycles (default: until --tol)")
    p.add_argument("--tol", type=float, default=1e-6, help="stop when one cycle lowers the objective by less "
                                                           "than this relative amount (default 1e-6)")
    p.add_argument("--p", type=float, default=2.0, help="the norm: minimise the sum of |w|^p (default 2)")
    p.add_argument("--c", type=float, default=1.0, help="asymmetric variant: c > 1 moves energy toward the "
                                                        "output (default 1)")
    p.add_argument("--plot", metavar="PNG", help="draw per-unit energy of every layer before/after and the "
                                                 "objective per cycle")
    p.add_argument("--force", action="store_true", help="overwrite the --plot file")


def plot(report, title: str):
    """A matplotlib figure: per-unit weight norm of each layer before and after, and the objective per cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.35 * len(report.layers) + 3), 11))
    rng = np.random.default_rng(0)
    for ax, when in zip(axes[:2], ("before", "after")):
        for i, lay in enumerate(report.layers):
            energy = np.asarray(getattr(lay, f"rows_{when}"))
            norms = energy ** (1 / report.p)
            ax.scatter(i + rng.uniform(-0.3, 0.3, len(norms)), norms, s=3, alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylabel(f"ℓ{report.p:g} norm per unit")
        ax.set_title(f"{title}: energy {when} ENorm (one dot per output unit: its incoming weights, "
                     "the paper's weight-matrix column)")
        ax.set_xticks(range(len(report.layers)))
        ax.set_xticklabels([lay.name.removesuffix(".weight") for lay in report.layers], rotation=90, fontsize=6)
    axes[2].plot(range(len(report.objective)), report.objective, marker=".")
    axes[2].set_xlabel("cycle")
    axes[2].set_ylabel(f"Σ|w|^{report.p:g}")
    axes[2].set_title("objective per cycle (0 = before)")
    fig.tight_layout()
    return fig


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
        fig = plot(report, name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        write_atomic(args.plot, buf.getvalue(), force=args.force, binary=True)
        print(f"\nwrote {args.plot}")
    return 0
