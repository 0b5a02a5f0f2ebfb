"""The observation experiment of pbn §5.2 (Fig. 6) at initialisation.

A stacked CNN (kernel 3, stride 1, padding 1, no bias) with BN versus the same network path-
reparameterized with P-BN (``init="paper"``): per layer, the mean over channels of the batch
standard deviation σ of the sums the (P-)BN normalizes, and the log (natural) of the L2 norm
of the gradient of the cross-entropy loss w.r.t. the layer's output (after ReLU). Inputs and
labels are random (N(0, 1) images, uniform labels): the quantities are taken at initialisation.
"""
from __future__ import annotations

import io
import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and keeps every ReLU output (function or module) with its gradient retained."""

    def __init__(self, module):
        super().__init__(module)
        self.relus: list[torch.Tensor] = []

    def run_node(self, n):
        out = super().run_node(n)
        relu = (n.op == "call_function" and n.target in (torch.relu, F.relu)) or \
            (n.op == "call_module" and isinstance(self.module.get_submodule(n.target), nn.ReLU))
        if relu:
            out.retain_grad()
            self.relus.append(out)
        return out


def measure(model: fx.GraphModule, x, y) -> tuple[list[float], list[float]]:
    """(mean σ per BN layer, log gradient norm per ReLU output), in forward order."""
    sigmas = []

    def hook(mod, inputs, _out):
        var = inputs[0].detach().var(dim=[d for d in range(inputs[0].dim()) if d != 1], unbiased=False)
        sigmas.append(torch.sqrt(var + mod.eps).mean().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    rec = _Recorder(model)
    loss = F.cross_entropy(rec.run(x), y)
    loss.backward()
    for h in handles:
        h.remove()
    return sigmas, [math.log(r.grad.norm().item()) for r in rec.relus]


def observe(depth=50, width=128, batch=128, size=32, seed=0, x=None, y=None) -> dict[str, list[float]]:
    """``x``, ``y``: a real mini-batch (the paper's first CIFAR-10 batch) instead of random images and labels;
    its shape then replaces ``batch`` and ``size``."""
    import pathfx
    from pathfx.reparam import OFFDIAG_SCALE
    from zoo.plain import StackedCNN

    torch.manual_seed(seed)
    model = StackedCNN(depth=depth, width=width, in_channels=3 if x is None else x.shape[1])
    if x is None:
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
    path, _ = pathfx.reparameterize(model, x[:2], pbn=True, init="paper")
    bn_sigma, bn_grad = measure(fx.symbolic_trace(model), x, y)
    pbn_sigma, pbn_grad = measure(path, x, y)
    return {"bn_sigma": bn_sigma, "pbn_sigma": pbn_sigma, "bn_log_grad": bn_grad, "pbn_log_grad": pbn_grad,
            "offdiag_scale": OFFDIAG_SCALE}


def to_csv(res) -> str:
    lines = ["layer,bn_sigma,pbn_sigma,bn_log_grad,pbn_log_grad"]
    for i in range(len(res["bn_sigma"])):
        lines.append(f"{i + 1},{res['bn_sigma'][i]:.6g},{res['pbn_sigma'][i]:.6g},"
                     f"{res['bn_log_grad'][i]:.6g},{res['pbn_log_grad'][i]:.6g}")
    return "\n".join(lines) + "\n"


def to_png(res) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(1, len(res["bn_sigma"]) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(layers, res["bn_sigma"], label="BN")
    a.plot(layers, res["pbn_sigma"], label="P-BN")
    a.set(xlabel="layer", ylabel="mean sigma", title="standard deviation normalized by (P-)BN")
    b.plot(layers, res["bn_log_grad"], label="BN")
    b.plot(layers, res["pbn_log_grad"], label="P-BN")
    b.set(xlabel="layer", ylabel="ln ||dL/dz||", title="gradient w.r.t. layer output")
    for ax in (a, b):
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def sigma_growth(sigmas: list[float]) -> float:
    """Slope of the least-squares line of σ against the layer, over the P-BN layers (layer 1 reads the
    input: no red weight, an ordinary BN in both networks)."""
    s = sigmas[1:] if len(sigmas) > 2 else sigmas
    n = len(s)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(s) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(s)) / sum((i - mx) ** 2 for i in range(n))


def summary(res) -> str:
    def growth(g):  # per layer, from the last layer back to the first
        return (g[0] - g[-1]) / max(len(g) - 1, 1)
    pbn = res["pbn_sigma"]
    return (f"BN: sigma < 1 in {sum(s < 1 for s in res['bn_sigma'])}/{len(res['bn_sigma'])} layers, "
            f"mean sigma {sum(res['bn_sigma']) / len(res['bn_sigma']):.3g}; "
            f"P-BN (red weights +1, off-red He-normal x {res['offdiag_scale']:g}): sigma {pbn[1 if len(pbn) > 2 else 0]:.3g} "
            f"at its first P-BN layer -> {pbn[-1]:.3g} at layer {len(pbn)}, growth {sigma_growth(pbn):+.4f} per "
            f"layer, sigma > 1 in {sum(s > 1 for s in pbn[1:])}/{max(len(pbn) - 1, 1)} P-BN layers\n"
            f"ln gradient norm, growth per layer towards the input: BN {growth(res['bn_log_grad']):.4f}, "
            f"P-BN {growth(res['pbn_log_grad']):.4f}")
