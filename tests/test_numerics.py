"""Numerics: half-precision models, extreme weight ranges, dead channels, non-finite weights, CUDA.

The passes compute in float64 and hand the result back in the model's dtype. A result must
either be right (verified in float64; within a dtype-sized error in its own dtype) or be a
clear error: never a silently wrong model.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import pathfx
import zoo
from passes.errors import NonFiniteError, PathfxError
from passes.groupset import apply_factors
from passes.soundness import check_soundness
from pathfx.optim import ENorm
from util import lively

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# A transformed half-precision model rounds its own weights once more and then computes in that
# dtype, so its outputs differ from the original's (in the same dtype) by a few roundings.
# Measured, relative to max |output|: float16 ≤ 1.6e-3 (1.6 eps), bfloat16 ≤ 1.4e-2 (1.8 eps).
BOUND = {dt: 4 * e for dt, e in EPS.items()}


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn_stats():
    return lively(small_cnn()).eval()


def resnet18():
    torch.manual_seed(0)
    return lively(zoo.build("resnet18")).eval()


HALF_MODELS = {"cnn": (cnn_stats, (4, 3, 8, 8)), "resnet18": (resnet18, (1, 3, 32, 32))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (inf when a is not finite)."""
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max())


def run(model, x, mode):
    if mode == "enorm":
        return pathfx.enorm(model, x)[0]
    return pathfx.transform(model, x, mode=mode).model


