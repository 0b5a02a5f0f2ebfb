"""Mutation check of the rule table.

Every pass-through rule is exercised by a probe model (conv → relu → OP → consumer) in
which the first conv's channels must stay free, and the OP is then replaced by a
non-homogeneous lookalike, which must freeze them. A meta-test asserts that every key of
every pass-through rule in ``passes.rules.RULES`` is exercised, so a rule added to the
table without a case here fails the suite.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes import rules
from fuzz_models import BNActReLU, FrozenBN
from passes.soundness import check_soundness
from util import C, analyse, free_of_a
from zoo.timm import timm

timm_layers = timm().layers
BatchNormAct2d = timm_layers.BatchNormAct2d

Fn = lambda f: f  # noqa: E731 - marks a plain function case for readability

# (keys covered, the op, its non-homogeneous lookalike, dims)
CASES = [
    ({torch.relu}, Fn(lambda h: torch.relu(h)), nn.ReLU6(), 2),
    ({F.leaky_relu}, Fn(lambda h: F.leaky_relu(h, 0.1)), Fn(lambda h: F.elu(h)), 2),
    ({F.prelu, torch.prelu}, Fn(lambda h: F.prelu(h, torch.full((1,), 0.2, dtype=h.dtype))),
     Fn(lambda h: F.hardtanh(h)), 2),
    ({torch.prelu}, Fn(lambda h: torch.prelu(h, torch.full((1,), 0.2, dtype=h.dtype))), nn.Hardswish(), 2),
    ({nn.LeakyReLU}, nn.LeakyReLU(0.2), nn.ELU(), 2),
    ({nn.PReLU}, nn.PReLU(C), nn.SiLU(), 2),
    ({F.dropout, nn.Dropout}, Fn(lambda h: F.dropout(h, 0.3, training=False)), nn.AlphaDropout(0.3), 2),
    ({nn.Dropout}, nn.Dropout(0.3), nn.GELU(), 2),
    ({F.dropout1d, nn.Dropout1d}, Fn(lambda h: F.dropout1d(h, 0.3, training=False)), nn.Tanh(), 1),
    ({nn.Dropout1d}, nn.Dropout1d(0.3), nn.Sigmoid(), 1),
    ({F.dropout2d, nn.Dropout2d}, Fn(lambda h: F.dropout2d(h, 0.3, training=False)), nn.Softplus(), 2),
    ({nn.Dropout2d}, nn.Dropout2d(0.3), nn.Mish(), 2),
    ({F.dropout3d, nn.Dropout3d}, Fn(lambda h: F.dropout3d(h, 0.3, training=False)), nn.SELU(), 3),
    ({nn.Dropout3d}, nn.Dropout3d(0.3), nn.CELU(), 3),
    ({nn.Identity}, nn.Identity(), nn.Hardsigmoid(), 2),
    ({torch.clone, "method:clone"}, Fn(lambda h: torch.clone(h)), Fn(lambda h: torch.exp(h)), 2),
    ({"method:clone"}, Fn(lambda h: h.clone()), Fn(lambda h: h.exp()), 2),
    ({"method:contiguous"}, Fn(lambda h: h.contiguous()), Fn(lambda h: h.sqrt()), 2),
    # pooling: a soft (log-sum-exp) pool looks like max-pool and is not homogeneous
    ({nn.MaxPool1d}, nn.MaxPool1d(2), Fn(lambda h: torch.logsumexp(h.unfold(2, 2, 2), -1)), 1),
    ({nn.MaxPool2d}, nn.MaxPool2d(2), Fn(lambda h: F.avg_pool2d(h.exp(), 2)), 2),
    ({nn.MaxPool3d}, nn.MaxPool3d(2), Fn(lambda h: F.avg_pool3d(h.exp(), 2)), 3),
    ({nn.AdaptiveMaxPool1d}, nn.AdaptiveMaxPool1d(2), Fn(lambda h: F.adaptive_avg_pool1d(h.tanh(), 2)), 1),
    ({nn.AdaptiveMaxPool2d}, nn.AdaptiveMaxPool2d(2), Fn(lambda h: F.adaptive_avg_pool2d(h.tanh(), 2)), 2),
    ({nn.AdaptiveMaxPool3d}, nn.AdaptiveMaxPool3d(2), Fn(lambda h: F.adaptive_avg_pool3d(h.tanh(), 2)), 3),
    ({F.max_pool1d, torch.max_pool1d}, Fn(lambda h: F.max_pool1d(h, 2)), Fn(lambda h: F.lp_pool1d(h, 2, 2)), 1),
    ({torch.max_pool1d}, Fn(lambda h: torch.max_pool1d(h, 2)), Fn(lambda h: F.lp_pool1d(h, 2, 2)), 1),
    ({F.max_pool2d}, Fn(lambda h: F.max_pool2d(h, 2)), Fn(lambda h: F.lp_pool2d(h, 2, 2)), 2),
    ({torch.max_pool2d}, Fn(lambda h: torch.max_pool2d(h, 2)), Fn(lambda h: F.lp_pool2d(h, 2, 2)), 2),
    ({F.max_pool3d}, Fn(lambda h: F.max_pool3d(h, 2)), Fn(lambda h: F.lp_pool3d(h, 2, 2)), 3),
    ({torch.max_pool3d}, Fn(lambda h: torch.max_pool3d(h, 2)), Fn(lambda h: F.lp_pool3d(h, 2, 2)), 3),
    ({F.adaptive_max_pool1d}, Fn(lambda h: F.adaptive_max_pool1d(h, 2)), Fn(lambda h: F.softmax(h, 2)), 1),
    ({F.adaptive_max_pool2d}, Fn(lambda h: F.adaptive_max_pool2d(h, 2)), Fn(lambda h: F.softmax(h, 2)), 2),
    ({F.adaptive_max_pool3d}, Fn(lambda h: F.adaptive_max_pool3d(h, 2)), Fn(lambda h: F.softmax(h, 2)), 3),
    ({nn.AvgPool1d}, nn.AvgPool1d(2), Fn(lambda h: F.avg_pool1d(h * h, 2)), 1),
    ({nn.AvgPool2d}, nn.AvgPool2d(2), Fn(lambda h: F.avg_pool2d(h * h, 2)), 2),
    ({nn.AvgPool3d}, nn.AvgPool3d(2), Fn(lambda h: F.avg_pool3d(h * h, 2)), 3),
    ({nn.AdaptiveAvgPool1d}, nn.AdaptiveAvgPool1d(1), nn.LayerNorm(8), 1),
    ({nn.AdaptiveAvgPool2d}, nn.AdaptiveAvgPool2d(1), nn.GroupNorm(2, C), 2),
    ({nn.AdaptiveAvgPool3d}, nn.AdaptiveAvgPool3d(1), nn.GroupNorm(1, C), 3),
    ({F.avg_pool1d, torch.avg_pool1d}, Fn(lambda h: F.avg_pool1d(h, 2)), Fn(lambda h: F.avg_pool1d(h.pow(2), 2)), 1),
    ({torch.avg_pool1d}, Fn(lambda h: torch.avg_pool1d(h, 2)), Fn(lambda h: torch.avg_pool1d(h + 1, 2)), 1),
    ({F.avg_pool2d}, Fn(lambda h: F.avg_pool2d(h, 2)), Fn(lambda h: F.avg_pool2d(h - 1, 2)), 2),
    ({F.avg_pool3d}, Fn(lambda h: F.avg_pool3d(h, 2)), Fn(lambda h: F.avg_pool3d(h + 0.5, 2)), 3),
    ({F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d}, Fn(lambda h: F.adaptive_avg_pool1d(h, 1)),
     Fn(lambda h: F.adaptive_avg_pool1d(h.sigmoid(), 1)), 1),
    ({torch.adaptive_avg_pool1d}, Fn(lambda h: torch.adaptive_avg_pool1d(h, 1)),
     Fn(lambda h: torch.adaptive_avg_pool1d(h.sigmoid(), 1)), 1),
    ({F.adaptive_avg_pool2d}, Fn(lambda h: F.adaptive_avg_pool2d(h, 1)), Fn(lambda h: h.mean(1, keepdim=True)), 2),
    ({F.adaptive_avg_pool3d}, Fn(lambda h: F.adaptive_avg_pool3d(h, 1)), Fn(lambda h: h.sum(1, keepdim=True)), 3),
    # upsampling: all linear modes pass; grid_sample (data-placed sampling) is not in the table
    ({F.interpolate}, Fn(lambda h: F.interpolate(h, scale_factor=2.0, mode="bilinear")),
     Fn(lambda h: F.grid_sample(h, torch.zeros(2, 4, 4, 2, dtype=h.dtype), align_corners=False)), 2),
    ({nn.Upsample}, nn.Upsample(scale_factor=2, mode="nearest"), Fn(lambda h: F.interpolate(h.exp(), scale_factor=2.0)),
     2),
    ({nn.UpsamplingNearest2d}, nn.UpsamplingNearest2d(scale_factor=2), nn.Softmax2d(), 2),
    ({nn.UpsamplingBilinear2d}, nn.UpsamplingBilinear2d(scale_factor=2), nn.LocalResponseNorm(2), 2),
    # padding: zeros (and copies of the border) pass, a non-zero constant does not
    ({F.pad}, Fn(lambda h: F.pad(h, (1, 1, 1, 1))), Fn(lambda h: F.pad(h, (1, 1, 1, 1), value=1.0)), 2),
    ({nn.ZeroPad1d}, nn.ZeroPad1d(1), nn.ConstantPad1d(1, 0.5), 1),
    ({nn.ZeroPad2d}, nn.ZeroPad2d(1), nn.ConstantPad2d(1, 0.5), 2),
    ({nn.ZeroPad3d}, nn.ZeroPad3d(1), nn.ConstantPad3d(1, 0.5), 3),
    ({nn.ConstantPad1d}, nn.ConstantPad1d(1, 0.0), nn.ConstantPad1d(1, -2.0), 1),
    ({nn.ConstantPad2d}, nn.ConstantPad2d(1, 0.0), nn.ConstantPad2d(1, -2.0), 2),
    ({nn.ConstantPad3d}, nn.ConstantPad3d(1, 0.0), nn.ConstantPad3d(1, -2.0), 3),
    ({nn.ReflectionPad1d}, nn.ReflectionPad1d(1), nn.ConstantPad1d(1, 1.0), 1),
    ({nn.ReflectionPad2d}, nn.ReflectionPad2d(1), nn.ConstantPad2d(1, 1.0), 2),
    ({nn.ReflectionPad3d}, nn.ReflectionPad3d(1), nn.ConstantPad3d(1, 1.0), 3),
    ({nn.ReplicationPad1d}, nn.ReplicationPad1d(1), nn.ConstantPad1d(1, 3.0), 1),
    ({nn.ReplicationPad2d}, nn.ReplicationPad2d(1), nn.ConstantPad2d(1, 3.0), 2),
    ({nn.ReplicationPad3d}, nn.ReplicationPad3d(1), nn.ConstantPad3d(1, 3.0), 3),
    ({nn.CircularPad1d}, nn.CircularPad1d(1), nn.ConstantPad1d(1, 0.1), 1),
    ({nn.CircularPad2d}, nn.CircularPad2d(1), nn.ConstantPad2d(1, 0.1), 2),
    ({nn.CircularPad3d}, nn.CircularPad3d(1), nn.ConstantPad3d(1, 0.1), 3),
    # arithmetic
    ({"operator.add"}, Fn(lambda h: h + h), Fn(lambda h: h + 1.0), 2),
    ({"operator.sub"}, Fn(lambda h: h - 0.0 * h), Fn(lambda h: h - 1.0), 2),
    ({"operator.mul"}, Fn(lambda h: h * 3.0), Fn(lambda h: h * h), 2),
    ({"operator.truediv"}, Fn(lambda h: h / 3.0), Fn(lambda h: 3.0 / (h + 1)), 2),
    ({torch.div}, Fn(lambda h: torch.div(h, 3.0)), Fn(lambda h: torch.div(h, h + 1)), 2),
    ({"method:div"}, Fn(lambda h: h.div(3.0)), Fn(lambda h: h.div(h + 1)), 2),
    ({"operator.neg", torch.neg}, Fn(lambda h: -h), Fn(lambda h: torch.reciprocal(h + 1)), 2),
    ({torch.neg}, Fn(lambda h: torch.neg(h)), Fn(lambda h: torch.rsqrt(h + 1)), 2),
    ({"method:neg"}, Fn(lambda h: h.neg()), Fn(lambda h: h.log1p()), 2),
    # concatenation and splitting; channel-wise sorting / top-k look alike but are data dependent
    ({torch.cat}, Fn(lambda h: torch.cat([h, h], 1)), Fn(lambda h: torch.cat([h, torch.ones_like(h)], 1)), 2),
    ({torch.concat}, Fn(lambda h: torch.concat([h, h], 1)), Fn(lambda h: torch.concat([h, h + 1], 1)), 2),
    ({torch.concatenate}, Fn(lambda h: torch.concatenate([h, h], 1)),
     Fn(lambda h: torch.concatenate([h, h.exp()], 1)), 2),
    ({torch.split}, Fn(lambda h: torch.split(h, 2, 1)[0]), Fn(lambda h: torch.topk(h, 2, 1)[0]), 2),
    ({torch.chunk}, Fn(lambda h: torch.chunk(h, 2, 1)[1]), Fn(lambda h: torch.sort(h, 1)[0]), 2),
    ({torch.tensor_split}, Fn(lambda h: torch.tensor_split(h, 2, 1)[0]), Fn(lambda h: torch.topk(h, 3, 1)[0]), 2),
    ({"method:split"}, Fn(lambda h: h.split(2, 1)[1]), Fn(lambda h: h.topk(2, 1)[0]), 2),
    ({"method:chunk"}, Fn(lambda h: h.chunk(2, 1)[0]), Fn(lambda h: h.sort(1)[0]), 2),
    ({"method:tensor_split"}, Fn(lambda h: h.tensor_split(2, 1)[1]), Fn(lambda h: h.sort(1, descending=True)[0]), 2),
    # moving elements around
    ({torch.flatten}, Fn(lambda h: torch.flatten(h, 2)), Fn(lambda h: torch.sort(h.flatten(2), 1)[0]), 2),
    ({torch.reshape}, Fn(lambda h: torch.reshape(h, (2, C, 64))), Fn(lambda h: torch.cumsum(h, 1)), 2),
    ({torch.permute}, Fn(lambda h: torch.permute(h, (0, 2, 3, 1))), Fn(lambda h: torch.cummax(h, 1)[0]), 2),
    ({torch.transpose}, Fn(lambda h: torch.transpose(h, 1, 3)), Fn(lambda h: torch.softmax(h, 1)), 2),
    ({torch.squeeze}, Fn(lambda h: torch.squeeze(h[:, :, :1], 2)), Fn(lambda h: torch.logsumexp(h, 2)), 2),
    ({torch.unsqueeze}, Fn(lambda h: torch.unsqueeze(h, 2)), Fn(lambda h: torch.unsqueeze(h.exp(), 2)), 2),
    ({torch.flip}, Fn(lambda h: torch.flip(h, (1,))), Fn(lambda h: torch.sort(h, 1)[0]), 2),
    ({torch.roll}, Fn(lambda h: torch.roll(h, 1, 1)), Fn(lambda h: torch.cumsum(h.exp(), 1)), 2),
    ({torch.narrow}, Fn(lambda h: torch.narrow(h, 1, 1, 2)), Fn(lambda h: torch.topk(h, 2, 1)[0]), 2),
    ({torch.movedim}, Fn(lambda h: torch.movedim(h, 1, -1)), Fn(lambda h: torch.movedim(h.tanh(), 1, -1)), 2),
    ({torch.swapaxes}, Fn(lambda h: torch.swapaxes(h, 1, 2)), Fn(lambda h: torch.swapaxes(h.sigmoid(), 1, 2)), 2),
    ({torch.t}, Fn(lambda h: torch.t(torch.t(h[:, :, 0, 0]))), Fn(lambda h: torch.t(torch.t(h[:, :, 0, 0]).exp())), 2),
    ({nn.Flatten}, nn.Flatten(2), Fn(lambda h: nn.functional.normalize(h.flatten(2), dim=1)), 2),
    ({nn.Unflatten}, nn.Unflatten(2, (2, 4)), Fn(lambda h: F.layer_norm(h, (8,))), 2),
    ({"operator.getitem"}, Fn(lambda h: h[:, 1:3]), Fn(lambda h: h[:, h[0, :, 0, 0].argsort()]), 2),
    ({"method:view"}, Fn(lambda h: h.view(2, C, 64)), Fn(lambda h: h.view(2, C, 64).softmax(1)), 2),
    ({"method:reshape"}, Fn(lambda h: h.reshape(2, C * 64)), Fn(lambda h: h.reshape(2, C * 64).exp()), 2),
    ({"method:flatten"}, Fn(lambda h: h.flatten(1)), Fn(lambda h: h.flatten(1).sigmoid()), 2),
    ({"method:permute"}, Fn(lambda h: h.permute(0, 2, 3, 1)), Fn(lambda h: h.permute(0, 2, 3, 1).tanh()), 2),
    ({"method:transpose"}, Fn(lambda h: h.transpose(1, 2)), Fn(lambda h: h.transpose(1, 2).exp()), 2),
    ({"method:squeeze"}, Fn(lambda h: h[:, :, :1].squeeze(2)), Fn(lambda h: h.max(2)[0]), 2),
    ({"method:unsqueeze"}, Fn(lambda h: h.unsqueeze(1)), Fn(lambda h: h.unsqueeze(1).sigmoid()), 2),
    ({"method:expand"}, Fn(lambda h: h[:, :, :1].expand(2, C, 3, 8)), Fn(lambda h: h.cumprod(1)), 2),
    ({"method:repeat"}, Fn(lambda h: h.repeat(1, 2, 1, 1)), Fn(lambda h: h.repeat(1, 2, 1, 1).exp()), 2),
    ({"method:flip"}, Fn(lambda h: h.flip(1)), Fn(lambda h: h.sort(1)[0]), 2),
    ({"method:roll"}, Fn(lambda h: h.roll(1, 1)), Fn(lambda h: h.cumsum(1)), 2),
    ({"method:narrow"}, Fn(lambda h: h.narrow(1, 0, 2)), Fn(lambda h: h.topk(2, 1)[0]), 2),
    ({"method:unflatten"}, Fn(lambda h: h.unflatten(1, (2, 2))), Fn(lambda h: h.unflatten(1, (2, 2)).softmax(2)), 2),
    ({"method:movedim"}, Fn(lambda h: h.movedim(1, 3)), Fn(lambda h: h.movedim(1, 3).exp()), 2),
    ({"method:swapaxes"}, Fn(lambda h: h.swapaxes(1, 3)), Fn(lambda h: h.swapaxes(1, 3).tanh()), 2),
    ({"method:t"}, Fn(lambda h: h[:, :, 0, 0].t().t()), Fn(lambda h: h[:, :, 0, 0].t().exp().t()), 2),
    # casts: a floating cast keeps the value, an integer one rounds
    ({"method:to"}, Fn(lambda h: h.to(torch.float64)), Fn(lambda h: h.to(torch.int64)), 2),
    ({"method:float"}, Fn(lambda h: h.float()), Fn(lambda h: h.int()), 2),
    ({"method:double"}, Fn(lambda h: h.double()), Fn(lambda h: h.long()), 2),
    ({"method:half"}, Fn(lambda h: h.half()), Fn(lambda h: h.short()), 2),
    ({"method:bfloat16"}, Fn(lambda h: h.bfloat16()), Fn(lambda h: h.char()), 2),
    ({"method:type_as"}, Fn(lambda h: h.type_as(h)), Fn(lambda h: h.type_as(torch.zeros(1, dtype=torch.int32))), 2),
    # reductions: over spatial dims they pass, over channels they mix slots
    ({torch.mean}, Fn(lambda h: torch.mean(h, (2, 3))), Fn(lambda h: torch.mean(h, 1)), 2),
    ({torch.sum}, Fn(lambda h: torch.sum(h, (2, 3), keepdim=True)), Fn(lambda h: torch.sum(h, 1)), 2),
    ({torch.amax}, Fn(lambda h: torch.amax(h, (2, 3))), Fn(lambda h: torch.amax(h, 1)), 2),
    ({"method:mean"}, Fn(lambda h: h.mean((2, 3))), Fn(lambda h: h.mean(1)), 2),
    ({"method:sum"}, Fn(lambda h: h.sum(3)), Fn(lambda h: h.sum(1)), 2),
    ({"method:amax"}, Fn(lambda h: h.amax(3)), Fn(lambda h: h.amax(1)), 2),
    # an eval-mode functional BatchNorm becomes a BatchNorm module (an affine here, after a ReLU); one
    # that normalises by the batch's statistics does not
    ({F.batch_norm}, BNActReLU(C), BNActReLU(C, track_running_stats=False), 2),
]

# timm's blocks, traced through into the ops above: (name, block, its non-homogeneous lookalike, dims)
TIMM_CASES = [
    ("BatchNormAct2d", lambda: BatchNormAct2d(C), lambda: BatchNormAct2d(C, track_running_stats=False), 2),
    ("DropPath", lambda: timm_layers.DropPath(0.3), lambda: timm_layers.Swish(), 2),
    ("Dropout-eval", lambda: nn.Dropout(0.3), lambda: timm_layers.HardSwish(), 2),
    ("timm-PReLU", lambda: timm_layers.PReLU(C), lambda: timm_layers.GELUTanh(), 2),
    ("SEModule", lambda: timm_layers.SEModule(C, rd_channels=2), lambda: timm_layers.EcaModule(C, kernel_size=3), 2),
    ("SqueezeExcite", lambda: timm_layers.SqueezeExcite(C, rd_ratio=0.5),
     lambda: timm_layers.CecaModule(C, kernel_size=3), 2),
    ("BlurPool2d", lambda: timm_layers.BlurPool2d(C, filt_size=3, stride=1), lambda: FixedMix(), 2),
    ("FrozenBatchNorm2d", lambda: FrozenBN(C), lambda: timm_layers.GroupNorm1(C), 2),
]


class FixedMix(nn.Module):
    """A blur-like fixed filter, but one that mixes channels: not a channel-wise map."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filt", torch.full((C, C, 3, 3), 1 / (9 * C)))

    def forward(self, h):
        return F.conv2d(h, self.filt.to(h.dtype), padding=1)


