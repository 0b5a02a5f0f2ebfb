"""`pathfx observe`: BN versus P-BN at initialisation (pbn §5.2, Fig. 6); the experiment is lab.observe."""
from __future__ import annotations

from pathfx.commands import write_atomic

from ..observe import observe, summary, to_csv, to_png

NAME = "observe"
HELP = "per-layer BN sigma and log gradient norm of a stacked CNN with BN vs P-BN (pbn §5.2, Fig. 6)"


def add_arguments(p) -> None:
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="observe.png", help="figure file (default observe.png)")
    p.add_argument("--csv", default="observe.csv", help="table file (default observe.csv)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def run(args) -> int:
    res = observe(args.depth, args.width, args.batch, args.size, args.seed)
    write_atomic(args.csv, to_csv(res), force=args.force)
    write_atomic(args.png, to_png(res), force=args.force, binary=True)
    print(summary(res))
    return 0
