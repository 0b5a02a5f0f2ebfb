"""One hand-built model per rule of the group-analysis table (DESIGN §1).

Every test states the expected groups, derived by hand in a comment, and checks that
random positive factors on every free variable leave the float64 output unchanged.
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from pathfx import find_groups
from passes.groupset import NO_VAR, in_channel_index
from passes.soundness import check_soundness, outputs, rel_error


def _custom_gate(x):
    return x * (x.abs() + 1.0).reciprocal()


torch.fx.wrap("_custom_gate")

X = None  # set per test; the default input is 2×3×6×6


def inp(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (2, 3, 6, 6)), generator=g, dtype=torch.float64)


def build(cls, *a, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(*a, **kw).double().eval()


def analyse(model, x, **kw):
    g = find_groups(model, x, **kw)
    res = check_soundness(g, x, seed=1)
    assert res.ok, (res, str(g))
    assert res.num_free == g.num_free
    return g


def summary(g):
    """[(width, producer weights, consumer weights)] per group."""
    return [(gr.width, [p.weight for p in gr.producers], [c.weight for c in gr.consumers]) for gr in g.groups]


def consumer(g, gid, weight):
    return next(c for c in g.groups[gid].consumers if c.weight == weight)


def frozen_map(g):
    return {f.reason: (f.count, f.layers) for f in g.frozen}


class Head(nn.Module):
    """conv1(3→4) → relu → <body> → conv2(4→2): the shape most rule tests use."""

    def __init__(self, body=None, c_mid=4, c_out=2):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.body = body if body is not None else nn.Identity()
        self.c2 = nn.Conv2d(c_mid, c_out, 1)

    def forward(self, x):
        return self.c2(self.body(torch.relu(self.c1(x))))


def chain_expect(g, passthrough=None):
    # c1's 4 outputs are the only free variables; c2's 2 outputs are the graph output.
    assert summary(g) == [(4, ["c1.weight"], ["c2.weight"])]
    assert consumer(g, 0, "c2.weight").in_vars == [0, 1, 2, 3]
    assert g.groups[0].producers[0].out_vars == [0, 1, 2, 3]
    assert g.num_free == 4 and g.num_frozen == 2
    assert frozen_map(g) == {"graph output": (2, ["c2.weight"])}
    assert g.barriers == []
    if passthrough:
        assert passthrough in g.groups[0].passthrough


# -- skips ---------------------------------------------------------------------------------

class LearnedSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.sc = nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        z = torch.relu(self.c2(torch.relu(self.c1(h))) + self.sc(h))
        return self.head(z)


def test_learned_skip():
    # c0 (4, read by c1 and sc) | c1 (4, read by c2) | c2 ∪ sc (6, read by head): 14 free.
    x = inp()
    g = analyse(build(LearnedSkip), x)
    assert summary(g) == [(4, ["c0.weight"], ["c1.weight", "sc.weight"]),
                          (4, ["c1.weight"], ["c2.weight"]),
                          (6, ["c2.weight", "sc.weight"], ["head.weight"])]
    assert g.num_free == 14
    assert "learned-skip" in g.groups[2].tags
    assert g.groups[2].producers[0].out_vars == g.groups[2].producers[1].out_vars == list(range(6))


class IdentitySkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        return self.head(torch.relu(self.c2(torch.relu(self.c1(h))) + h))


def test_identity_skip():
    # The stream: c0 ∪ c2 (4, read by c1 and head); inside the block c1 (5, read by c2): 9 free.
    x = inp()
    g = analyse(build(IdentitySkip), x)
    assert summary(g) == [(4, ["c0.weight", "c2.weight"], ["c1.weight", "head.weight"]),
                          (5, ["c1.weight"], ["c2.weight"])]
    assert "identity-skip" in g.groups[0].tags and "learned-skip" not in g.groups[0].tags
    assert g.num_free == 9


class Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.a(x) - self.b(x)))


def test_sub_unions_like_add():
    # a - b is linear in both: channel c of a and of b share one factor; 4 free.
    x = inp()
    g = analyse(build(Sub), x)
    assert summary(g) == [(4, ["a.weight", "b.weight"], ["head.weight"])]


# -- concat, split, slicing -----------------------------------------------------------------

class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_concat_then_conv():
    # cat does not union: a (2) and b (3) stay separate groups, each reading its own columns of c.
    x = inp()
    g = analyse(build(Cat), x)
    assert summary(g) == [(2, ["a.weight"], ["c.weight"]), (3, ["b.weight"], ["c.weight"])]
    assert consumer(g, 0, "c.weight").in_vars == [0, 1, NO_VAR, NO_VAR, NO_VAR]
    assert consumer(g, 1, "c.weight").in_vars == [NO_VAR, NO_VAR, 0, 1, 2]
    for gr in g.groups:  # both joined groups pass through the concat
        assert "concat" in gr.tags and "cat" in gr.passthrough


class Split(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.relu(self.c(x))
        if self.how == "torch.split":
            p, q = torch.split(y, [2, 4], dim=1)
        elif self.how == "method.split":
            p, q = y.split([2, 4], 1)
        elif self.how == "slice":
            p, q = y[:, :2], y[:, 2:]
        elif self.how == "chunk":
            u, v, w = y.chunk(3, dim=1)
            p, q = u, torch.cat([v, w], 1)
        elif self.how == "torch.chunk":
            u, v, w = torch.chunk(y, 3, 1)
            p, q = u, torch.cat([v, w], dim=1)
        return self.a(p) + self.b(q)


@pytest.mark.parametrize("how", ["torch.split", "method.split", "slice", "chunk", "torch.chunk"])
def test_split_chunk_slice(how):
    # c's 6 channels are one group; a reads channels 0-1, b reads 2-5; a ∪ b is the output.
    x = inp()
    g = analyse(build(Split, how), x)
    assert summary(g) == [(6, ["c.weight"], ["a.weight", "b.weight"])]
    assert consumer(g, 0, "a.weight").in_vars == [0, 1]
    assert consumer(g, 0, "b.weight").in_vars == [2, 3, 4, 5]
    assert frozen_map(g) == {"graph output": (3, ["a.weight", "b.weight"])}


class SliceReorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.c(x))
        return self.a(torch.cat([y[:, 4:], y[:, 1:3]], 1))


def test_slice_and_reorder():
    # a reads channels 4, 5, 1, 2 in that order; channels 0 and 3 are read by nobody but stay free.
    x = inp()
    g = analyse(build(SliceReorder), x)
    assert summary(g) == [(6, ["c.weight"], ["a.weight"])]
    assert consumer(g, 0, "a.weight").in_vars == [4, 5, 1, 2]


# -- flatten → linear ------------------------------------------------------------------------

class Flat(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.c(x)), 2)  # 4 × 3 × 3
        if self.how == "torch.flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], -1)
        elif self.how == "nn.Flatten":
            y = self.flat(y)
        elif self.how == "method.flatten":
            y = y.flatten(1)
        elif self.how == "reshape-literal":
            y = y.reshape(-1, 36)
        return self.fc(y)


@pytest.mark.parametrize("how", ["torch.flatten", "view", "reshape", "nn.Flatten", "method.flatten",
                                 "reshape-literal"])
def test_flatten_linear(how):
    # After a 2×2 max-pool the map is 4×3×3: fc's 36 columns read channel c at columns 9c..9c+8.
    x = inp()
    g = analyse(build(Flat, how), x)
    assert summary(g) == [(4, ["c.weight"], ["fc.weight"])]
    assert consumer(g, 0, "fc.weight").in_vars == [c for c in range(4) for _ in range(9)]
    assert "maxpool" in g.groups[0].tags
    assert frozen_map(g) == {"graph output": (5, ["fc.weight"])}


# -- grouped and depthwise convs -------------------------------------------------------------

class Grouped(nn.Module):
    def __init__(self, groups, c_mid):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.g = nn.Conv2d(4, c_mid, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(c_mid, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.g(torch.relu(self.c1(x)))))


def test_grouped_conv():
    # groups=2, 4 → 6: output rows 0-2 read inputs 0-1, rows 3-5 read inputs 2-3. c1 (4) + g (6) = 10 free.
    x = inp()
    g = analyse(build(Grouped, 2, 6), x)
    assert summary(g) == [(4, ["c1.weight"], ["g.weight"]), (6, ["g.weight"], ["c3.weight"])]
    c = consumer(g, 0, "g.weight")
    assert c.conv_groups == 2 and c.in_vars == [0, 1, 2, 3]
    idx = in_channel_index("conv", (6, 2), 2)
    assert idx.tolist() == [[0, 1]] * 3 + [[2, 3]] * 3
    assert "depthwise" not in g.groups[1].tags


def test_depthwise_conv():
    # groups = C_in = 4, 4 → 8 (multiplier 2): row o reads input o // 2. 4 + 8 = 12 free.
    x = inp()
    g = analyse(build(Grouped, 4, 8), x)
    assert summary(g) == [(4, ["c1.weight"], ["g.weight"]), (8, ["g.weight"], ["c3.weight"])]
    assert consumer(g, 0, "g.weight").conv_groups == 4
    assert in_channel_index("conv", (8, 1), 4)[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "depthwise" in g.groups[1].tags


# -- shared weights ---------------------------------------------------------------------------

class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.s = nn.Conv2d(4, 5, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        u = self.s(torch.relu(self.a(x)))
        v = self.s(torch.relu(self.b(x)))
        return self.head(torch.relu(u) * 0.5 + torch.relu(v))


def test_module_called_twice():
    # s's columns read a's and b's outputs, so a ∪ b share one factor per channel (4);
    # s is one producer with one set of rows (5). 9 free.
    x = inp()
    g = analyse(build(Shared), x)
    assert summary(g) == [(4, ["a.weight", "b.weight"], ["s.weight"]), (5, ["s.weight"], ["head.weight"])]
    assert g.groups[0].producers[0].out_vars == g.groups[0].producers[1].out_vars == [0, 1, 2, 3]


class SharedFunctional(nn.Module):
    def __init__(self, same_bias):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b1 = nn.Parameter(torch.randn(4))
        self.b2 = self.b1 if same_bias else nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.w, self.b1)) + torch.relu(F.linear(2 * x, self.w, self.b2)))


def test_shared_functional_weight_bias():
    x = inp(3, 3)
    # same bias: one producer with 4 free rows.
    g = analyse(build(SharedFunctional, True), x)
    assert summary(g) == [(4, ["w"], ["head.weight"])]
    # different biases: scaling w's rows would need both biases scaled; the rows are frozen.
    g = analyse(build(SharedFunctional, False), x)
    assert g.groups == []
    assert any("shared by layers with different biases" in f.reason and f.count == 4 for f in g.frozen)


class TiedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(5, 4))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(F.linear(torch.relu(self.c(x)), self.w))
        return self.head(h) + self.w.sum(0)[:2]


def test_weight_also_read_as_tensor():
    # w is a layer weight and a plain tensor: neither its rows nor its columns may move,
    # so c's outputs (w's columns) are frozen, and w's own outputs are never a producer.
    x = inp(3, 3)
    g = analyse(build(TiedWeight), x)
    assert g.groups == []
    assert any("weight w is also used outside layer" in f.reason and f.layers == ["c.weight"] and f.count == 4
               for f in g.frozen)


# -- SE gate ----------------------------------------------------------------------------------

class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Conv2d(4, 2, 1)
        self.fc2 = nn.Conv2d(2, 4, 1)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.c2(y * gate)


def test_se_gate():
    # c1 (4, read by fc1 and c2) stays free: fc1's columns absorb the factor, so the gate is unchanged.
    # fc1 (2, read by fc2) free; fc2's 4 outputs feed sigmoid: frozen. 6 free.
    x = inp()
    g = analyse(build(SE), x)
    assert summary(g) == [(4, ["c1.weight"], ["fc1.weight", "c2.weight"]), (2, ["fc1.weight"], ["fc2.weight"])]
    assert any(n.startswith("mul") for n in g.groups[0].passthrough)
    assert [(b.op, b.node) for b in g.barriers] == [("sigmoid", "sigmoid")]
    assert frozen_map(g)["input of sigmoid at node 'sigmoid' (not positively homogeneous)"] == (4, ["fc2.weight"])


# -- positively homogeneous pass-through ops --------------------------------------------------

class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


class PReLUFn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.full((4,), 0.2))

    def forward(self, y):
        return F.prelu(y, self.a)


PASSTHROUGH = {
    "nn.LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "F.leaky_relu": lambda: Fn(lambda y: F.leaky_relu(y, 0.2)),
    "nn.PReLU": lambda: nn.PReLU(4),
    "F.prelu": PReLUFn,
    "nn.MaxPool2d": lambda: nn.MaxPool2d(2),
    "F.max_pool2d": lambda: Fn(lambda y: F.max_pool2d(y, 3, stride=1, padding=1)),
    "nn.AvgPool2d": lambda: nn.AvgPool2d(2),
    "F.avg_pool2d": lambda: Fn(lambda y: F.avg_pool2d(y, 3, stride=2, padding=1)),
    "nn.AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d((2, 3)),
    "nn.AdaptiveMaxPool2d": lambda: nn.AdaptiveMaxPool2d(1),
    "F.pad": lambda: Fn(lambda y: F.pad(y, (1, 2, 0, 1))),
    "F.pad-value-0": lambda: Fn(lambda y: F.pad(y, (1, 1, 1, 1), value=0.0)),
    "nn.ZeroPad2d": lambda: nn.ZeroPad2d(2),
    "nn.ReflectionPad2d": lambda: nn.ReflectionPad2d(1),
    "nn.Upsample-nearest": lambda: nn.Upsample(scale_factor=2, mode="nearest"),
    "nn.Upsample-bilinear": lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    "F.interpolate-bilinear": lambda: Fn(lambda y: F.interpolate(y, scale_factor=1.5, mode="bilinear")),
    "F.interpolate-size": lambda: Fn(lambda y: F.interpolate(y, size=(y.shape[2] * 2, y.shape[3]))),
    "nn.Dropout": lambda: nn.Dropout(0.5),
    "nn.Dropout2d": lambda: nn.Dropout2d(0.5),
    "nn.Identity": nn.Identity,
    "scalar*": lambda: Fn(lambda y: y * 2.5),
    "*scalar": lambda: Fn(lambda y: 0.5 * y),
    "/scalar": lambda: Fn(lambda y: y / 4),
    "method.mul": lambda: Fn(lambda y: y.mul(3.0)),
    "+0": lambda: Fn(lambda y: y + 0),
    "neg": lambda: Fn(lambda y: torch.relu(-y)),
    "mean-spatial": lambda: Fn(lambda y: y.mean((2, 3), keepdim=True)),
}


@pytest.mark.parametrize("name", sorted(PASSTHROUGH))
def test_passthrough(name):
    # conv1's 4 channels go through the op unchanged: 4 free, read by conv2.
    x = inp()
    g = analyse(build(Head, PASSTHROUGH[name]()), x)
    chain_expect(g)


def test_pooling_tags():
    x = inp()
    assert "maxpool" in analyse(build(Head, nn.MaxPool2d(2)), x).groups[0].tags
    assert "maxpool" not in analyse(build(Head, nn.AvgPool2d(2)), x).groups[0].tags


# -- freezing: constants and non-zero padding --------------------------------------------------

def node_of(g, target):
    """Name of the one node of the analysed graph calling ``target``."""
    names = [n.name for n in g.source.graph.nodes if n.target is target]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.parametrize("fn,op,reason", [
    (lambda y: y + 1.0, operator.add, "added to the constant 1.0 at node '{}'"),
    (lambda y: 2 - y, operator.sub, "added to the constant 2 at node '{}'"),
    (lambda y: y + torch.ones(1, 4, 1, 1, dtype=y.dtype), operator.add, "added to a fixed tensor at node '{}'"),
])
def test_add_constant_freezes(fn, op, reason):
    x = inp()
    g = analyse(build(Head, Fn(fn)), x)
    assert g.groups == []
    reason = reason.format(node_of(g, op))
    assert frozen_map(g) == {reason: (4, ["c1.weight"]), "graph output": (2, ["c2.weight"])}


@pytest.mark.parametrize("body,node,value", [
    (lambda: Fn(lambda y: F.pad(y, (1, 1, 1, 1), value=1.0)), "pad", 1.0),
    (lambda: nn.ConstantPad2d(1, 0.5), "body", 0.5),
])
def test_nonzero_pad_is_barrier(body, node, value):
    x = inp()
    g = analyse(build(Head, body()), x)
    assert g.groups == []
    reason = f"padding with the non-zero constant {value}"
    assert [(b.node, b.reason) for b in g.barriers] == [(node, reason)]
    assert frozen_map(g)[next(r for r in frozen_map(g) if f"at node '{node}'" in r)] == (4, ["c1.weight"])


# -- BatchNorm ---------------------------------------------------------------------------------

def _randomise_bn(model):
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


class BNAfterReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(torch.relu(self.c1(x)))))


def test_bn_not_after_conv_is_channel_affine():
    # bn becomes a diagonal layer: consumer of c1's 4 channels and producer of 4 new ones. 8 free.
    x = inp()
    model = _randomise_bn(build(BNAfterReLU))
    g = analyse(model, x)
    assert summary(g) == [(4, ["c1.weight"], ["bn.weight"]), (4, ["bn.weight"], ["c2.weight"])]
    assert g.groups[1].producers[0].kind == "affine" and g.groups[1].producers[0].bias == "bn.bias"
    assert consumer(g, 0, "bn.weight").kind == "affine"
    ref = outputs(model, [x])
    assert rel_error(ref, outputs(g.module, [x]))[0] < 1e-12


class ConvBN(nn.Module):
    def __init__(self, share):
        super().__init__()
        self.share = share
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 2, 1)
        self.c3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        out = self.c2(torch.relu(self.bn(y)))
        return out + self.c3(torch.relu(y)) if self.share else out


def test_bn_folds_into_conv_without_bias():
    # The fold creates c1.bias; one group of 4 (c1 → c2).
    x = inp()
    model = _randomise_bn(build(ConvBN, False))
    g = analyse(model, x)
    assert summary(g) == [(4, ["c1.weight"], ["c2.weight"])]
    assert g.groups[0].producers[0].bias == "c1.bias"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.module.modules())
    assert rel_error(outputs(model, [x]), outputs(g.module, [x]))[0] < 1e-12
    assert model.c1.bias is None  # the caller's model is untouched


def test_bn_folds_into_copy_when_conv_output_is_shared():
    # c1's raw output also feeds c3, so bn folds into a copy c1__bn: two producers with separate
    # variables, c1 (4, read by c3) and c1__bn (4, read by c2); c2 ∪ c3 is the frozen output.
    x = inp()
    model = _randomise_bn(build(ConvBN, True))
    g = analyse(model, x)
    assert summary(g) == [(4, ["c1.weight"], ["c3.weight"]), (4, ["c1__bn.weight"], ["c2.weight"])]
    assert rel_error(outputs(model, [x]), outputs(g.module, [x]))[0] < 1e-12
    assert frozen_map(g) == {"graph output": (2, ["c2.weight", "c3.weight"])}


def test_train_mode_bn_is_barrier():
    x = inp()
    g = analyse(build(ConvBN, False), x, train=True)
    assert [b.node for b in g.barriers] == ["bn"]
    assert g.groups == []


# -- barriers ----------------------------------------------------------------------------------

class Mat(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, y):
        if self.how == "matmul":
            return y @ y.transpose(2, 3)
        return torch.bmm(y.flatten(0, 1), y.flatten(0, 1)).view(y.shape)


BARRIERS = [
    # (name, body, barrier node, op name)
    ("nn.GELU", lambda: nn.GELU(), "body", "GELU"),
    ("F.gelu", lambda: Fn(F.gelu), "gelu", "gelu"),
    ("nn.SiLU", lambda: nn.SiLU(), "body", "SiLU"),
    ("F.silu", lambda: Fn(F.silu), "silu", "silu"),
    ("torch.sigmoid", lambda: Fn(torch.sigmoid), "sigmoid", "sigmoid"),
    ("method.sigmoid", lambda: Fn(lambda y: y.sigmoid()), "sigmoid", ".sigmoid"),
    ("nn.Tanh", lambda: nn.Tanh(), "body", "Tanh"),
    ("torch.tanh", lambda: Fn(torch.tanh), "tanh", "tanh"),
    ("nn.ReLU6", lambda: nn.ReLU6(), "body", "ReLU6"),
    ("F.relu6", lambda: Fn(F.relu6), "relu6", "relu6"),
    ("nn.Hardtanh", lambda: nn.Hardtanh(), "body", "Hardtanh"),
    ("nn.Hardswish", lambda: nn.Hardswish(), "body", "Hardswish"),
    ("nn.ELU", lambda: nn.ELU(), "body", "ELU"),
    ("F.elu", lambda: Fn(F.elu), "elu", "elu"),
    ("nn.Softmax", lambda: nn.Softmax(dim=1), "body", "Softmax"),
    ("F.softmax", lambda: Fn(lambda y: F.softmax(y, dim=1)), "softmax", "softmax"),
    ("nn.LayerNorm", lambda: nn.LayerNorm([4, 6, 6]), "body", "LayerNorm"),
    ("nn.GroupNorm", lambda: nn.GroupNorm(2, 4), "body", "GroupNorm"),
    ("torch.exp", lambda: Fn(torch.exp), "exp", "exp"),
    ("pow", lambda: Fn(lambda y: y ** 2), "pow_1", "pow"),
    ("torch.pow", lambda: Fn(lambda y: torch.pow(y, 3)), "pow_1", "pow"),
    ("mean-channels", lambda: Fn(lambda y: y.mean(1, keepdim=True).expand(-1, 4, -1, -1)), "mean", ".mean"),
    ("sum-channels", lambda: Fn(lambda y: torch.sum(y, 1, keepdim=True).repeat(1, 4, 1, 1)), "sum_1", "sum"),
    ("matmul", lambda: Mat("matmul"), "matmul", "matmul"),
    ("bmm", lambda: Mat("bmm"), "bmm", "bmm"),
    ("y*y", lambda: Fn(lambda y: y * y), operator.mul, "mul"),
    ("unknown-op", lambda: Fn(torch.erf), "erf", "torch.erf"),
    ("custom-function", lambda: CustomGate(), "_custom_gate", "_custom_gate"),
]


class CustomGate(nn.Module):
    def forward(self, y):
        return _custom_gate(y)  # wrapped: one opaque call_function node


@pytest.mark.parametrize("name,body,node,op", BARRIERS, ids=[b[0] for b in BARRIERS])
def test_barrier(name, body, node, op):
    # conv1's 4 channels feed the barrier: frozen with the barrier named; nothing is free.
    x = inp()
    g = analyse(build(Head, body()), x)
    assert g.groups == [] and g.num_free == 0
    if not isinstance(node, str):  # normalised spellings get a fresh node name
        node = node_of(g, node)
    hits = [b for b in g.barriers if b.node == node]
    assert len(hits) == 1, g.barriers
    assert hits[0].op.endswith(op), hits[0]
    reasons = [f for f in g.frozen if f"at node '{node}'" in f.reason]
    assert len(reasons) == 1 and reasons[0].count == 4 and reasons[0].layers == ["c1.weight"], g.frozen
    assert reasons[0].reason.startswith("input of ")
    assert g.num_frozen == 4 + 2


def test_opaque_leaf_module_is_barrier():
    # A submodule kept opaque hides what it computes: its input is frozen, never passed through.
    class Custom(nn.Module):
        def forward(self, y):
            return torch.relu(y)

    x = inp()
    g = analyse(build(Head, Custom()), x, leaf_modules=["body"])
    assert [(b.node, b.module, b.reason) for b in g.barriers] == \
        [("body", "body", "opaque leaf: kept opaque by leaf_modules")]
    assert g.groups == [] and g.opaque == g.barriers
    assert frozen_map(g)["input of Custom at node 'body' (opaque leaf: kept opaque by leaf_modules)"] == \
        (4, ["c1.weight"])


# -- negative controls -------------------------------------------------------------------------

def test_uncompensated_producer_row_changes_output():
    x = inp()
    g = analyse(build(IdentitySkip), x)
    m = copy.deepcopy(g.module).double()
    ref = outputs(m, [x])
    with torch.no_grad():
        p = g.groups[1].producers[0]
        m.get_parameter(p.weight)[0].mul_(3.0)
        m.get_parameter(p.bias)[0].mul_(3.0)
    assert rel_error(ref, outputs(m, [x]))[0] > 1e-3


def test_soundness_check_can_fail():
    x = inp()
    g = find_groups(build(IdentitySkip), x)
    g.groups[0].consumers = g.groups[0].consumers[:1]  # forget the head's columns
    assert not check_soundness(g, x, seed=1).ok


@pytest.mark.parametrize("body", [lambda: nn.GELU(), lambda: Fn(lambda y: y + 1.0)])
def test_scaling_a_frozen_channel_changes_output(body):
    # Treat a frozen c1 channel as if it were free: rows × 3, c2's columns ÷ 3.
    x = inp()
    g = analyse(build(Head, body()), x)
    assert g.groups == []
    m = copy.deepcopy(g.module).double()
    ref = outputs(m, [x])
    with torch.no_grad():
        m.c1.weight[1].mul_(3.0)
        m.c1.bias[1].mul_(3.0)
        m.c2.weight[:, 1].div_(3.0)
    assert rel_error(ref, outputs(m, [x]))[0] > 1e-3


def test_graph_output_is_frozen():
    # Scaling an output channel changes the output itself.
    x = inp()
    g = analyse(build(Head), x)
    chain_expect(g)
    m = copy.deepcopy(g.module).double()
    ref = outputs(m, [x])
    with torch.no_grad():
        m.c2.weight[0].mul_(2.0)
        m.c2.bias[0].mul_(2.0)
    assert rel_error(ref, outputs(m, [x]))[0] > 0.5


def test_identity_module_on_the_skip_is_still_an_identity_skip():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
            self.shortcut, self.f = nn.Identity(), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.f(torch.relu(self.c(h) + self.shortcut(h)).mean((2, 3)))

    g = find_groups(Block(), torch.randn(1, 3, 8, 8))
    assert [grp.tags for grp in g.groups] == [["conv", "identity-skip"]]
