"""`pathfx zoo`: run the analysis over torchvision's classifiers and write the coverage table."""
from __future__ import annotations

import time
from collections import Counter

import torch
from tqdm import tqdm

import pathfx
import zoo
from passes.errors import PathfxError
from passes.soundness import check_soundness

from ._common import write_atomic

NAME = "zoo"
HELP = "analyse many models (default: the torchvision classifiers) and write a Markdown coverage table"
SKIP_CHECK_PARAMS = 300_000_000  # float64 copies of larger models need several GiB: analysis only


def add_arguments(p) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every torchvision classifier and zoo model (default)")
    which.add_argument("--models", help="comma-separated model names")
    which.add_argument("--list", action="store_true", help="list the known model names and exit")
    p.add_argument("--mode", choices=["analyze", "balance", "path"], default="analyze",
                   help="analyze: groups + soundness check; balance / path: transform + verify + ONNX export")
    p.add_argument("--cycles", type=int, default=10, help="balance mode: ENorm cycles per model")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter (auto: dynamo, TorchScript when dynamo fails)")
    p.add_argument("--out", metavar="FILE", help="write the Markdown table to FILE")
    p.add_argument("--force", action="store_true", help="overwrite --out")


def _build(name: str):
    torch.manual_seed(0)
    return zoo.build(name).eval(), torch.randn(*zoo.lookup(name).input_shape)


def transform_row(name: str, mode: str, cycles: int, exporter: str = "auto") -> dict:
    import tempfile

    t = time.perf_counter()
    r = {"model": name}
    try:
        model, x = _build(name)
        res = pathfx.transform(model, x, mode=mode, name=name, **({"cycles": cycles} if mode == "balance" else {}))
        g = res.groups
        r.update(groups=len(g.groups), free=g.num_free, torch=f"{res.verification.max_rel:.1e}")
        with tempfile.TemporaryDirectory() as d:
            rep = pathfx.export_onnx(res.model, f"{d}/m.onnx", x, exporter=exporter)
        r.update(onnxruntime=f"{rep.max_rel:.1e}", status="ok" if g.num_free else
                 f"ok, no free group ({Counter(b.op for b in g.barriers).most_common(1)[0][0] if g.barriers else '-'})")
    except PathfxError as e:
        r["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    r["seconds"] = f"{time.perf_counter() - t:.1f}"
    return r


def row(name: str) -> dict:
    t = time.perf_counter()
    r = {"model": name}
    try:
        model, x = _build(name)
        g = pathfx.find_groups(model, x, name=name)
        top = Counter(b.op for b in g.barriers).most_common(3)
        r.update(traced="yes", groups=len(g.groups), free=g.num_free, frozen=g.num_frozen,
                 barriers=", ".join(f"{op} ×{n}" for op, n in top) or "-")
        if not g.num_free:
            r["check"] = "nothing to check"
        elif sum(p.numel() for p in model.parameters()) <= SKIP_CHECK_PARAMS:
            s = check_soundness(g, x, reinit=True)
            r["check"] = f"{s.max_rel_error:.1e} {'ok' if s.ok else 'FAILED'}"
        else:
            r["check"] = "not run (size)"
    except PathfxError as e:
        r.update(traced="no", check=str(e).splitlines()[0][:120])
    r["seconds"] = f"{time.perf_counter() - t:.1f}"
    return r


def _one(name: str, mode: str, cycles: int, exporter: str) -> dict:
    return row(name) if mode == "analyze" else transform_row(name, mode, cycles, exporter)


def isolated(name: str, mode: str, cycles: int, exporter: str = "auto") -> dict:
    """One model in a fresh process: memory is returned after each model, and a crash (or the
    out-of-memory killer) costs one row, not the sweep."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_one, name, mode, cycles, exporter).result()
        except BrokenProcessPool:
            return {"model": name, "traced": "-", "check": "process died (out of memory?)",
                    "status": "process died (out of memory?)"}


COLUMNS = ["model", "traced", "groups", "free", "frozen", "barriers", "check", "seconds"]
TRANSFORM_COLUMNS = ["model", "groups", "free", "torch", "onnxruntime", "seconds", "status"]


def markdown(rows, columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.list:
        print("\n".join(zoo.all_names()))
        return 0
    names = [n.strip() for n in args.models.split(",")] if args.models else zoo.all_names()
    for n in names:
        zoo.lookup(n)  # unknown names fail before any work
    rows = [isolated(n, args.mode, args.cycles, args.exporter) for n in tqdm(names, desc=args.mode, unit="model")]
    table = markdown(rows, COLUMNS if args.mode == "analyze" else TRANSFORM_COLUMNS)
    if args.out:
        write_atomic(args.out, table, force=args.force)
    print(table)
    failed = any("FAILED" in r.get("check", "") or "VerificationError" in r.get("status", "") for r in rows)
    return 1 if failed else 0
