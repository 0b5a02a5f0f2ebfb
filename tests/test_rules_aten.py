"""The ATen entries of the rule table (passes/rules_aten.py), through the export front end.

As tests/test_mutation.py does for the torch-level keys: a probe model (conv → relu → OP →
consumer) is exported, the exported graph must contain the case's ATen ops, the first conv's
channels must stay free and pass the soundness check; then the OP is replaced by a
non-homogeneous lookalike, which must freeze them. A meta-test asserts that every ATen key of
the table has a case. Layers and BatchNorms that stay functional have tests of their own below.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
from passes import rules, rules_aten
from passes.soundness import check_soundness
from util import C, free_of_a
from util import analyse as probe


def analyse(op, dims):
    return probe(op, dims, frontend="export")


def exported_ops(groups) -> set[str]:
    return {str(n.target) for n in groups.source.graph.nodes if n.op == "call_function"}


Fn = lambda f: f  # noqa: E731 - marks a plain function case for readability

# (ATen keys covered, the op, its non-homogeneous lookalike, dims)
CASES = [
    ({"aten.relu.default"}, Fn(lambda h: torch.relu(h)), Fn(lambda h: F.relu6(h)), 2),
    ({"aten.leaky_relu.default"}, Fn(lambda h: F.leaky_relu(h, 0.1)), Fn(lambda h: F.elu(h)), 2),
    ({"aten.prelu.default"}, nn.PReLU(C), nn.SiLU(), 2),
    ({"aten.clone.default"}, Fn(lambda h: h.clone()), Fn(lambda h: h.exp()), 2),
    ({"aten.alias.default"}, Fn(lambda h: h.detach()), Fn(lambda h: h.sigmoid()), 2),
    ({"aten.clamp.default"}, Fn(lambda h: h.clamp(min=0)), Fn(lambda h: h.clamp(min=0, max=6)), 2),
    # pooling: the lookalikes pool a non-homogeneous function of the input
    ({"aten.max_pool1d.default"}, nn.MaxPool1d(2), Fn(lambda h: F.lp_pool1d(h, 2, 2)), 1),
    ({"aten.max_pool2d.default"}, nn.MaxPool2d(2), Fn(lambda h: F.lp_pool2d(h, 2, 2)), 2),
    ({"aten.max_pool3d.default"}, nn.MaxPool3d(2), Fn(lambda h: F.lp_pool3d(h, 2, 2)), 3),
    ({"aten.max_pool2d_with_indices.default"}, Fn(lambda h: F.max_pool2d(h, 2, return_indices=True)[0]),
     Fn(lambda h: F.max_pool2d(h.exp(), 2, return_indices=True)[0]), 2),
    ({"aten.adaptive_max_pool2d.default", "aten.unsqueeze.default", "aten.squeeze.dims"}, nn.AdaptiveMaxPool1d(2),
     Fn(lambda h: F.adaptive_avg_pool1d(h.tanh(), 2)), 1),
    ({"aten.adaptive_max_pool2d.default"}, nn.AdaptiveMaxPool2d(2), Fn(lambda h: F.adaptive_avg_pool2d(h.tanh(), 2)),
     2),
    ({"aten.adaptive_max_pool3d.default"}, nn.AdaptiveMaxPool3d(2), Fn(lambda h: F.adaptive_avg_pool3d(h.tanh(), 2)),
     3),
    ({"aten.avg_pool2d.default", "aten.unsqueeze.default", "aten.squeeze.dims"}, nn.AvgPool1d(2),
     Fn(lambda h: F.avg_pool1d(h * h, 2)), 1),
    ({"aten.avg_pool2d.default"}, nn.AvgPool2d(2), Fn(lambda h: F.avg_pool2d(h * h, 2)), 2),
    ({"aten.avg_pool3d.default"}, nn.AvgPool3d(2), Fn(lambda h: F.avg_pool3d(h - 1, 2)), 3),
    ({"aten.adaptive_avg_pool1d.default"}, nn.AdaptiveAvgPool1d(2), Fn(lambda h: F.adaptive_avg_pool1d(h + 1, 2)), 1),
    ({"aten.adaptive_avg_pool2d.default"}, nn.AdaptiveAvgPool2d(1), nn.GroupNorm(2, C), 2),
    ({"aten.adaptive_avg_pool3d.default"}, nn.AdaptiveAvgPool3d(1), nn.GroupNorm(1, C), 3),
    ({"aten.upsample_nearest1d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0)),
     Fn(lambda h: F.interpolate(h.exp(), scale_factor=2.0)), 1),
    ({"aten.upsample_nearest2d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0)),
     Fn(lambda h: F.interpolate(h, scale_factor=2.0, mode="bicubic")), 2),
    ({"aten.upsample_nearest3d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0)),
     Fn(lambda h: F.interpolate(h.tanh(), scale_factor=2.0)), 3),
    ({"aten.upsample_linear1d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0, mode="linear")),
     Fn(lambda h: F.interpolate(h + 1, scale_factor=2.0, mode="linear")), 1),
    ({"aten.upsample_bilinear2d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0, mode="bilinear")),
     Fn(lambda h: F.grid_sample(h, torch.zeros(2, 4, 4, 2, dtype=h.dtype), align_corners=False)), 2),
    ({"aten.upsample_trilinear3d.vec"}, Fn(lambda h: F.interpolate(h, scale_factor=2.0, mode="trilinear")),
     Fn(lambda h: F.interpolate(h.sigmoid(), scale_factor=2.0, mode="trilinear")), 3),
    # padding: zeros and copies of the border pass, a non-zero constant does not
    ({"aten.constant_pad_nd.default"}, Fn(lambda h: F.pad(h, (1, 1, 1, 1))),
     Fn(lambda h: F.pad(h, (1, 1, 1, 1), value=1.0)), 2),
    ({"aten.reflection_pad1d.default"}, nn.ReflectionPad1d(1), nn.ConstantPad1d(1, 1.0), 1),
    ({"aten.reflection_pad2d.default"}, nn.ReflectionPad2d(1), nn.ConstantPad2d(1, 1.0), 2),
    ({"aten.reflection_pad3d.default"}, nn.ReflectionPad3d(1), nn.ConstantPad3d(1, 1.0), 3),
    ({"aten.replication_pad1d.default"}, nn.ReplicationPad1d(1), nn.ConstantPad1d(1, -2.0), 1),
    ({"aten.replication_pad2d.default"}, nn.ReplicationPad2d(1), nn.ConstantPad2d(1, -2.0), 2),
    ({"aten.replication_pad3d.default"}, nn.ReplicationPad3d(1), nn.ConstantPad3d(1, -2.0), 3),
    ({"aten._pad_circular.default"}, nn.CircularPad2d(1), nn.ConstantPad2d(1, 0.1), 2),
    # arithmetic
    ({"aten.add.Tensor"}, Fn(lambda h: h + h), Fn(lambda h: h + 1.0), 2),
    ({"aten.sub.Tensor", "aten.mul.Tensor"}, Fn(lambda h: h - 0.5 * h), Fn(lambda h: h - 1.0), 2),
    ({"aten.mul.Tensor"}, Fn(lambda h: h * 3.0), Fn(lambda h: h * h), 2),
    ({"aten.div.Tensor"}, Fn(lambda h: h / 3.0), Fn(lambda h: 3.0 / (h + 1)), 2),
    ({"aten.neg.default"}, Fn(lambda h: -h), Fn(lambda h: torch.reciprocal(h + 1)), 2),
    # concatenation and splitting
    ({"aten.cat.default"}, Fn(lambda h: torch.cat([h, h], 1)), Fn(lambda h: torch.cat([h, h.exp()], 1)), 2),
    ({"aten.split_with_sizes.default"}, Fn(lambda h: torch.split(h, 2, 1)[1]), Fn(lambda h: torch.topk(h, 2, 1)[0]),
     2),
    # moving elements around
    ({"aten.view.default"}, Fn(lambda h: h.view(2, C, 64)), Fn(lambda h: h.view(2, C, 64).softmax(1)), 2),
    ({"aten.permute.default"}, Fn(lambda h: h.transpose(1, 3)), Fn(lambda h: h.transpose(1, 3).tanh()), 2),
    ({"aten.squeeze.dims", "aten.slice.Tensor"}, Fn(lambda h: h[:, :, :1].squeeze(2)), Fn(lambda h: h.max(2)[0]), 2),
    ({"aten.unsqueeze.default"}, Fn(lambda h: h.unsqueeze(1)), Fn(lambda h: h.unsqueeze(1).exp()), 2),
    ({"aten.expand.default"}, Fn(lambda h: h[:, :, :1].expand(2, C, 3, 8)), Fn(lambda h: h.cumsum(1)), 2),
    ({"aten.flip.default"}, Fn(lambda h: h.flip(1)), Fn(lambda h: h.sort(1)[0]), 2),
    ({"aten.slice.Tensor"}, Fn(lambda h: h[:, :, 1:7]), Fn(lambda h: h[:, :, 1:7].sqrt()), 2),
    ({"aten.select.int"}, Fn(lambda h: h[:, :, 0]), Fn(lambda h: h[:, :, 0].log1p()), 2),
    ({"aten.repeat.default"}, Fn(lambda h: h.repeat(1, 2, 1, 1)), Fn(lambda h: h.repeat(1, 2, 1, 1).sigmoid()), 2),
    # a floating cast keeps the value, an integer one rounds
    ({"aten._to_copy.default"}, Fn(lambda h: h.float().double()), Fn(lambda h: h.to(torch.int64).double()), 2),
    # reductions: over spatial dims they pass, over channels they mix slots
    ({"aten.mean.dim"}, Fn(lambda h: h.mean((2, 3))), Fn(lambda h: h.mean(1)), 2),
    ({"aten.sum.dim_IntList"}, Fn(lambda h: h.sum((2, 3))), Fn(lambda h: h.sum(1)), 2),
    ({"aten.amax.default"}, Fn(lambda h: h.amax((2, 3))), Fn(lambda h: h.amax(1)), 2),
]


def _case_id(case) -> str:
    return "+".join(sorted(k.replace("aten.", "") for k in case[0]))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_aten_rule_and_its_mutant(case):
    keys, op, mutant, dims = case
    groups, x = analyse(op, dims)
    assert keys <= exported_ops(groups), exported_ops(groups)
    assert free_of_a(groups) == C, groups
    tol = 1e-6 if "aten._to_copy.default" in keys else 1e-10  # the float32 round trip rounds
    assert check_soundness(groups, x, tol=tol).ok
    assert not [b for b in groups.barriers if str(b.op) in keys], groups.barriers
    mutated, _ = analyse(mutant, dims)
    assert free_of_a(mutated) == 0, f"lookalike of {keys} left channels free:\n{mutated}"
    assert mutated.frozen and any("a.weight" in f.layers for f in mutated.frozen)


def test_every_aten_entry_has_a_case():
    special = {rules_aten.aten_layer, rules_aten.batch_norm}  # tested below
    table = {str(k) for k, fn in rules.RULES.items() if isinstance(k, torch._ops.OpOverload) and fn not in special}
    covered = set().union(*(keys for keys, *_ in CASES))
    assert not table - covered, f"ATen rules without a case: {sorted(table - covered)}"


# -- layers and BatchNorms that stay functional -------------------------------------------------

class Tied(nn.Module):
    """One conv weight used by two calls: the export graph reads it twice, so it stays aten.convolution."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.t = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.relu(self.t(torch.relu(self.t(h)))))


