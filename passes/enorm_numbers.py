"""How ENorm computes energies and applies factors (passes/enorm.py): two number systems.

Plain squares, p = 2: the energy of one (output, input) pair of a weight is Σ_taps w², factors
are plain numbers, and the compiled loops of ``kernels`` do the passes over large weights; the
fast path of training. It is used only while every number stays where float arithmetic loses
nothing to the range (``energy_window``, ``factor_window``).

Logs, every other p and p = 2 outside that range. Σ|w|^p leaves float64's range long before
p = 256 (1e-3^256 underflows, 1e3^103 overflows), and then live channels look dead and factors
come out as 0 or ∞. So every energy is kept as its log: for one pair,
``log Σ_taps |w|^p = p·log m + log Σ_taps (|w|/m)^p`` with ``m = max_taps |w|`` (every term of the
sum is at most 1 and one of them is exactly 1), sums of energies are log-sum-exps, and products of
factors are sums of their logs. At p = ∞ the "energy" of a pair is ``max_taps |w|`` and its log,
and every sum becomes a max.

An all-zero kernel has log energy −∞, exactly, and only such a kernel does: whether a channel is
dead depends on which weights are zero, never on the range of |w|^p.

``q`` is the power the factors enter an energy with: a row scaled by d has energy × d^q, with
q = p for finite p and q = 1 at p = ∞ (the max scales like |w| itself).
"""
from __future__ import annotations

import math

import torch

from . import kernels

INF = math.inf


def power(p: float) -> float:
    return 1.0 if p == INF else float(p)


