"""Coverage sweeps over the model registries (`pathfx zoo`): one row per model, each in its own
process, and the Markdown tables of docs/ with their count lines."""
from __future__ import annotations

import time
from collections import Counter

import torch

import zoo
from passes.errors import PathfxError
from passes.onnx_export import export_onnx
from passes.reparam import OUT_OF_RANGE
from passes.soundness import check_soundness

from .analysis import find_groups
from .transform import transform

SKIP_CHECK_PARAMS = 300_000_000  # float64 copies of larger models need several GiB: analysis only


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


def transform_row(name: str, mode: str, cycles: int, exporter: str = "auto", size: int | None = None,
                  front_end: dict | None = None) -> dict:
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
        res = transform(model, x, mode=mode, name=name, n_random=2, **(front_end or {}),
                        **({"cycles": cycles} if mode == "balance" else {}))
        g = res.groups
        r.update(groups=len(g.groups), free=g.num_free, torch=f"{res.verification.max_rel:.1e}")
        with tempfile.TemporaryDirectory() as d:
            try:
                rep = export_onnx(res.model, f"{d}/m.onnx", x, exporter=exporter)
            except PathfxError:  # TorchScript lacks some ops (adaptive pooling that upsamples): dynamo next
                if exporter != "torchscript":
                    raise
                rep = export_onnx(res.model, f"{d}/m.onnx", x, exporter="dynamo")
        status = "ok" if g.num_free else \
            f"ok, no free group ({Counter(b.op for b in g.barriers).most_common(1)[0][0] if g.barriers else '-'})"
        if mode == "path" and g.num_free and not res.report.variables:  # verified, but nothing was rewritten
            status = f"ok, nothing reparameterized ({', '.join(res.report.weight_space) or '-'})"
        elif mode == "path" and res.report is not None:
            ranged = sum(n for reason, n in res.report.weight_space.items() if reason.startswith(OUT_OF_RANGE))
            status += f", {ranged} variables kept in weight space for float32's range" if ranged else ""
        if res.verification.insensitive:
            status += " (the output barely depends on the input: verification checks little)"
        if g.opaque:
            status += f"; {OPAQUE_MARK}{opaque_leaves(g)}"
        r.update(onnxruntime=f"{rep.max_rel:.1e}", status=status)
    except PathfxError as e:
        r["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    r["seconds"] = f"{time.perf_counter() - t:.1f}"
    return r


def opaque_leaves(g) -> str:
    """The opaque leaves of a result, by class, with the first submodule of each: 'GPSA ×10 (blocks.0.attn …)'."""
    by_class: dict[str, list[str]] = {}
    for b in g.opaque:
        by_class.setdefault(b.op, []).append(b.module)
    return ", ".join(f"{op} ×{len(mods)} ({mods[0]}{' …' if len(mods) > 1 else ''})" for op, mods in by_class.items())


def row(name: str, size: int | None = None, front_end: dict | None = None) -> dict:
    t = time.perf_counter()
    r = {"model": name}
    try:
        model, x = _build(name, size)
        g = find_groups(model, x, name=name, **(front_end or {}))
        top = Counter(b.op for b in g.barriers if b not in g.opaque).most_common(3)
        listed = [f"{OPAQUE_MARK}{opaque_leaves(g)}"] if g.opaque else []
        r.update(traced="yes", groups=len(g.groups), free=g.num_free, frozen=g.num_frozen,
                 barriers="; ".join(listed + [", ".join(f"{op} ×{n}" for op, n in top)] if top else listed) or "-")
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


def _one(name: str, mode: str, cycles: int, exporter: str, size: int | None, front_end: dict | None) -> dict:
    try:
        return row(name, size, front_end) if mode == "analyze" else \
            transform_row(name, mode, cycles, exporter, size, front_end)
    except Exception as e:
        text = f"{RAW} {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        return {"model": name, "traced": "-", "check": text, "status": text}


def isolated(name: str, mode: str, cycles: int, exporter: str = "auto", size: int | None = None,
             front_end: dict | None = None) -> dict:
    """One model in a fresh process: memory is returned after each model, and a crash (or the
    out-of-memory killer) costs one row, not the sweep."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_one, name, mode, cycles, exporter, size, front_end).result()
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


OPAQUE_MARK = "opaque: "  # how the barriers column (analysis) and the status (transform) list opaque leaves


def summary(rows, mode: str) -> str:
    """One line of counts under the table: how many rows ended in each status, and how many of them
    kept submodules opaque."""
    key = "check" if mode == "analyze" else "status"
    counts = Counter(_status_kind(r.get(key, "-"), mode) for r in rows)
    opaque = sum(OPAQUE_MARK in r.get("barriers" if mode == "analyze" else "status", "") for r in rows)
    tail = f" ({opaque} with opaque leaves)" if opaque else ""
    return "\n" + f"{len(rows)} models: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + tail + "\n"


# kinds of passing transform rows, as the count line under a table names them
CLEAN = "verify and export"
INSENSITIVE = "verify and export, output barely depends on the input"
RANGED = "verify and export, some groups kept in weight space for float32's range"
NO_GROUP = "verify and export with no free group"
NOTHING_REWRITTEN = "verify and export with nothing reparameterized"


def _status_kind(text: str, mode: str) -> str:
    text = text.split(f"; {OPAQUE_MARK}")[0]
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
