"""Layer-wise diagnostics on one batch: conditioning (layerwise-conditioning appendix, Proposition 1),
BatchNorm σ, weight energy and the ℓ1 path-norm.

For every Conv/Linear layer with input x and output h (pre-activation, before any BN):

* Σx = E[x xᵀ], the *uncentred* second moment of the layer input (the appendix's covariance
  E_q(x)(x xᵀ)); Σ∇h = E[(∂ℓ/∂h)ᵀ(∂ℓ/∂h)], the same for the output gradient, where ℓ is each
  sample's own cross-entropy (the gradient of the batch's summed loss). Proposition 1: the
  layer's sub-FIM Σx ⊗ Σ∇h has λmax = λmax(Σx)·λmax(Σ∇h) and κ = κ(Σx)·κ(Σ∇h).
* A Linear layer's samples are the batch rows (d = in/out features). A convolution's samples
  are every (example, spatial position) pair, as the appendix does ("each spatial location of
  the feature map as an independent example", like BN): d = channels, n = N·H·W.
* κ is the generalised condition number κ_p = λ1/λk of the appendix (κ_100% by default): λk is
  the smallest eigenvalue needed to reach a fraction p of the trace, among the eigenvalues above
  the numerical-rank threshold d·eps·λmax (a batch smaller than d gives a rank-deficient Σ).

BN σ: per BatchNorm, the channel mean of the batch std of its input (the std it divides by in
training) and of sqrt(running_var). Weight energy: Σ w² per layer. The model runs in float64 on
a private copy, in training mode by default (BN uses batch statistics, as in training).
"""
from __future__ import annotations

import copy
import csv
import io
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pathfx import PathfxError, path_norm
from pathfx.commands import table
from pathfx.nn import BATCHNORMS, LAYERS


@dataclass
class LayerStats:
    layer: str
    kind: str
    samples: int
    in_dim: int
    in_lambda_max: float
    in_kappa: float
    out_dim: int
    grad_lambda_max: float
    grad_kappa: float
    weight_energy: float


@dataclass
class BNStats:
    bn: str
    batch_std: float
    running_std: float


@dataclass
class Diagnosis:
    layers: list[LayerStats]
    bns: list[BNStats]
    path_norm: float | None
    batch: int
    p: float = 1.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        f = lambda v: f"{v:.3e}"  # noqa: E731
        rows = [[s.layer, s.kind, s.samples, s.in_dim, f(s.in_lambda_max), f(s.in_kappa), s.out_dim,
                 f(s.grad_lambda_max), f(s.grad_kappa), f(s.weight_energy)] for s in self.layers]
        k = f"κ{self.p:.0%}"
        out = [table(["layer", "kind", "samples", "d_in", "λmax Σx", f"{k} Σx", "d_out", "λmax Σ∇h", f"{k} Σ∇h",
                      "Σw²"], rows)]
        if self.bns:
            out.append(table(["batchnorm", "batch σ", "running σ"],
                             [[b.bn, f"{b.batch_std:.4g}", f"{b.running_std:.4g}"] for b in self.bns]))
        pn = "n/a" if self.path_norm is None else f"{self.path_norm:.6e}"
        out.append(f"ℓ1 path-norm (float64, |w| network on an all-ones input): {pn}")
        return "\n\n".join(out + self.notes)

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = list(LayerStats.__dataclass_fields__) + ["bn_batch_std", "bn_running_std", "path_norm"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for s in self.layers:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in asdict(s).items()})
        for b in self.bns:
            w.writerow({"layer": b.bn, "kind": "batchnorm", "bn_batch_std": repr(b.batch_std),
                        "bn_running_std": repr(b.running_std)})
        w.writerow({"layer": "(model)", "kind": "path-norm",
                    "path_norm": "" if self.path_norm is None else repr(self.path_norm)})
        return buf.getvalue()

    def plot(self, f) -> None:
        """Write the figure as PNG to the binary file object ``f``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
        idx = np.arange(1, len(self.layers) + 1)
        col = lambda key: [getattr(s, key) for s in self.layers]  # noqa: E731
        for a, key, title in ((ax[0, 0], "lambda_max", "max eigenvalue"), (ax[0, 1], "kappa",
                                                                            f"condition number κ{self.p:.0%}")):
            a.semilogy(idx, col(f"in_{key}"), "o-", label="layer input Σx")
            a.semilogy(idx, col(f"grad_{key}"), "s-", label="output gradient Σ∇h")
            a.set(title=title, xlabel="layer index")
            a.legend()
        ax[1, 0].semilogy(idx, col("weight_energy"), "o-")
        ax[1, 0].set(title="weight energy Σw²", xlabel="layer index")
        if self.bns:
            b = np.arange(1, len(self.bns) + 1)
            ax[1, 1].plot(b, [x.batch_std for x in self.bns], "o-", label="batch σ")
            ax[1, 1].plot(b, [x.running_std for x in self.bns], "s-", label="running σ")
            ax[1, 1].set(title="BN input σ (channel mean)", xlabel="BatchNorm index")
            ax[1, 1].legend()
        else:
            ax[1, 1].text(0.5, 0.5, "no BatchNorm", ha="center", va="center")
            ax[1, 1].set_axis_off()
        pn = "n/a" if self.path_norm is None else f"{self.path_norm:.4e}"
        fig.suptitle(f"batch {self.batch}; ℓ1 path-norm {pn}")
        fig.tight_layout()
        fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def rows(t: torch.Tensor) -> torch.Tensor:
    """Samples × channels: channel axis 1 for convs (every position a sample), last axis for linear."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() > 2 else t.reshape(-1, t.shape[-1])


