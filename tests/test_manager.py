"""passes.manager: named passes with declared inputs/outputs, pipelines with timings."""
import copy

import pytest
import torch
import torch.nn as nn

import pathfx
from pathfx.nn import PBN, PathLayer
from passes import manager
from passes.errors import InputError
from passes.manager import Pass, Pipeline, run_pass, run_pipeline
from passes.trace import trace
from util import lively


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def net():
    torch.manual_seed(0)
    return lively(Net()).double().eval()


X = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_analyze_pipeline_matches_find_groups():
    m = net()
    r = run_pipeline("analyze", m, X)
    assert list(r.timings) == ["trace", "shapes", "fold_bn", "groups"]
    assert all(t >= 0 for t in r.timings.values()) and r.total_seconds == pytest.approx(sum(r.timings.values()))
    ref = pathfx.find_groups(m, X)
    assert [(g.width, g.tags) for g in r["groups"].groups] == [(g.width, g.tags) for g in ref.groups]
    assert r["groups"].num_free == ref.num_free == 16
    assert len(r["fold_report"].folded) == 2 and r.gm is r["groups"].source
    assert "groups" in str(r) and "total" in str(r)


def test_balance_pipeline_preserves_the_function():
    m = net()
    state = copy.deepcopy(m.state_dict())
    r = run_pipeline("balance", m, X, cycles=3)
    rep = r["enorm_report"]
    assert rep.cycles == 3 and rep.objective[-1] < rep.objective[0]
    assert pathfx.verify(m, r.gm, X, n_random=3).raise_if_failed().max_rel < 1e-12
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # caller's model untouched


def test_path_pipeline_builds_pbn():
    m = net()
    r = run_pipeline("path", m, X)
    assert list(r.timings)[-2:] == ["reparam", "pbn"]
    mods = list(r.gm.modules())
    assert any(isinstance(x, PBN) for x in mods) and any(isinstance(x, PathLayer) for x in mods)
    assert r["pbn_layers"] == [("conv2", "bn2")] and r["reparam_report"].pbn_layers == ["conv2"]
    assert pathfx.verify(m, r.gm, X, n_random=3, rtol=1e-9).ok


def test_single_pass_on_a_graph_module():
    gm = trace(net())
    with pytest.raises(InputError, match="pass 'groups' needs shapes"):
        run_pass("groups", gm)
    shaped = run_pass("shapes", gm, X).gm
    assert run_pass("groups", shaped)["groups"].num_free == 0  # unfolded BatchNorms are barriers
    folded = run_pass("fold_bn", shaped)
    assert "groups" not in folded.state and len(folded["fold_report"].folded) == 2
    r = run_pass("groups", folded.gm)  # the folded module keeps its shape annotations
    assert list(r.timings) == ["groups"] and r["groups"].num_free == 16


def test_missing_inputs_fail_before_any_pass_runs(monkeypatch):
    ran = []
    monkeypatch.setitem(manager.PASSES, "trace", Pass("trace", lambda s: ran.append(1) or {"gm": None},
                                                      ("model",), ("gm",)))
    with pytest.raises(InputError, match="'shapes' needs example_inputs"):
        manager.pipeline("analyze").run(net())
    assert ran == []


def test_options_are_routed_and_checked():
    with pytest.raises(InputError, match="no option cycle"):
        run_pipeline("balance", net(), X, cycle=3)
    with pytest.raises(InputError, match="unknown pipeline"):
        run_pipeline("nope", net(), X)
    assert "cycles" in manager.pipeline("balance").options and "policy" in manager.pipeline("path").options


def test_a_user_pipeline_with_its_own_pass():
    def count(state, *, kind="conv"):
        return {"count": sum(1 for g in state["groups"].groups if kind in g.tags)}

    p = Pipeline("mine", [manager.get_pass(n) for n in manager.PIPELINES["analyze"]] +
                 [Pass("count", count, ("groups",), ("count",))])
    assert p.run(net(), X, kind="conv")["count"] >= 1

    def undeclared(state):
        return {"other": 1}

    with pytest.raises(RuntimeError, match="undeclared outputs"):
        Pipeline("bad", [Pass("u", undeclared, ("model",), ("count",))]).run(net())
