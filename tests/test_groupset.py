"""RescalingGroups as data: JSON, text table, DOT, and how factors act on weights."""
from __future__ import annotations

import numpy as np
import pydot
import pytest
import torch
import torch.nn as nn

from pathfx import find_groups
from passes.groupset import RescalingGroups, apply_factors
from passes.soundness import outputs, random_factors, rel_error


class Net(nn.Module):
    """Identity-skip stream, a grouped conv, a GELU barrier and a flatten → linear head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.g = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(4 * 3 * 3 + 3 * 3 * 3, 2)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        h = torch.relu(self.c2(torch.relu(self.c1(h))) + h)
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(torch.cat([h.flatten(1), nn.functional.gelu(self.g(h)).flatten(1)], 1))


def groups():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    return find_groups(Net().double(), x), x


def test_expected_structure():
    # stream c0 ∪ c2 (4) and c1 (4) are free; g's 3 outputs feed GELU; fc's 2 are the output.
    g, _ = groups()
    assert [(gr.width, [p.weight for p in gr.producers]) for gr in g.groups] == \
        [(4, ["c0.weight", "c2.weight"]), (4, ["c1.weight"])]
    assert g.num_free == 8 and g.num_frozen == 5 and len(g.barriers) == 1


def test_json_round_trip():
    g, _ = groups()
    text = g.to_json()
    back = RescalingGroups.from_json(text)
    assert back == g
    assert back.to_json() == text
    assert back.num_free == g.num_free == 8 and back.num_frozen == g.num_frozen
    assert back.groups[0].consumers[-1].in_vars == g.groups[0].consumers[-1].in_vars


def test_str_is_a_table():
    g, _ = groups()
    s = str(g)
    assert s.splitlines()[0] == "Net: 2 groups, 8 free variables, 5 frozen, 1 barriers"
    assert "c0.weight (+1)" in s and "identity-skip" in s
    assert "graph output" in s and "gelu" in s
    rows = [line.split() for line in s.splitlines()[2:] if line[:5].strip().isdigit()]
    assert [r[:5] for r in rows[:2]] == [["0", "4", "0", "2", "3"], ["1", "4", "0", "1", "1"]]


class Gated(nn.Module):
    """The same barrier in five places: the frozen table says it once, with its places."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


def test_frozen_reasons_are_grouped_over_nodes():
    g = find_groups(Gated().double(), torch.randn(2, 4, dtype=torch.float64))
    lines = [line for line in str(g).splitlines() if "input of sigmoid" in line]
    assert len(lines) == 1 and "at node" not in lines[0]
    amount, places = map(int, lines[0].split()[:2])
    assert (amount, places) == (20, 5) and "sigmoid and 4 more" in lines[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside pydot's parser
def test_dot_parses_and_has_every_group():
    g, _ = groups()
    dot = g.to_dot()
    graphs = pydot.graph_from_dot_data(dot)
    assert graphs and len(graphs) == 1
    names = {n.get_name().strip('"') for n in graphs[0].get_nodes()}
    assert {"group0", "group1"} <= names
    assert {"c0.weight", "c1.weight", "c2.weight", "fc.weight"} <= names
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graphs[0].get_edges()}
    assert ("c2.weight", "group0") in edges and ("group0", "fc.weight") in edges and ("group1", "c2.weight") in edges


def test_apply_factors_round_trip():
    g, x = groups()
    m = g.module.double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = outputs(m, [x])
    f = random_factors(g, seed=3)
    apply_factors(m, g, f)
    changed = [k for k in before if not torch.equal(before[k], m.state_dict()[k])]
    assert set(changed) == {"c0.weight", "c0.bias", "c1.weight", "c1.bias", "c2.weight", "c2.bias", "g.weight",
                            "fc.weight"}
    assert rel_error(ref, outputs(m, [x]))[0] < 1e-12
    # fc reads channel c of the stream at columns 9c..9c+8: divided by that channel's factor
    ratio = (before["fc.weight"] / m.state_dict()["fc.weight"]).numpy()
    assert np.allclose(ratio[:, :36], np.repeat(f[0], 9)[None, :])
    assert np.allclose(ratio[:, 36:], 1.0)
    apply_factors(m, g, {gid: 1.0 / v for gid, v in f.items()})
    for k, v in before.items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-12, atol=1e-14)
