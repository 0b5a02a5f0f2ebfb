"""Shared test helpers."""
import torch
import torch.nn as nn

import pathfx
from passes.soundness import lively_init as lively  # noqa: F401

C = 4
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SHAPE = {1: (2, 3, 8), 2: (2, 3, 8, 8), 3: (2, 3, 4, 4, 4)}


class Probe(nn.Module):
    """conv → relu → OP → linear: the rule tables' probe, in which the conv's channels stay free when
    OP is positively homogeneous and channel-preserving."""

    def __init__(self, op, dims: int):
        super().__init__()
        self.a = CONV[dims](3, C, 1)
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        with torch.no_grad():
            h = self.apply_op(torch.relu(self.a(torch.randn(*SHAPE[dims]))))
        self.b = nn.Linear(h[0].numel(), 2)

    def apply_op(self, h):
        return self.op(h) if self.op is not None else self.fn(h)

    def forward(self, x):
        h = self.apply_op(torch.relu(self.a(x)))
        return self.b(h.reshape(h.shape[0], -1).double())


def analyse(op, dims, **options):
    """The groups of a ``Probe`` of ``op`` (``options``: of ``pathfx.find_groups``) and its input."""
    torch.manual_seed(0)
    model = Probe(op, dims).double()
    x = torch.randn(*SHAPE[dims], dtype=torch.float64)
    return pathfx.find_groups(model, x, **options), x


def free_of_a(groups) -> int:
    return sum(g.width for g in groups.groups if any(p.weight == "a.weight" for p in g.producers))


def batches(data, steps, batch=64, seed=1):
    """``steps`` random training batches of a lab data set, drawn with replacement from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x, y = data.train
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        yield x[idx], y[idx]
