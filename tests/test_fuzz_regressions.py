"""Shrunk examples of bugs the fuzzing (tests/test_fuzz.py) found, as plain tests."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import pathfx
from fuzz_models import FuzzNet
from passes.errors import PathfxError
from passes.pathnorm import path_norm
from passes.groupset import apply_factors
from passes.soundness import outputs, random_factors, rel_error
from pathfx.analysis import prepare

D = torch.float64


def test_two_batchnorms_after_a_layer_fold_as_layer_and_affine():
    # fold_bn folded the second BN into the layer's original module, dropping the first BN:
    # the analysed module, and so the balanced and path models, computed another function.
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                  specs=["nn.Conv2d(1, 2, 3)", "nn.Conv2d(2, 2, 3)", "nn.BatchNorm2d(2)", "nn.BatchNorm2d(2)"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("mod", 2, 1), ("mod", 3, 2), ("mod", 4, 3)])
    x = net.example()
    assert rel_error(outputs(net, [x]), outputs(prepare(net, x), [x]))[0] <= 1e-12
    for mode in ("balance", "path"):
        assert pathfx.transform(net, x, mode=mode).verification.ok


def test_a_network_whose_output_reads_only_padding_has_path_norm_zero():
    # the property assumed a positive path-norm; here the last strided 1×1 conv reads only the
    # padding the conv before it added, so no path reaches the output and the output is 0
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                  specs=["nn.Conv2d(1, 1, 3, 1, 0, 2, 1, False, 'zeros')",
                         "nn.Conv2d(1, 1, 1, 2, 1, 1, 1, False, 'zeros')",
                         "nn.Conv2d(1, 1, 1, 2, 0, 1, 1, False, 'zeros')"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("mod", 2, 1), ("mod", 3, 2)])
    x = net.example()
    assert path_norm(net, (1, 1, 6, 6)) == 0.0
    assert torch.equal(net(x), torch.zeros(2, 1, 1, 1, dtype=D))
    for mode in ("balance", "path"):
        r = pathfx.transform(net, x, mode=mode)
        assert r.verification.ok and r.verification.insensitive
        assert path_norm(r.model, (1, 1, 6, 6)) == 0.0


class _Signs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4, bias=False), nn.Linear(3, 4, bias=False)
        self.c, self.d = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(-1.5 * h)) + self.d(-(h - torch.relu(self.b(x))))


def test_path_norm_counts_negated_and_scaled_edges_by_their_absolute_value():
    # The |w| network kept signs: relu(-1.5·h) dropped every path through it, and h - g subtracted
    # g's paths; a model with a negative scalar factor came out with path-norm ≤ 0.
    torch.manual_seed(0)
    m = _Signs().double()
    a, b, c, d = (layer.weight.detach().abs() for layer in (m.a, m.b, m.c, m.d))
    ones = torch.ones(3, dtype=D)
    expect = (1.5 * c @ a @ ones + d @ (a @ ones + b @ ones)).sum()
    assert path_norm(m, (1, 3)) == pytest.approx(float(expect), rel=1e-14)
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False, specs=["nn.Conv2d(1, 2, 3)", "nn.Linear(32, 3)"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("scale", 2, -1.5), ("fn", 3, "flatten"),
                        ("mod", 4, 1)])
    assert path_norm(net, (1, 1, 6, 6)) > 0


def test_path_norm_takes_leaky_relu_as_a_module_as_it_takes_the_function():
    # nn.LeakyReLU was refused as "not part of a ReLU network" while F.leaky_relu was accepted.
    def net(act, specs=()):
        return FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                       specs=["nn.Conv2d(1, 2, 3)", "nn.Linear(32, 3)", *specs],
                       plan=[("mod", 0, 0), act, ("fn", 2, "flatten"), ("mod", 3, 1)])

    nets = net(("mod", 1, 2), ["nn.LeakyReLU(0.2)"]), net(("mod", 1, 2), ["nn.ReLU()"]), net(("fn", 1, "leaky"))
    norms = [path_norm(m, (1, 1, 6, 6)) for m in nets]
    assert norms[0] > 0 and norms[0] == norms[1] == norms[2], norms


def test_path_norm_counts_amax_as_the_global_max_pooling_it_is():
    # torch.amax over the spatial dims is adaptive max pooling to 1×1, which path_norm counts as a
    # sum over the window; amax itself was kept as a max, giving the same function another path-norm.
    def net(step, extra=()):
        return FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                       specs=["nn.Conv2d(1, 2, 3)", "nn.Linear(2, 3)", *extra],
                       plan=[("mod", 0, 0), ("fn", 1, "relu"), step, ("fn", 3, "flatten"), ("mod", 4, 1)])

    amax, pool = net(("fn", 2, "amax")), net(("mod", 2, 2), ["nn.AdaptiveMaxPool2d(1)"])
    x = amax.example()
    assert torch.equal(amax(x), pool(x))
    assert path_norm(amax, (1, 1, 6, 6)) == pytest.approx(path_norm(pool, (1, 1, 6, 6)), rel=1e-14)


def test_path_form_keeps_the_path_norm_with_two_batchnorms_after_a_layer():
    # The original folds the first BN into the conv and keeps the second as an affine; folding the
    # path form back (passes.fold) folded the second BN into the P-BN's conv as well: same function,
    # but other bias paths, so the path-norm changed under the transform.
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                  specs=["nn.Conv2d(1, 2, 3)", "nn.Conv2d(2, 2, 3)", "nn.BatchNorm2d(2)", "nn.BatchNorm2d(2)",
                         "nn.Linear(8, 3)"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("mod", 2, 1), ("mod", 3, 2), ("mod", 4, 3),
                        ("fn", 5, "flatten"), ("mod", 6, 4)])
    result = pathfx.transform(net, net.example(), mode="path")
    assert result.report.pbn_layers
    before, after = path_norm(net, (1, 1, 6, 6)), path_norm(result.model, (1, 1, 6, 6))
    assert after == pytest.approx(before, rel=1e-12)


def test_a_graph_onnxruntime_cannot_load_is_a_pathfx_error(tmp_path):
    # The torchscript exporter writes this split as sizes (2, 2) of a 3-channel input; onnx.checker
    # passes it and onnxruntime's session failed with its own exception, not a PathfxError.
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False, specs=["nn.Conv2d(1, 3, 1)"],
                  plan=[("mod", 0, 0), ("pad", 1, 1, "constant"), ("slice", 2, 0, 3), ("split", 3, 2, 0)])
    path = tmp_path / "split.onnx"
    with pytest.raises(PathfxError, match="onnxruntime cannot load"):
        pathfx.export_onnx(net.float(), path, net.example(dtype=torch.float32), exporter="torchscript")
    assert os.listdir(tmp_path) == []


def test_enorm_converges_when_channels_never_reach_the_output():
    # Stream channels 0 and 1 feed only the first block of the grouped conv, which writes back into
    # them, and are sliced away: the output does not depend on them. Each has L > 0 and R > 0, but
    # Σ|w|^2 has no minimum along them (scaling both down together lowers it without end): they
    # must be found dead as a set (passes/enorm_reach.py), else ENorm never converges.
    net = FuzzNet(in_shape=(1, 6, 6), seed=0, training=False,
                  specs=["nn.Conv2d(1, 4, 3, padding=1)", "nn.Conv2d(4, 4, 1, groups=2)", "nn.Linear(2, 3)"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("mod", 2, 1), ("add", 2, 3), ("slice", 4, 2, 4),
                        ("fn", 5, "gap"), ("fn", 6, "flatten"), ("mod", 7, 2)])
    balanced, report = pathfx.enorm(net, net.example(), tol=1e-12, max_cycles=3000)
    assert report.converged, (report.cycles, report.objective[-3:])
    assert [(d.group, d.variables) for d in report.dead] == [(0, [0, 1])]
    assert pathfx.verify(net, balanced, net.example()).ok
    # the dead channels keep their weights; the live ones reach the same point from another start
    g = pathfx.find_groups(net, net.example())
    factors = random_factors(g, 3)
    factors[0][[0, 1]] = 1.0
    start = copy.deepcopy(g.source)
    apply_factors(start, g, factors)
    again, _ = pathfx.enorm(start, net.example(), tol=1e-12, max_cycles=3000)
    for (name, a), b in zip(balanced.named_parameters(), again.parameters()):
        assert (a - b).abs().max() <= 1e-8 * a.abs().max(), name


def test_inplace_add_through_an_identity_alias():
    # nn.Identity returns its input itself: `x += identity(x)` doubles the tensor both names refer
    # to, and the later read through the identity sees the doubled value. The traced graph read
    # the old one (balanced outputs off by a factor 2).
    net = FuzzNet(in_shape=(2, 6, 6), seed=0, training=False,
                  specs=["nn.Conv2d(2, 2, 3, 1, 0, 1, 2, False, 'zeros')",
                         "nn.Conv2d(2, 1, 1, 1, 0, 1, 1, False, 'zeros')", "nn.Identity()"],
                  plan=[("mod", 0, 0), ("fn", 1, "relu"), ("mod", 2, 1), ("mod", 3, 2), ("iadd", 3, 4),
                        ("fn", 5, "relu"), ("fn", 4, "relu")])
    x = net.example()
    balanced, _ = pathfx.enorm(net, x, cycles=3)
    assert pathfx.verify(net, balanced, x).ok
