"""`pathfx zoo`: run the analysis over torchvision's classifiers and write the coverage table."""
from __future__ import annotations

import os
import time
from collections import Counter

import torch
from tqdm import tqdm

import pathfx
import zoo
from passes.errors import InputError, PathfxError
from passes.reparam import OUT_OF_RANGE
from passes.soundness import check_soundness

from ._common import write_atomic

NAME = "zoo"
HELP = "analyse many models (default: the torchvision classifiers; --source timm: one model per timm module) and " \
       "write a Markdown coverage table"
SKIP_CHECK_PARAMS = 300_000_000  # float64 copies of larger models need several GiB: analysis only


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
    p.add_argument("--out", metavar="FILE", help="write the Markdown table to FILE")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of --out that passed and run only the other models (missing or failed)")


def _build(name: str, size: int | None = None):
    """The model in eval mode and its example input: 1×3×size×size when ``size`` is given, smaller
    than the default and accepted by the model (a forward pass decides), else the default shape."""
    torch.manual_seed(0)
    model, shape = zoo.build(name).eval(), tuple(zoo.lookup(name).input_shape)
    if size and len(shape) == 4 and shape[1] == 3 and min(shape[2:]) > size:
        x = torch.randn(1, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
            return model, x
        except Exception:  # a fixed-size model (ViT, Swin, MaxViT ...): its own shape
            pass
    return model, torch.randn(*shape)


def transform_row(name: str, mode: str, cycles: int, exporter: str = "auto", size: int | None = None) -> dict:
    import tempfile

    t = time.perf_counter()
    r = {"model": name}
    try:
        model, x = _build(name, size)
        r["input"] = "×".join(map(str, x.shape))
        params = sum(p.numel() for p in model.parameters())
        if params > SKIP_CHECK_PARAMS:
            r["status"] = f"not run in the sweep (size: {params / 1e6:.0f}M parameters; run alone)"
            return r
        # two random inputs besides the example: 80 models × 2 modes of float64 runs at 224 px add up
        res = pathfx.transform(model, x, mode=mode, name=name, n_random=2,
                               **({"cycles": cycles} if mode == "balance" else {}))
        g = res.groups
        r.update(groups=len(g.groups), free=g.num_free, torch=f"{res.verification.max_rel:.1e}")
        with tempfile.TemporaryDirectory() as d:
            try:
                rep = pathfx.export_onnx(res.model, f"{d}/m.onnx", x, exporter=exporter)
            except PathfxError:  # TorchScript lacks some ops (adaptive pooling that upsamples): dynamo next
                if exporter != "torchscript":
                    raise
                rep = pathfx.export_onnx(res.model, f"{d}/m.onnx", x, exporter="dynamo")
        status = "ok" if g.num_free else \
            f"ok, no free group ({Counter(b.op for b in g.barriers).most_common(1)[0][0] if g.barriers else '-'})"
        if mode == "path" and g.num_free and not res.report.variables:  # verified, but nothing was rewritten
            status = f"ok, nothing reparameterized ({', '.join(res.report.weight_space) or '-'})"
        elif mode == "path" and res.report is not None:
            ranged = sum(n for reason, n in res.report.weight_space.items() if reason.startswith(OUT_OF_RANGE))
            status += f", {ranged} variables kept in weight space for float32's range" if ranged else ""
        if res.verification.insensitive:
            status += " (the output barely depends on the input: verification checks little)"
        r.update(onnxruntime=f"{rep.max_rel:.1e}", status=status)
    except PathfxError as e:
        r["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    r["seconds"] = f"{time.perf_counter() - t:.1f}"
    return r


def row(name: str, size: int | None = None) -> dict:
    t = time.perf_counter()
    r = {"model": name}
    try:
        model, x = _build(name, size)
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


RAW = "raw exception"  # not a PathfxError: a bug of pathfx, kept in the table instead of ending the sweep


def _one(name: str, mode: str, cycles: int, exporter: str, size: int | None) -> dict:
    try:
        return row(name, size) if mode == "analyze" else transform_row(name, mode, cycles, exporter, size)
    except Exception as e:
        text = f"{RAW} {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        return {"model": name, "traced": "-", "check": text, "status": text}


def isolated(name: str, mode: str, cycles: int, exporter: str = "auto", size: int | None = None) -> dict:
    """One model in a fresh process: memory is returned after each model, and a crash (or the
    out-of-memory killer) costs one row, not the sweep."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_one, name, mode, cycles, exporter, size).result()
        except BrokenProcessPool:
            return {"model": name, "traced": "-", "check": "process died (out of memory?)",
                    "status": "process died (out of memory?)"}


COLUMNS = ["model", "traced", "groups", "free", "frozen", "barriers", "check", "seconds"]
TRANSFORM_COLUMNS = ["model", "input", "groups", "free", "torch", "onnxruntime", "seconds", "status"]


def markdown(rows, columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary(rows, mode: str) -> str:
    """One line of counts under the table: how many rows ended in each status."""
    key = "check" if mode == "analyze" else "status"
    counts = Counter(_status_kind(r.get(key, "-"), mode) for r in rows)
    return "\n" + f"{len(rows)} models: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + "\n"


# kinds of passing transform rows, as the count line under a table names them
CLEAN = "verify and export"
INSENSITIVE = "verify and export, output barely depends on the input"
RANGED = "verify and export, some groups kept in weight space for float32's range"
NO_GROUP = "verify and export with no free group"
NOTHING_REWRITTEN = "verify and export with nothing reparameterized"


def _status_kind(text: str, mode: str) -> str:
    if text.startswith(RAW):
        return RAW
    if mode == "analyze":
        return "sound" if text.endswith(" ok") else text if text in ("nothing to check", "not run (size)") else \
            "FAILED" if "FAILED" in text else "not traced"
    if text.startswith("ok") and "barely depends on the input" in text:
        return INSENSITIVE
    if text == "ok":
        return CLEAN
    if text.startswith("ok, ") and text.endswith("for float32's range"):
        return RANGED
    if text.startswith("ok, no free group"):
        return NO_GROUP
    if text.startswith("ok, nothing reparameterized"):
        return NOTHING_REWRITTEN
    if text.startswith("not run in the sweep"):
        return "not run in the sweep (size)"
    return text.split(":")[0]


def read_table(path: str, columns) -> dict[str, dict]:
    """Rows of a table written by ``markdown``, by model name."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and len(cells) == len(columns) and cells[0] != columns[0]:
                rows[cells[0]] = {c: v for c, v in zip(columns, cells) if v != "-"}
    return rows


def passed(r: dict, mode: str) -> bool:
    return _status_kind(r.get("check" if mode == "analyze" else "status", "-"), mode) in (
        "sound", "nothing to check", CLEAN, NO_GROUP, NOTHING_REWRITTEN, INSENSITIVE, RANGED)


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
        rows.append(kept.get(n) or isolated(n, args.mode, args.cycles, args.exporter, args.size))
        if args.out:  # the table so far, so that a stopped sweep keeps what it measured
            write_atomic(args.out, markdown(rows, columns) + summary(rows, args.mode), force=True)
    print(markdown(rows, columns) + summary(rows, args.mode))
    failed = any("FAILED" in r.get("check", "") or "VerificationError" in r.get("status", "") or
                 r.get("status", "").startswith(RAW) for r in rows)
    return 1 if failed else 0