def _name(key) -> str:
    return key if isinstance(key, str) else f"{getattr(key, '__module__', '')}.{key.__name__}"


def _case_id(case) -> str:
    return "+".join(sorted(_name(k).split(".")[-1] for k in case[0]))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_rule_and_its_mutant(case):
    keys, op, mutant, dims = case
    groups, x = analyse(op, dims)
    assert free_of_a(groups) == C, groups
    # a cast to a narrower float rounds: exact only to that format's precision
    tol = 1e-2 if keys & {"method:half", "method:bfloat16", "method:float"} else 1e-10
    assert check_soundness(groups, x, tol=tol).ok
    mutated, _ = analyse(mutant, dims)
    assert free_of_a(mutated) == 0, f"lookalike of {keys} left channels free:\n{mutated}"
    assert mutated.frozen and any("a.weight" in f.layers for f in mutated.frozen)


@pytest.mark.parametrize("case", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_block_and_its_mutant(case):
    _, block, mutant, dims = case
    groups, x = analyse(block(), dims)
    assert free_of_a(groups) == C, groups
    assert check_soundness(groups, x, reinit=True).ok
    mutated, _ = analyse(mutant(), dims)
    assert free_of_a(mutated) == 0, f"lookalike of {case[0]} left channels free:\n{mutated}"


def _passthrough_keys():
    skip = {rules.layer}  # layers are producers/consumers, covered in test_rules
    # ATen overloads have their cases in test_rules_aten, through the export front end
    return {_name(k) if not isinstance(k, str) else k for k, fn in rules.RULES.items()
            if fn not in skip and not isinstance(k, torch._ops.OpOverload)}


def test_every_passthrough_rule_has_a_mutation_case():
    import operator

    covered = set()
    for keys, *_ in CASES:
        for k in keys:
            if isinstance(k, str) and k.startswith("operator."):
                k = getattr(operator, k.split(".")[1])
            covered.add(k if isinstance(k, str) else _name(k))
    # stochastic_depth lives in torchvision: checked in test_rules with a real block
    missing = _passthrough_keys() - covered - {"torchvision.ops.stochastic_depth.stochastic_depth"}
    assert not missing, f"pass-through rules without a mutation case: {sorted(missing)}"
