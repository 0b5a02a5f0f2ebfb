"""`pathfx zoo`: run the analysis over torchvision's classifiers and write the coverage table."""
from __future__ import annotations

import os

from tqdm import tqdm

import zoo
from passes.errors import InputError

from ..coverage import COLUMNS, RAW, TRANSFORM_COLUMNS, isolated, markdown, passed, read_table, summary
from . import add_front_end_arguments, front_end, write_atomic

NAME = "zoo"
HELP = "analyse many models (default: the torchvision classifiers; --source timm: one model per timm module) and " \
       "write a Markdown coverage table"


def add_arguments(p) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every torchvision classifier and zoo model (default)")
    which.add_argument("--models", help="comma-separated model names")
    which.add_argument("--list", action="store_true", help="list the known model names and exit")
    p.add_argument("--source", choices=["torchvision", "timm"], default="torchvision",
                   help="the models of --all and --list: torchvision's classifiers and the zoo, or timm's sweep "
                        "list (one model per timm module, built with pretrained=False)")
    p.add_argument("--mode", choices=["analyze", "balance", "path"], default="analyze",
                   help="analyze: groups + soundness check; balance / path: transform + verify + ONNX export")
    p.add_argument("--cycles", type=int, default=10, help="balance mode: ENorm cycles per model")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter (auto: dynamo, TorchScript when dynamo fails)")
    p.add_argument("--size", type=int, help="square inputs of this size where a model accepts them (default: "
                                            "each model's own input shape)")
    add_front_end_arguments(p)
    p.add_argument("--out", metavar="FILE", help="write the Markdown table to FILE")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of --out that passed and run only the other models (missing or failed)")


def run(args) -> int:
    every = zoo.timm.sweep_names() if args.source == "timm" else zoo.all_names()
    if args.list:
        print("\n".join(every))
        return 0
    names = [n.strip() for n in args.models.split(",")] if args.models else every
    for n in names:
        zoo.lookup(n)  # unknown names fail before any work
    columns = COLUMNS if args.mode == "analyze" else TRANSFORM_COLUMNS
    kept = {}
    if args.resume:
        if not args.out or not os.path.exists(args.out):
            raise InputError("--resume continues the table of --out FILE, which must exist")
        kept = {n: r for n, r in read_table(args.out, columns).items() if passed(r, args.mode)}
    elif args.out and os.path.exists(args.out) and not args.force:  # refuse before an hour of work, not after
        raise InputError(f"output file '{args.out}' exists (use --force to overwrite, --resume to continue it)")
    rows = []
    for n in tqdm(names, desc=args.mode, unit="model"):
        rows.append(kept.get(n) or isolated(n, args.mode, args.cycles, args.exporter, args.size, front_end(args)))
        if args.out:  # the table so far, so that a stopped sweep keeps what it measured
            write_atomic(args.out, markdown(rows, columns) + summary(rows, args.mode), force=True)
    print(markdown(rows, columns) + summary(rows, args.mode))
    failed = any("FAILED" in r.get("check", "") or "VerificationError" in r.get("status", "") or
                 r.get("status", "").startswith(RAW) for r in rows)
    return 1 if failed else 0
