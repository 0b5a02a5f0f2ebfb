"""The graph checked against the model's forward in one real run (passes/replay.py): leaf calls are
taken from the model's own run, never trusted where a write could have changed their inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pathfx import find_groups
from passes import replay
from passes.errors import TraceError
from passes.manager import run_pipeline
from passes.soundness import outputs, rel_error


def inp(seed=0):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Chain(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=inplace)
        self.c2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.act(self.bn(self.c1(x)))  # the in-place ReLU writes into the BN's output after its call
        return self.c2(y)


def test_every_leaf_runs_once(monkeypatch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(torch.cat([y[:, 2:], y[:, :2]], 1))

    runs = []
    conv = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: runs.append(self) or conv(self, *a))
    net = Net().double().eval()
    g = find_groups(net, inp())
    assert len(runs) == 2  # the model's own run; the graph took both outputs from it
    assert g.num_free == 4


@pytest.mark.parametrize("inplace", [True, False])
def test_inplace_activation_after_a_module(inplace, monkeypatch):
    net = Chain(inplace).double().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
    stops = []
    advance = replay.Lockstep.advance
    monkeypatch.setattr(replay.Lockstep, "advance", lambda self: advance(self) or stops.append(self.abandoned))
    r = run_pipeline("analyze", net, inp())
    assert set(stops) == {""}  # the in-place write follows the call the graph took: no fall-back
    x = inp(1)
    assert rel_error(outputs(net, [x]), outputs(r.gm, [x]))[0] < 1e-12
    assert r["groups"].num_free == 4


class GraphWritesIntoModel(nn.Module):
    """The graph's own in-place op would write into a tensor the model's run still uses."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        z = y.sigmoid_()
        return self.c2(z) + y


class ModelWritesIntoGraph(nn.Module):
    """The model writes in place into a module's output that the graph reads again later: the graph
    mirrors the write out of place right after taking the output, before the model's write."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        a += 1.0
        return b * 2 + a


@pytest.mark.parametrize("cls, why", [(GraphWritesIntoModel, "wrote"), (ModelWritesIntoGraph, "")])
def test_writes_in_place_between_the_two_runs(cls, why, monkeypatch):
    stops = []
    advance = replay.Lockstep.advance
    monkeypatch.setattr(replay.Lockstep, "advance", lambda self: advance(self) or stops.append(self.abandoned))
    torch.manual_seed(0)
    net = cls().double().eval()
    x = inp()
    want = outputs(net, [x.clone()])
    r = run_pipeline("analyze", net, x)
    assert stops[-1] == why
    assert rel_error(want, outputs(net, [x.clone()]))[0] == 0  # the model's weights and results unchanged
    assert rel_error(want, outputs(r.gm, [x.clone()]))[0] < 1e-12
    assert r.gm.graph is not None and r["shapes"]


class AliasLost(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        z = y.view(y.shape)
        y *= 2  # z too; fx multiplies out of place and z keeps the old values
        return self.c2(torch.relu(z))


def test_a_lost_alias_is_still_refused():
    with pytest.raises(TraceError, match="does not compute what its forward computes"):
        find_groups(AliasLost().double(), inp())
