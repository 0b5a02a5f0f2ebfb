"""What a run of ENorm reports (passes/enorm.py): the objective per cycle, how far each cycle
moved the weights, the energy of every layer before and after, dead channels."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .enorm_numbers import INF
from .table import table


def exp(x: float) -> float:
    """e^x as a float, inf past float64's range (math.exp raises there)."""
    return INF if x > 709.78 else math.exp(x)


def _number(log: float, digits: int = 6) -> str:
    """A positive number given by its natural log, printed even where float64 cannot hold it."""
    if log == -INF or abs(log) < 700:
        return f"{exp(log):.{digits}g}"
    e = math.floor(log / math.log(10))
    return f"{10 ** (log / math.log(10) - e):.{digits - 1}f}e{e:+d}"


@dataclass
class LayerEnergy:
    """Σ|w|^p of a layer's weight (p = ∞: max|w|) and of each of its rows, before and after.
    At large p these leave float64's range (0 or inf); the logs are exact at any p."""

    name: str
    before: float
    after: float
    rows_before: list[float]  # per output unit: over its incoming weights (the paper's columns)
    rows_after: list[float]
    log_before: float
    log_after: float


@dataclass
class DeadChannels:
    group: int
    variables: list[int]  # no nonzero path from the input through them to the output: left at factor 1


@dataclass
class ENormReport:
    p: float  # inf for p = ∞
    c: float
    tol: float  # the convergence tolerance applied (ROUNDING if a smaller one was asked)
    cycles: int
    converged: bool  # the last cycle moved no weight or bias by more than tol
    objective: list[float]  # [0] before, [i] after cycle i: Σ|w|^p over every layer of any group (p = ∞: max|w|)
    log_objective: list[float]  # its natural log, exact at any p (objective is 0 or inf where float64 ends)
    moved: list[float]  # per cycle: the largest |log(new/old)| of a balanced weight or bias entry
    weighted_objective: list[float] | None  # c != 1 on a layered network, else None
    log_weighted_objective: list[float] | None
    layers: list[LayerEnergy]
    groups: list[int]  # balanced group ids
    colours: list[list[int]]  # group ids updated together, in cycle order
    dead: list[DeadChannels] = field(default_factory=list)

    @property
    def before(self) -> float:
        return self.objective[0]

    @property
    def after(self) -> float:
        return self.objective[-1]

    @property
    def num_dead(self) -> int:
        return sum(len(d.variables) for d in self.dead)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        what = "max|w|" if self.p == INF else f"Σ|w|^{self.p:g}"
        head = table(["", "value"], [
            ["p, c", f"{self.p:g}, {self.c:g}"],
            ["groups balanced", f"{len(self.groups)} in {len(self.colours)} colour classes"],
            ["cycles", f"{self.cycles}" + (" (converged)" if self.converged else " (not converged)")],
            ["last cycle moved", f"{self.moved[-1]:.3g} (tol {self.tol:g})" if self.moved else "-"],
            [f"objective before ({what})", _number(self.log_objective[0])],
            [f"objective after ({what})", _number(self.log_objective[-1])],
            ["dead channels", self.num_dead],
        ])
        rows = [[lay.name, _number(lay.log_before), _number(lay.log_after),
                 _number(lay.log_after - lay.log_before, 3) if lay.log_before > -INF else "-"]
                for lay in self.layers]
        return head + "\n\n" + table(["layer", "energy before", "energy after", "ratio"], rows)
