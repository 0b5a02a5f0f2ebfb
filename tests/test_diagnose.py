"""Diagnostics: the covariance figures against a direct numpy computation, BN σ, the command's outputs."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

from passes.pathnorm import path_norm
from pathfx.cli import main
from lab.diagnose import condition_number, diagnose


def _numpy_spectrum(s: np.ndarray):
    eig = np.sort(np.linalg.eigvalsh(s.T @ s / s.shape[0]))[::-1]
    keep = eig[eig > len(eig) * np.finfo(np.float64).eps * eig[0]]
    return eig[0], keep[0] / keep[-1]


def test_mlp_covariances_match_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    res = diagnose(model, x, y)
    # forward and backward by hand: h_k = a_{k-1} W_kᵀ + b_k, a_k = relu(h_k); ℓ = Σ_i CE(h_3[i], y_i)
    W = [m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    b = [m.bias.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    a, hs, ins = x.numpy(), [], []
    for k in range(3):
        ins.append(a)
        hs.append(a @ W[k].T + b[k])
        a = np.maximum(hs[-1], 0)
    p = np.exp(hs[2] - hs[2].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = [None, None, p - np.eye(3)[y.numpy()]]  # ∂ℓ_i/∂h_3 per sample
    g[1] = (g[2] @ W[2]) * (hs[1] > 0)
    g[0] = (g[1] @ W[1]) * (hs[0] > 0)
    assert [s.layer for s in res.layers] == ["0", "2", "4"]
    for k, s in enumerate(res.layers):
        lx, kx = _numpy_spectrum(ins[k])
        lg, kg = _numpy_spectrum(g[k])
        assert (s.samples, s.in_dim, s.out_dim) == (40, W[k].shape[1], W[k].shape[0])
        for ours, ref in ((s.in_lambda_max, lx), (s.in_kappa, kx), (s.grad_lambda_max, lg), (s.grad_kappa, kg)):
            assert ours == pytest.approx(ref, rel=1e-10)
        assert s.weight_energy == pytest.approx(float((W[k] ** 2).sum()), rel=1e-12)
    assert res.path_norm == pytest.approx(path_norm(model, (1, 6)), rel=1e-14)
    assert not res.bns


def test_conv_samples_are_positions_and_bn_sigma():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_var.fill_(4.0)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    res = diagnose(model, x)
    conv = res.layers[0]
    rows = x.permute(0, 2, 3, 1).reshape(-1, 2).numpy()  # one sample per (image, position)
    lx, kx = _numpy_spectrum(rows)
    assert conv.samples == 180 and conv.in_dim == 2
    assert (conv.in_lambda_max, conv.in_kappa) == (pytest.approx(lx, rel=1e-10), pytest.approx(kx, rel=1e-10))
    h = model[0].double()(x).detach()
    assert res.bns[0].batch_std == pytest.approx(float(h.std((0, 2, 3), unbiased=False).mean()), rel=1e-10)
    assert res.bns[0].running_std == pytest.approx(2.0)
    assert float(model[1].running_var[0]) == 4.0  # the caller's model is untouched


def test_generalised_condition_number():
    eig = np.array([8.0, 4.0, 2.0, 1.0, 1e-30])  # the last is below the numerical rank
    assert condition_number(eig) == 8.0
    # λ1/λk, k the first index where the top-k share of the trace (8, 12, 14, 15 of 15) reaches p
    assert condition_number(eig, 0.8) == 2.0 and condition_number(eig, 0.9) == 4.0
    assert condition_number(eig, 0.5) == 1.0


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


small_cnn.input_shape = (1, 3, 16, 16)


def test_command_writes_table_png_csv(tmp_path, capsys):
    png, out = tmp_path / "d.png", tmp_path / "d.csv"
    assert main(["diagnose", "test_diagnose:small_cnn", "--batch", "16", "--png", str(png), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "λmax Σx" in text and "batch σ" in text and "path-norm" in text and "digits" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader(out.open()))
    assert [r["layer"] for r in table] == ["0", "4", "8", "1", "(model)"]
    assert int(table[0]["samples"]) == 16 * 256 and float(table[-1]["path_norm"]) > 0
    # no overwrite without --force
    assert main(["diagnose", "test_diagnose:small_cnn", "--batch", "4", "--csv", str(out)]) == 2
    assert main(["diagnose", "test_diagnose:small_cnn", "--batch", "4", "--data", "random", "--eval",
                 "--csv", str(out), "--force"]) == 0


def test_fewer_samples_than_dimensions():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(12, 30, dtype=torch.float64)
    first = diagnose(model, x).layers[0]
    lx, kx = _numpy_spectrum(x.numpy())  # 30×30 second moment of rank 12
    assert first.in_lambda_max == pytest.approx(lx, rel=1e-10) and first.in_kappa == pytest.approx(kx, rel=1e-8)