def test_a_weight_used_twice_stays_functional_and_shares_its_variables():
    torch.manual_seed(0)
    model, x = Tied().double(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = pathfx.find_groups(model, x, frontend="export")
    assert "aten.convolution.default" in exported_ops(g)
    # the two calls' inputs are unioned: a's channels and t's are one group, in both front ends
    assert g.num_free == pathfx.find_groups(model, x).num_free == 4
    assert [sorted(p.weight for p in gr.producers) for gr in g.groups] == [["a.weight", "t.weight"]]
    assert check_soundness(g, x, reinit=True).ok


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.up, self.b = nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 3, 2, 2), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.up(torch.relu(self.a(x)))))


def test_transposed_convolution_is_a_barrier():
    torch.manual_seed(0)
    g = pathfx.find_groups(Transposed().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64), frontend="export")
    assert [(b.op, b.reason) for b in g.barriers] == [("aten.convolution.default", "transposed convolution")]
    assert g.num_free == 0
    assert [f.layers for f in g.frozen if "transposed convolution" in f.reason] == [["a.weight"]]


class StandardisedConv(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the conv's weight is computed in forward."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SharedNorm(nn.Module):
    """A BatchNorm whose weight the forward also reads: it stays aten._native_batch_norm_legit_no_training."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        self.std = StandardisedConv(4, 4, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        return self.b(torch.relu(self.std(h))) * self.bn.weight.sum()


def test_functional_layers_that_cannot_move_are_barriers():
    torch.manual_seed(0)
    model = SharedNorm().double().eval()
    g = pathfx.find_groups(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), frontend="export")
    reasons = {b.op: b.reason for b in g.barriers}
    assert reasons["aten._native_batch_norm_legit_no_training.default"].startswith("BatchNorm whose tensors")
    assert reasons["aten.convolution.default"] == "layer whose weight is computed, not a parameter"
    assert not any(p.weight in ("a.weight", "std.weight") for gr in g.groups for p in gr.producers)
