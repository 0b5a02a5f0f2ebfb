"""`pathfx experiments`: run the papers' experiments at CPU size and write the reproduction report."""
from __future__ import annotations

import dataclasses
import shlex

from pathfx import InputError

NAME = "experiments"
HELP = ("train the four methods on digits over several seeds, observe BN vs P-BN at init, re-balance the "
        "ENorm Annex A network, and write the report (docs/experiments.md and its figures)")


def add_arguments(p) -> None:
    from ..experiments import Config

    c = Config()
    p.add_argument("--out", default="docs/experiments.md",
                   help="the report (default docs/experiments.md); figures go to the directory of the same name "
                        "without .md")
    p.add_argument("--models", default=",".join(c.models), help=f"comma-separated (default {','.join(c.models)})")
    p.add_argument("--methods", default=",".join(c.methods), help="comma-separated (default all)")
    p.add_argument("--seeds", default=",".join(map(str, c.seeds)),
                   help=f"comma-separated (default {','.join(map(str, c.seeds))})")
    p.add_argument("--epochs", type=int, default=c.epochs, help=f"epochs per run on digits (default {c.epochs})")
    p.add_argument("--epochs-mnist1d", type=int, default=c.epochs_mnist1d,
                   help=f"epochs per run on MNIST-1D (default {c.epochs_mnist1d})")
    p.add_argument("--max-steps", type=int, help="cap the optimizer steps of each run (quick checks)")
    p.add_argument("--size", type=int, default=c.size,
                   help=f"height and width of the digits for convolutional models (default {c.size})")
    p.add_argument("--observe-depth", type=int, default=c.observe_depth)
    p.add_argument("--observe-width", type=int, default=c.observe_width)
    p.add_argument("--annex-width", type=int, default=c.annex_width, help="width of the Annex A network "
                                                                          f"(default {c.annex_width}, as the paper)")
    p.add_argument("--threads", type=int, default=c.threads, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="the quick profile: every model and method, 2 seeds, "
                                                        "2 epochs (4 on MNIST-1D), small observation nets; options "
                                                        "given explicitly still apply")
    p.add_argument("--force", action="store_true", help="overwrite the report and its figures")


def _names(text: str) -> tuple:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def run(args) -> int:
    from ..experiments import Config, run as run_experiments

    try:
        seeds = tuple(int(s) for s in _names(args.seeds))
    except ValueError:
        raise InputError(f"--seeds '{args.seeds}' does not parse: expected integers like 0,1,2") from None
    given = dict(models=_names(args.models), methods=_names(args.methods), seeds=seeds, epochs=args.epochs,
                 epochs_mnist1d=args.epochs_mnist1d, size=args.size, max_steps=args.max_steps,
                 observe_depth=args.observe_depth, observe_width=args.observe_width, annex_width=args.annex_width,
                 threads=args.threads)
    full = Config()
    # --quick starts from the quick profile; an option set to other than the full profile's default still applies
    cfg = dataclasses.replace(Config.quick() if args.quick else full,
                              **{k: v for k, v in given.items() if v != getattr(full, k)})
    argv = getattr(args, "argv", None)
    command = "pathfx " + shlex.join(argv) if argv else "pathfx experiments"
    run_experiments(cfg, args.out, force=args.force, command=command, log=lambda line: print(line, flush=True))
    return 0
