"""`pathfx groups MODEL`: the rescaling groups of a model as a table, JSON or DOT."""
from __future__ import annotations

import pathfx
from passes.soundness import check_soundness

from . import add_front_end_arguments, add_model_arguments, front_end, load_model, write_atomic

NAME = "groups"
HELP = "discover the rescaling-equivalence groups of a model"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_front_end_arguments(p)
    p.add_argument("--json", action="store_true", help="print the groups as JSON instead of a table")
    p.add_argument("--dot", metavar="FILE", help="write the group graph as Graphviz DOT")
    p.add_argument("--check", action="store_true", help="also run the random-rescaling soundness check (float64)")
    p.add_argument("--force", action="store_true", help="overwrite the --dot file")


def run(args) -> int:
    model, x, name = load_model(args)
    groups = pathfx.find_groups(model, x, name=name, **front_end(args))
    if args.dot:
        write_atomic(args.dot, groups.to_dot(), force=args.force)
    if args.json:
        print(groups.to_json(indent=1))
    else:
        print(groups)
    if args.check:
        res = check_soundness(groups, x)
        print(f"\nsoundness: random factors on {res.num_free} free variables, "
              f"max relative output error {res.max_rel_error:.2e} ({'ok' if res.ok else 'FAILED'})")
        return 0 if res.ok else 1
    return 0
