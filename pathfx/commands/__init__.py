"""Subcommands of the `pathfx` CLI, and what every subcommand shares: naming a model, building its
example input, writing files whole, printing tables.

A subcommand is a module with NAME, HELP, ``add_arguments(parser)`` and ``run(args)``: the modules
of this package, and those other installed packages declare under the entry-point group
``pathfx.commands`` (the lab's training and experiment commands are such a package).
"""
from __future__ import annotations

import torch

from passes.errors import InputError
from passes.files import write_atomic
from passes.table import table

__all__ = ["add_model_arguments", "add_front_end_arguments", "front_end", "parse_shape", "load_model", "write_atomic",
           "table"]


def add_model_arguments(p) -> None:
    p.add_argument("model", help="torchvision classification model name, zoo name, timm:NAME, package.module:factory or "
                                     "path/to/file.py:factory")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the example input")


def add_front_end_arguments(p) -> None:
    p.add_argument("--frontend", choices=["fx", "export"], default="fx",
                   help="fx: symbolic trace, submodules it cannot follow kept opaque (default); export: torch.export's "
                        "ATen graph (eval mode), which follows shape-dependent Python control flow")
    p.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                   help="keep this submodule opaque (a barrier); repeatable (fx front end)")
    p.add_argument("--no-auto-leaves", action="store_true",
                   help="refuse a model with a submodule symbolic tracing cannot follow, instead of keeping it opaque")


def front_end(args) -> dict:
    """The front-end options of ``add_front_end_arguments`` as keyword arguments of the public API."""
    return {"frontend": args.frontend, "leaf_modules": ([] if args.no_auto_leaves else ["auto"]) + list(args.leaf)}


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"input shape '{text}' does not parse: expected integers like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"input shape '{text}' must be positive integers like 1,3,224,224")
    return shape


def load_model(args):
    """(model, example input, name) for a CLI model argument."""
    import zoo

    entry = zoo.lookup(args.model)
    torch.manual_seed(args.seed)
    model = zoo.build(args.model)
    shape = parse_shape(args.input_shape) if args.input_shape else entry.input_shape
    if shape is None:
        raise InputError(f"model '{args.model}' has no default input shape: pass --input-shape")
    return model, torch.randn(*shape), entry.name
