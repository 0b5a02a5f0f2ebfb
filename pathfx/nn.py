"""Runtime modules of a path-reparameterized network (DESIGN §3).

``PathLayer`` wraps a Conv/Linear whose weight is computed from trainable path values V:
u = V / b_k off the red entries, ±1 (constant buffers, no gradient) on them. b_k, the basis
value of input channel k, is |V| of one entry of an upstream PathLayer (or 1), read at every
forward: plain SGD on V through autograd is then G-SGD — the gradient through b_k gives the
extra term of path-bn.txt eq. (7). ``PBN`` is batch normalization in the path space
(pbn eq. 3–5): z = BN(offdiag(x)) + λ·red(x).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PathLayer(nn.Module):
    """A conv/linear layer in path coordinates.

    ``base`` keeps the layer's hyper-parameters and bias (its weight is removed); ``col_slot``
    maps each (row, column) of the weight (broadcast over rows when the same for all rows) to a
    slot of the basis vector, slot 0 being the constant 1.
    """

    def __init__(self, base: nn.Module, v: torch.Tensor, red: torch.Tensor, col_slot: torch.Tensor):
        super().__init__()
        del base.weight
        self.base = base
        self.is_conv = not isinstance(base, nn.Linear)
        self.V = nn.Parameter(torch.where(red != 0, torch.zeros_like(v), v))
        self.register_buffer("red", red)
        self.register_buffer("free", (red == 0).to(v.dtype))
        self.register_buffer("col_slot", col_slot.reshape(col_slot.shape + (1,) * (v.dim() - col_slot.dim())))
        flat = red.reshape(red.shape[0], red.shape[1], -1)
        rows, local, taps = torch.nonzero(flat, as_tuple=True)
        self.register_buffer("red_signs", flat[rows, local, taps])
        cols = (rows // (red.shape[0] // base.groups)) * red.shape[1] + local if self.is_conv else local
        self.register_buffer("red_rows", rows)
        self.register_buffer("red_cols", cols)  # absolute input channel (feature) of each red entry
        # one common tap lets red(x) be a strided slice; otherwise it is a sparse convolution
        tap_set = set(taps.tolist())
        self.tap = () if not self.is_conv else \
            tuple(int(i) for i in torch.unravel_index(torch.tensor(tap_set.pop()), red.shape[2:])) \
            if len(tap_set) == 1 else None
        object.__setattr__(self, "_sources", [])

    # -- basis values
    def link(self, sources: list[tuple["PathLayer", torch.Tensor]]) -> None:
        """Set the upstream layers whose |V| entries give this layer's basis slots 1, 2, ..."""
        object.__setattr__(self, "_sources", [m for m, _ in sources])
        for i, (_, idx) in enumerate(sources):
            self.register_buffer(f"src_index{i}", idx)

    def basis(self) -> torch.Tensor:
        parts = [self.V.new_ones(1)]
        for i, m in enumerate(self._sources):
            parts.append(m.V.reshape(-1)[getattr(self, f"src_index{i}")].abs())
        return torch.cat(parts)

    def off_weight(self) -> torch.Tensor:
        """The non-red entries u = V / b (red entries 0)."""
        return self.V * self.free / self.basis()[self.col_slot]

    @property
    def weight(self) -> torch.Tensor:
        return self.off_weight() + self.red

    @property
    def bias(self):
        return self.base.bias

    @property
    def has_red(self) -> bool:
        return self.red_rows.numel() > 0

    # -- forward
    def _run(self, x, w, bias=None):
        return self.base._conv_forward(x, w, bias) if self.is_conv else F.linear(x, w, bias)

    def forward(self, x):
        return self._run(x, self.weight, self.base.bias)

    def forward_off(self, x):
        return self._run(x, self.off_weight(), self.base.bias)

    def red_term(self, x):
        """red(x): the signed channel gather of the red entries, strided like the layer."""
        if not self.is_conv:
            out = x.new_zeros(x.shape[:-1] + (self.red.shape[0],))
            return out.index_add_(-1, self.red_rows, x[..., self.red_cols] * self.red_signs)
        b = self.base
        if self.tap is None or b.padding_mode != "zeros" or isinstance(b.padding, str):
            return self._run(x, self.red)
        sl = []
        for d in range(len(self.tap)):
            n = x.shape[2 + d] + 2 * b.padding[d]
            out = (n - b.dilation[d] * (b.kernel_size[d] - 1) - 1) // b.stride[d] + 1
            start = b.dilation[d] * self.tap[d]
            sl.append(slice(start, start + b.stride[d] * (out - 1) + 1, b.stride[d]))
        if any(b.padding):
            x = F.pad(x, [p for p in reversed(b.padding) for _ in (0, 1)])
        xs = x[(slice(None), self.red_cols) + tuple(sl)]
        out = xs.new_zeros((xs.shape[0], self.red.shape[0]) + xs.shape[2:])
        return out.index_add_(1, self.red_rows, xs * self.red_signs.reshape((-1,) + (1,) * (xs.dim() - 2)))

    def extra_repr(self):
        return f"{type(self.base).__name__}, red={self.red_rows.numel()}, sources={len(self._sources)}"


class PBN(nn.Module):
    """P-BN after a path layer: z = BN(offdiag(x)) + λ·red(x) (the activation follows in the graph)."""

    def __init__(self, layer: PathLayer, bn: nn.Module, lam: float = 1.0):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.register_buffer("lam", torch.tensor(float(lam), dtype=layer.V.dtype))

    def forward(self, x):
        return self.bn(self.layer.forward_off(x)) + self.lam * self.layer.red_term(x)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the one plain layer equal to this P-BN in eval mode."""
        bn, w_off = self.bn, self.layer.off_weight()
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        bias = self.layer.bias if self.layer.bias is not None else torch.zeros_like(a)
        shift = (bias - bn.running_mean) * a + (bn.bias if bn.bias is not None else 0)
        w = w_off * a.reshape((-1,) + (1,) * (w_off.dim() - 1)) + self.lam * self.layer.red
        return w, shift
