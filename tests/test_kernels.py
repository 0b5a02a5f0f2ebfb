"""The compiled loops of passes/kernels.c against plain torch, and ENorm with and without them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from passes import kernels
from pathfx.optim import ENorm

pytestmark = pytest.mark.skipif(kernels.lib() is None, reason="no C compiler on this machine: ATen paths only")

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 256, 3, 3), (7, 5, 3, 3), (64, 32, 2, 2), (16, 8, 5, 5), (3, 4, 1, 7)])
def test_energy_sums_the_taps(shape, dtype, threads):
    w = torch.randn(*shape, dtype=dtype)
    w[0, 0] = 0
    taps = shape[2] * shape[3]
    e = kernels.energy(w, taps)
    ref = w.reshape(-1, taps).square().sum(1)
    torch.testing.assert_close(e, ref, rtol=tol(dtype), atol=0)
    assert e[0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, blocks", [(512, 4608, 1), (12, 18, 3), (32, 9, 32), (300, 1000, 4), (5, 7, 1)])
def test_scale_rows_and_block_columns(rows, n, blocks, dtype, threads):
    w = torch.randn(rows, n, dtype=dtype)
    a, b = torch.rand(rows, dtype=dtype) + 0.5, torch.rand(blocks, n, dtype=dtype) + 0.5
    ref = w * a[:, None] * b.repeat_interleave(rows // blocks, 0)
    kernels.scale(w, a, b, blocks)
    torch.testing.assert_close(w, ref, rtol=tol(dtype), atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_and_column_sums_of_squares(dtype, threads):
    w = torch.randn(300, 700, dtype=dtype)
    w[3] = 0
    w[:, 5] = 0
    v, u = torch.rand(700, dtype=dtype), torch.rand(300, dtype=dtype)
    torch.testing.assert_close(kernels.rowsq(w, v), w.square() @ v, rtol=tol(dtype), atol=0)
    torch.testing.assert_close(kernels.colsq(w, u), u @ w.square(), rtol=tol(dtype), atol=0)
    total, zeros = kernels.sumsq(w)
    assert total == pytest.approx(float(w.double().square().sum()), rel=tol(dtype))
    assert zeros == 700 + 300 - 1


class Net(nn.Module):  # plain, grouped and depthwise convs, a 1×1 conv and a linear layer
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c3, self.c4 = nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 36, 10)

    def forward(self, x):
        for c in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(c(x))
        return self.fc(torch.flatten(x, 1))


def _train(model, steps, use_kernels: bool):
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    enorm = ENorm(model, opt, x[:2])
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if use_kernels:
            enorm.step()
        else:
            with kernels.disabled():
                enorm.step()
    return model, opt


def test_enorm_training_alike_with_and_without_the_compiled_loops(threads):
    torch.manual_seed(0)
    base = Net().double()
    a, opt_a = _train(copy.deepcopy(base), 5, True)
    b, opt_b = _train(copy.deepcopy(base), 5, False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14, msg=name)
        torch.testing.assert_close(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"],
                                   rtol=1e-10, atol=1e-14, msg=name)


def test_no_compiler_means_aten_only(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATHFX_CACHE", str(tmp_path / "cache"))
    assert kernels.lib() is None and not kernels.usable(torch.zeros(3))
    assert not any((tmp_path / "cache").glob("*"))  # nothing half-written


def test_build_into_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setenv("PATHFX_CACHE", str(tmp_path))
    assert kernels.lib() is not None
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # the library, no temporary left
    w = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(kernels.energy(w, 9), w.reshape(-1, 9).square().sum(1))