# Red weights ±1 push path values down the depth (on the small CNN |V| reaches 3e-10, below
# float16's smallest subnormal 6e-8): a float16 path form keeps in weight space the groups where
# its values would leave float16's range (passes.reparam.solve), and says so.
@pytest.mark.parametrize("mode", ["balance", "path", "enorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_half_precision_comes_back_in_its_dtype(name, dtype, mode):
    build, shape = HALF_MODELS[name]
    model = build().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref = model(x)
        exact = build().double()(x.double())
    if (dtype, mode) == (torch.float16, "path"):
        r = pathfx.transform(model, x, mode="path")
        assert any("leave float16's range" in reason for reason in r.report.weight_space), r.report.weight_space
    out = run(model, x, mode).eval()
    floats = [t for t in list(out.parameters()) + list(out.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == dtype for t in floats)
    with torch.no_grad():
        y = out(x)
    assert y.dtype == dtype
    err, own = rel(y, ref), rel(ref, exact)
    print(f"\n{name} {str(dtype)[6:]} {mode}: rel. error vs the original in {str(dtype)[6:]} {err:.2e} "
          f"(bound {BOUND[dtype]:.2e}); vs float64 {rel(y, exact):.2e}, original vs float64 {own:.2e}")
    assert err <= BOUND[dtype]
    assert rel(y, exact) <= own + 2 * EPS[dtype]  # as accurate as the original, up to two more roundings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine is CPU-only)")
@pytest.mark.parametrize("mode", ["balance", "path"])
def test_cuda_model(mode):
    model = small_cnn().eval().cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    r = pathfx.transform(model, x, mode=mode)
    assert r.verification.ok
    assert all(p.device.type == "cuda" for p in model.parameters())  # the caller's model stays put
    out = r.model.eval()
    assert all(t.device.type == "cuda" for t in list(out.parameters()) + list(out.buffers()))
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert rel(out(x), model(x)) <= 1e-5  # float32; measured on CPU: 2.6e-7 (balance), 1.8e-7 (path)


# -- extreme weight ranges (float64) -------------------------------------------------------------

def plain_cnn():
    torch.manual_seed(0)  # no BN: the factors act on the layers themselves
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                         nn.Linear(32, 10)).double().eval()


def x64():
    return torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def rescaled(model, x, exponent, seed=0):
    """``model`` with a factor 10**U(-exponent, exponent) on every free variable: the same function."""
    groups = pathfx.find_groups(model, x)
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        apply_factors(out, groups, {g.id: 10.0 ** rng.uniform(-exponent, exponent, g.width) for g in groups.groups})
    return out


def spread(model) -> float:
    """log10 of the largest over the smallest non-zero |weight|."""
    w = torch.cat([p.detach().abs().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")])
    w = w[w > 0]
    return float(torch.log10(w.max() / w.min()))


def test_extreme_rescaling_is_found_and_undone():
    """Factors of 1e-30 … 1e30 per channel: groups, ENorm and both transforms still verify, and ENorm
    returns to the unique balanced point of the unscaled network (paper Thm 1)."""
    base, x = plain_cnn(), x64()
    model = rescaled(base, x, 30)
    assert spread(model) > 80 and spread(base) < 8
    assert pathfx.verify(base, model, x).max_rel <= 1e-12  # the rescaling kept the function

    g0, g1 = pathfx.find_groups(base, x), pathfx.find_groups(model, x)
    assert [g.width for g in g1.groups] == [g.width for g in g0.groups] and g1.num_free == g0.num_free == 56
    assert check_soundness(g1, x).max_rel_error <= 1e-10  # more random factors on top still keep the function

    balanced, report = pathfx.enorm(model, x, tol=0)
    reference, ref_report = pathfx.enorm(base, x, tol=0)
    assert report.converged and report.before > 1e50
    assert report.after == pytest.approx(ref_report.after, rel=1e-12)
    assert spread(balanced) < 8
    for (n, a), b in zip(balanced.named_parameters(), reference.parameters()):
        assert rel(a, b) <= 1e-6, n
    assert pathfx.verify(model, balanced, x).max_rel <= 1e-10

    r = pathfx.transform(model, x, mode="balance")
    assert r.verification.max_rel <= 1e-10 and spread(r.model) < 8
    # path values are invariant under rescaling: the path form of the rescaled net is the base's
    p0, p1 = pathfx.transform(base, x, mode="path"), pathfx.transform(model, x, mode="path")
    assert p1.verification.max_rel <= 1e-10
    for (n, a), b in zip(p1.model.named_parameters(), p0.model.parameters()):
        assert rel(a, b) <= 1e-9, n


def test_extreme_per_layer_scales_are_rebalanced():
    """Whole layers scaled by 1e30 / 1e-30 (a different function): everything verifies, ENorm evens the layers out."""
    model = plain_cnn()
    with torch.no_grad():
        for i, s in zip([0, 2, 6, 8], [1e30, 1e-30, 1e30, 1e-30]):
            model[i].weight.mul_(s)
            model[i].bias.mul_(s)
    x = x64()
    balanced, report = pathfx.enorm(model, x)
    norms = [float(p.detach().norm()) for n, p in balanced.named_parameters() if n.endswith("weight")]
    assert report.before > 1e60 and report.after < 100
    assert max(norms) / min(norms) < 1.01  # p = 2, c = 1: every layer ends with the same energy
    assert pathfx.verify(model, balanced, x).max_rel <= 1e-10
    for mode in ("balance", "path"):
        assert pathfx.transform(model, x, mode=mode).verification.max_rel <= 1e-10


def test_beyond_float64_energy_balances_in_the_log_domain():
    """Factors of 1e±100 give weights near 1e200: |w|^2 overflows float64, so ENorm continues in the
    log domain and reaches the balanced point of the unscaled network; the path form needs no
    energies and verifies too."""
    base, x = plain_cnn(), x64()
    model = rescaled(base, x, 100)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) and spread(model) > 250
    balanced, report = pathfx.enorm(model, x, tol=1e-12)
    reference, _ = pathfx.enorm(base, x, tol=1e-12)
    assert report.converged and report.objective[0] == float("inf") and report.log_objective[0] > 709
    assert spread(balanced) < 8
    for (n, a), b in zip(balanced.named_parameters(), reference.parameters()):
        assert rel(a, b) <= 1e-6, n
    assert pathfx.verify(model, balanced, x).max_rel <= 1e-10
    for mode in ("balance", "path"):
        assert pathfx.transform(model, x, mode=mode).verification.max_rel <= 1e-10


# -- dead channels ------------------------------------------------------------------------------

def pruned_cnn():
    model = plain_cnn()
    with torch.no_grad():
        model[0].weight[2].zero_()  # conv0 output channel 2 pruned (zero row and bias)
        model[0].bias[2] = 0
        model[2].weight[:, 5].zero_()  # conv0 channel 5 read by no one (zero column)
        model[6].weight[7].zero_()  # fc1 unit 7 pruned
        model[6].bias[7] = 0
        model[8].weight[:, 11].zero_()  # fc1 unit 11 unused
    return model


def test_dead_channels_are_skipped_and_reported():
    model, x = pruned_cnn(), x64()
    balanced, report = pathfx.enorm(model, x, tol=0)
    assert {(d.group, v) for d in report.dead for v in d.variables} == {(0, 2), (0, 5), (2, 7), (2, 11)}
    assert report.num_dead == 4
    assert pathfx.verify(model, balanced, x).max_rel <= 1e-10
    assert all(bool(torch.isfinite(p).all()) for p in balanced.parameters())
    w0, w2, w6, w8 = (balanced.get_parameter(f"{i}.weight") for i in (0, 2, 6, 8))
    assert not w0[2].any() and not w2[:, 5].any() and not w6[7].any() and not w8[:, 11].any()
    # every live variable is balanced: its incoming energy equals its outgoing energy (p = 2, c = 1)
    pairs = [(w0.square().sum((1, 2, 3)), w2.square().sum((0, 2, 3)), {2, 5}),
             (w6.square().sum(1), w8.square().sum(0), {7, 11})]
    for inc, out, dead in pairs:
        live = [i for i in range(len(inc)) if i not in dead]
        assert torch.allclose(inc[live], out[live], rtol=1e-6)
    for mode in ("balance", "path"):
        r = pathfx.transform(model, x, mode=mode)
        assert r.verification.max_rel <= 1e-10
        assert all(bool(torch.isfinite(p).all()) for p in r.model.parameters())
    assert pathfx.transform(model, x, mode="path").report.no_red == 2  # the two channels no one reads


# -- non-finite weights ------------------------------------------------------------------------

def bn_cnn():
    return small_cnn().eval()


ENTRY_POINTS = {
    "find_groups": lambda m, x, tmp: pathfx.find_groups(m, x),
    "find_groups(GraphModule)": lambda m, x, tmp: pathfx.find_groups(torch.fx.symbolic_trace(m), x),
    "enorm": lambda m, x, tmp: pathfx.enorm(m, x),
    "transform-balance": lambda m, x, tmp: pathfx.transform(m, x, mode="balance"),
    "transform-path": lambda m, x, tmp: pathfx.transform(m, x, mode="path"),
    "reparameterize": lambda m, x, tmp: pathfx.reparameterize(m, x),
    "export_onnx": lambda m, x, tmp: pathfx.export_onnx(m, tmp / "m.onnx", x),
    "optim.ENorm": lambda m, x, tmp: ENorm(m, torch.optim.SGD(m.parameters(), lr=0.1), x),
}


@pytest.mark.parametrize("where", ["3.weight", "1.weight", "7.bias"])  # a conv, a BatchNorm (folded), a bias
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_non_finite_weight_is_one_clear_error(entry, value, where, tmp_path):
    model = bn_cnn()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[1] = value
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(NonFiniteError, match=rf"parameter '{where}' holds {kind} \(1 of"):
        ENTRY_POINTS[entry](model, torch.randn(2, 3, 8, 8), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_non_finite_in_a_transformed_model_is_named():
    x = torch.randn(2, 3, 8, 8)
    path = pathfx.transform(bn_cnn(), x, mode="path").model
    with torch.no_grad():
        path.get_parameter("3.V").view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter '3\.V' holds NaN"):
        pathfx.export_onnx(path, "/nonexistent/never-written.onnx", x)
    with pytest.raises(NonFiniteError, match=r"parameter '3\.V' holds NaN"):
        pathfx.find_groups(path, x)


def test_weight_going_non_finite_during_training_is_named():
    model = bn_cnn().train()
    x = torch.randn(2, 3, 8, 8)
    hook = ENorm(model, torch.optim.SGD(model.parameters(), lr=0.1), x)
    with torch.no_grad():
        model[7].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameter '7\.weight' holds NaN or Inf"):
        hook.step()