def _floor(dtype: torch.dtype) -> float:
    """Shifted logs are raised to this floor before exp: exp of anything lower is subnormal (or 0),
    and subnormal arithmetic is many times slower on CPUs (at p = 1000 most terms would be). A
    term so raised was below e^floor (1e-307 in float64) of the largest term of its sum, where
    rounding loses it anyway."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _sum_exp(x: torch.Tensor, dim: int, m: torch.Tensor) -> torch.Tensor:
    """log Σ exp(x - m) along ``dim`` (kept), for m ≥ max(x) along it."""
    return (x - m).clamp_(min=_floor(x.dtype)).exp_().sum(dim, keepdim=True).log_()


def log_sum(x: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """log Σ exp(x) along ``dim`` (the max at p = ∞); −∞ where every entry is −∞."""
    if p == INF:
        return torch.amax(x, dim)
    m = torch.amax(x, dim, keepdim=True)
    empty = m == -INF
    m = m.masked_fill(empty, 0.0)
    return _sum_exp(x, dim, m).add_(m).masked_fill_(empty, -INF).squeeze(dim)


def log_energy(w: torch.Tensor, p: float, taps: int) -> torch.Tensor:
    """Per (output, input) pair of ``w`` (contiguous runs of ``taps`` entries): log Σ_taps |w|^p,
    or log max_taps |w| at p = ∞."""
    a = w.abs().reshape(-1, taps)
    if p == INF or taps == 1:
        m = a.amax(1) if taps > 1 else a.reshape(-1)
        return m.log() if p == INF else m.log().mul_(p)
    m = a.amax(1, keepdim=True)
    zero = m == 0
    m = m.masked_fill(zero, 1.0).log_()
    return _sum_exp(a.log().mul_(p), 1, m.mul(p)).add_(m.mul_(p)).masked_fill_(zero, -INF).view(-1)


def log_scatter(values: list[torch.Tensor], index: list[torch.Tensor], width: int, p: float) -> torch.Tensor:
    """out[v] = log Σ exp(values[j]) over the j with index[j] = v (max at p = ∞); −∞ for no j."""
    v, i = torch.cat(values), torch.cat(index)
    m = torch.full((width,), -INF, dtype=v.dtype).scatter_reduce_(0, i, v, "amax")
    if p == INF:
        return m
    empty = m == -INF
    m = m.masked_fill(empty, 0.0)
    e = (v - m[i]).clamp_(min=_floor(v.dtype)).exp_()
    return torch.zeros(width, dtype=v.dtype).scatter_add_(0, i, e).log_().add_(m).masked_fill_(empty, -INF)


class LazyLogs:
    """Log energies of a large 2-D weight (rows × columns, one tap per pair), never stored whole:
    computed a block of rows at a time whenever a sum needs them."""

    def __init__(self, w: torch.Tensor, p: float, dtype: torch.dtype):
        self.w, self.p, self.dtype = w, p, dtype
        self.step = max(1, (1 << 18) // max(1, w.shape[1]))

    def _chunks(self):
        for s in range(0, self.w.shape[0], self.step):
            yield s, log_energy(self.w[s:s + self.step].to(self.dtype), self.p, 1).view(-1, self.w.shape[1])

    def rows(self, u: torch.Tensor) -> torch.Tensor:
        """Per row: reduce over the columns of (log energy + u[column])."""
        return torch.cat([log_sum(e + u, 1, self.p) for _, e in self._chunks()])

    def cols(self, v: torch.Tensor) -> torch.Tensor:
        """Per column: reduce over the rows of (log energy + v[row])."""
        parts = torch.stack([log_sum(e + v[s:s + len(e), None], 0, self.p) for s, e in self._chunks()])
        return log_sum(parts, 0, self.p)

    def nonzero_blocks(self):
        for s in range(0, self.w.shape[0], self.step):
            yield s, self.w[s:s + self.step] != 0

    def all_nonzero(self) -> bool:
        return int(torch.count_nonzero(self.w)) == self.w.numel()


def work_dtype(w: torch.Tensor, dtype) -> torch.dtype:
    """The dtype a run computes a weight's energies in: ``dtype``, else the weight's own, with half
    precision raised to float32 (its exponent range holds few squares)."""
    return dtype or (w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32)


def work(w: torch.Tensor, dtype) -> torch.Tensor:
    return w.to(work_dtype(w, dtype))


def energy_window(dtype: torch.dtype) -> tuple[float, float]:
    """The nonzero energies Σ_taps w² a plain p = 2 state takes: 2^±e, e = 0.45 × the dtype's
    largest exponent (460 in float64, 57 in float32). With factors within ``factor_window``
    (2^±81, 2^±10) a current energy E·r²/k² stays within 2^±784 (2^±97), so sums of up to 2^64
    (2^24) of them are normal numbers and the squares lose nothing to the range."""
    e = int(0.45 * math.log2(torch.finfo(dtype).max))
    return 2.0 ** -e, 2.0 ** e


def factor_window(dtype: torch.dtype) -> tuple[float, float]:
    f = int(0.08 * math.log2(torch.finfo(dtype).max))
    return 2.0 ** -f, 2.0 ** f


class LazySquares:
    """w² of a large 2-D weight, never stored whole: summed straight from the weight by the
    compiled loops (in the weight's dtype), else computed a block of rows at a time."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.w, self.dtype = w, dtype
        self.fast = w.dtype == dtype and kernels.usable(w)
        self.zeros: int | None = None  # entries equal to 0, once ``sum`` has counted them
        self.step = max(1, (1 << 18) // max(1, w.shape[1]))

    def blocks(self):
        for s in range(0, self.w.shape[0], self.step):
            yield s, self.w[s:s + self.step].to(self.dtype).square()

    def nonzero_blocks(self):
        for s in range(0, self.w.shape[0], self.step):
            yield s, self.w[s:s + self.step] != 0

    def mv(self, vec: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if self.fast:
            return (kernels.colsq if transpose else kernels.rowsq)(self.w, vec.contiguous())
        if not transpose:
            return torch.cat([torch.mv(e, vec) for _, e in self.blocks()])
        out = torch.zeros(self.w.shape[1], dtype=self.dtype)
        for s, e in self.blocks():
            out.addmv_(e.t(), vec[s:s + len(e)])
        return out

    def sum(self) -> torch.Tensor:
        if self.fast:
            total, self.zeros = kernels.sumsq(self.w)
            return torch.tensor(total, dtype=self.dtype)
        return torch.stack([e.sum() for _, e in self.blocks()]).sum()

    def all_nonzero(self) -> bool:
        return (self.zeros if self.zeros is not None else self.w.numel() - int(torch.count_nonzero(self.w))) == 0

    def smallest(self) -> float:
        """The smallest nonzero |w| (inf for none)."""
        out = INF
        for _, nz in self.nonzero_blocks():
            out = min(out, float(self.w[_:_ + len(nz)][nz].abs().min())) if bool(nz.any()) else out
        return out


def mv(E, vec: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Row sums (or column sums) of an ungrouped energy matrix, weighted by ``vec``."""
    if isinstance(E, LazySquares):
        return E.mv(vec, transpose)
    return torch.mv(E[0].t() if transpose else E[0], vec)


def rescale(t: torch.Tensor, lay, r: torch.Tensor, k: torch.Tensor, power: int) -> None:
    """t × (r_row / k_column)**power: one pass of the compiled loop, or else (an ungrouped layer)
    two ATen passes with long contiguous runs (rows by a scalar each, columns by k repeated over
    the kernel taps): several times faster on a CPU than one pass broadcasting a factor over runs
    as short as a 3 × 3 kernel."""
    if lay.kind != "affine" and kernels.usable(t):
        v = t.view(lay.shape[0], -1)
        cols = k.to(t.dtype).pow(-power)
        kernels.scale(v, r.to(t.dtype).pow(power), cols.repeat_interleave(v.shape[1] // lay.cols), lay.blocks)
        return
    if lay.blocks == 1 and lay.kind != "affine" and t.is_contiguous():
        v = t.view(lay.shape[0], -1)
        cols = k.to(t.dtype).pow(-power)
        v.mul_(cols.repeat_interleave(v.shape[1] // lay.cols) if v.shape[1] > lay.cols else cols)
        v.mul_(r.to(t.dtype).pow(power).view(-1, 1))
        return
    F = (r.view(lay.blocks, lay.rows, 1) / k.view(lay.blocks, 1, lay.cols)).reshape(lay.view)
    t.mul_(F.to(t.dtype).pow(power) if power != 1 else F.to(t.dtype))




def rescale_log(t: torch.Tensor, lay, r: torch.Tensor, k: torch.Tensor, power: int) -> None:
    """t × exp(power·(r_row - k_column)) for log factors r, k: the ratio is formed before the
    exponential, so factors whose own exponentials would leave float range still apply; an
    ungrouped layer a block of rows at a time."""
    if lay.kind == "affine" or lay.blocks > 1 or not t.is_contiguous():
        F = (r.view(lay.blocks, lay.rows, 1) - k.view(lay.blocks, 1, lay.cols)).mul_(power).exp_()
        t.mul_(F.reshape(lay.view).to(t.dtype))
        return
    v = t.view(lay.shape[0], lay.cols, -1)
    step = max(1, (1 << 18) // max(1, lay.cols))
    for s in range(0, lay.shape[0], step):
        F = (r[s:s + step, None] - k[None, :]).mul_(power).exp_()
        v[s:s + step].mul_(F.to(t.dtype).unsqueeze(-1))