def spectrum(samples: torch.Tensor, p: float = 1.0) -> tuple[float, float]:
    """(λmax, κ_p) of the uncentred second moment E[s sᵀ] of the rows of ``samples``, in float64."""
    s = samples.double()
    n, d = s.shape
    # with fewer samples than dimensions, the Gram matrix s sᵀ/n has the same non-zero eigenvalues
    gram = s @ s.T if n < d else s.T @ s
    eig = np.concatenate([torch.linalg.eigvalsh(gram / n).flip(0).numpy(), np.zeros(max(d - n, 0))])
    lmax = float(eig[0])
    return lmax, condition_number(eig, p)


def condition_number(eig_desc: np.ndarray, p: float = 1.0) -> float:
    if eig_desc[0] <= 0:
        return float("nan")
    pos = eig_desc[eig_desc > len(eig_desc) * np.finfo(np.float64).eps * eig_desc[0]]  # numerical rank
    if p >= 1:
        return float(pos[0] / pos[-1])
    k = min(int(np.searchsorted(np.cumsum(pos) / pos.sum(), p)), len(pos) - 1)
    return float(pos[0] / pos[k])


def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, p: float = 1.0,
             train: bool = True, seed: int = 0) -> Diagnosis:
    """Diagnostics of ``model`` on the batch ``x`` (labels ``y``, random when None); ``model`` is not changed."""
    net = copy.deepcopy(model).double().train(train)
    x = x.double()
    inputs, grads, bn_stats = {}, {}, {}
    hooks = []

    def on_layer(name):
        def hook(mod, args, out):
            inputs.setdefault(name, []).append(rows(args[0].detach()))
            if out.requires_grad:
                out.register_hook(lambda g: grads.setdefault(name, []).append(rows(g.detach())))
        return hook

    def on_bn(name):
        def hook(mod, args):
            r = rows(args[0].detach())
            running = mod.running_var.sqrt().mean().item() if mod.running_var is not None else float("nan")
            bn_stats.setdefault(name, BNStats(name, r.std(0, unbiased=False).mean().item(), running))
        return hook

    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, LAYERS)]
    for name, mod in layers:
        hooks.append(mod.register_forward_hook(on_layer(name)))
    for name, mod in net.named_modules():
        if isinstance(mod, BATCHNORMS):
            hooks.append(mod.register_forward_pre_hook(on_bn(name)))
    try:
        out = net(x)
        if y is None:
            g = torch.Generator().manual_seed(seed)
            y = torch.randint(0, out.shape[1], (out.shape[0],), generator=g)
        F.cross_entropy(out, y % out.shape[1], reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    stats = []
    for name, mod in layers:
        if name not in inputs:
            continue
        xin = torch.cat(inputs[name])
        gout = torch.cat(grads[name]) if name in grads else None
        lx, kx = spectrum(xin, p)
        lg, kg = spectrum(gout, p) if gout is not None else (float("nan"), float("nan"))
        stats.append(LayerStats(name, "linear" if isinstance(mod, nn.Linear) else "conv", xin.shape[0],
                                xin.shape[1], lx, kx, mod.weight.shape[0], lg, kg,
                                float(mod.weight.detach().double().pow(2).sum())))
    notes = []
    try:
        pn = path_norm(model, (1,) + tuple(x.shape[1:]))
    except PathfxError as e:
        pn = None
        notes.append(f"path-norm not computed: {e}")
    return Diagnosis(stats, [bn_stats[n] for n in bn_stats], pn, x.shape[0], p, notes)
