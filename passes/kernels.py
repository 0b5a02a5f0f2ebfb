"""Compiled loops for ENorm in training (kernels.c), loaded with ctypes.

The shared library is built on first use with the system C compiler into a per-user cache
(``$PATHFX_CACHE`` or ``~/.cache/pathfx``), keyed by the source, the compiler and the machine,
and renamed into place once complete. With no compiler, or ``PATHFX_KERNELS=0``, ``lib()`` is
None and callers use plain torch operations: same results, slower.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_off = False


def _cpu() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another that
    shares the cache directory."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS, platform.machine(), _cpu()]).encode()
                         ).hexdigest()[:16]
    cache = Path(os.environ.get("PATHFX_CACHE", Path.home() / ".cache" / "pathfx"))
    out = cache / f"kernels-{key}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)  # another process may have built it meanwhile: same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def lib():
    """The loaded library, or None when it cannot be built here (or PATHFX_KERNELS=0)."""
    global _lib
    if _lib is False:
        _lib = None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("PATHFX_KERNELS", "1") != "0" and cc:
            try:
                _lib = ctypes.CDLL(str(_build(cc)))
                for s in ("f32", "f64"):
                    getattr(_lib, f"sumsq_{s}").restype = ctypes.c_double
            except (OSError, subprocess.SubprocessError):
                _lib = None
    return _lib


@contextlib.contextmanager
def disabled():
    """Plain torch operations inside the block (to compare the two, or to measure ATen alone)."""
    global _off
    _off, before = True, _off
    try:
        yield
    finally:
        _off = before


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels take contiguous CPU float32 / float64 tensors of one dtype."""
    return not _off and lib() is not None and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == tensors[0].dtype
                                     and t.dtype in _SUFFIX for t in tensors)


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _fn(name: str, t: torch.Tensor):
    return getattr(lib(), f"{name}_{_SUFFIX[t.dtype]}")


# Below this many entries a loop runs on one thread: waking the others costs more than it saves.
SPLIT_FROM = 1 << 16


def _threads(size: int) -> ctypes.c_int:
    return ctypes.c_int(torch.get_num_threads() if size >= SPLIT_FROM else 1)


def rowsq(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[o] = Σ_j w[o, j]² v[j] for a 2-D ``w``."""
    out = torch.empty(w.shape[0], dtype=w.dtype)
    _fn("rowsq", w)(_ptr(w), _ptr(v), _ptr(out), ctypes.c_int64(w.shape[0]), ctypes.c_int64(w.shape[1]),
                    _threads(w.numel()))
    return out


def colsq(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """acc[j] = Σ_o u[o] w[o, j]² for a 2-D ``w``."""
    acc = torch.empty(w.shape[1], dtype=w.dtype)
    _fn("colsq", w)(_ptr(w), _ptr(u), _ptr(acc), ctypes.c_int64(w.shape[0]), ctypes.c_int64(w.shape[1]))
    return acc


def sumsq(w: torch.Tensor) -> tuple[float, int]:
    """(Σ w², number of zero entries)."""
    zeros = ctypes.c_int64(0)
    s = _fn("sumsq", w)(_ptr(w), ctypes.c_int64(w.numel()), ctypes.byref(zeros))
    return s, zeros.value


def energy(w: torch.Tensor, taps: int) -> torch.Tensor:
    """Σ over the kernel taps of w² for each (output, input) pair: w.numel() / taps values."""
    e = torch.empty(w.numel() // taps, dtype=w.dtype)
    _fn("energy", w)(_ptr(w), _ptr(e), ctypes.c_int64(e.numel()), ctypes.c_int64(taps), _threads(w.numel()))
    return e


def scale(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, blocks: int = 1) -> None:
    """In place, one pass over a 2-D view ``w`` (rows × n): w[o, j] *= a[o] b[block(o), j], with
    ``b`` holding ``blocks`` rows of n factors and the rows split evenly between the blocks."""
    _fn("scale", w)(_ptr(w), _ptr(a), _ptr(b), ctypes.c_int64(w.shape[0]), ctypes.c_int64(w.shape[1]),
                    ctypes.c_int64(w.shape[0] // blocks), _threads(w.numel()))
