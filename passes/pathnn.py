"""Runtime modules of a path-reparameterized network (DESIGN §3).

``PathLayer`` wraps a Conv/Linear whose weight is computed from trainable path values V:
u = V / b_k off the red entries, ±1 (constant buffers, no gradient) on them. b_k, the basis
value of input channel k, is |V| of one entry of an upstream PathLayer (or 1), read at every
forward: plain SGD on V through autograd is then G-SGD — the gradient through b_k gives the
extra term of path-bn.txt eq. (7). ``PBN`` is batch normalization in the path space
(pbn eq. 3–5): z = BN(offdiag(x)) + λ·red(x).

Units. u is the weight of the rescaled network (every red weight ±1); its activations are the
original ones times products of red weights, 1e-20 and less on a deep plain net, where a BatchNorm's
statistics and ε would no longer be the original's. So a converted layer keeps the network's own
units at its boundary: it reads x·s_in and writes its result / s_out, with s_in the rescaling factor
of each input channel and s_out that of each output channel (times the scale of the BatchNorm folded
into it, which stays a module of its own): ``effective_weight`` is then the original layer's weight.
A freshly initialised path model (``init="paper"``) has every scale 1.

Speed. b_k depends only on the input channel k, so conv(x, V/b) = conv(x/b, V): the forward
divides whichever is smaller, the weight or the activation (at CIFAR resolution the deep
layers' weights are far larger than their activations). The red entries of a layer usually
share one kernel tap with at most one entry per output row (the generalized diagonal); red(x)
is then a signed channel gather of a strided slice of x, added after the BN with one fused
multiply-add; when row o reads channel o (equal widths) there is no gather at all.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PathLayer(nn.Module):
    """A conv/linear layer in path coordinates.

    ``base`` keeps the layer's hyper-parameters and bias, in the path form's units like u (its
    weight is removed); ``col_slot``
    maps each (row, column) of the weight (broadcast over rows when the same for all rows) to a
    slot of the basis vector, slot 0 being the constant 1. ``in_scale`` (per input channel) and
    ``out_scale`` (per output channel) are the units of the module docstring (default 1).
    """

    def __init__(self, base: nn.Module, v: torch.Tensor, red: torch.Tensor, col_slot: torch.Tensor,
                 in_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None):
        super().__init__()
        del base.weight
        self.base = base
        self.is_conv = not isinstance(base, nn.Linear)
        groups = base.groups if self.is_conv else 1
        self.V = nn.Parameter(torch.where(red != 0, torch.zeros_like(v), v))
        self.register_buffer("red", red)
        self.register_buffer("free", (red == 0).to(v.dtype))
        self.register_buffer("col_slot", col_slot.reshape(col_slot.shape + (1,) * (v.dim() - col_slot.dim())))
        self.register_buffer("in_scale", v.new_ones(red.shape[1] * groups) if in_scale is None else in_scale.to(v))
        self.register_buffer("out_scale", v.new_ones(red.shape[0]) if out_scale is None else out_scale.to(v))
        self._n_spatial = red.dim() - 2
        self._derive()
        object.__setattr__(self, "_sources", [])

    def _derive(self) -> None:
        """Index buffers and the red(x) strategy, all functions of ``red`` and ``col_slot``.

        Run again after ``load_state_dict``: a checkpoint's red signs (or positions) need not be
        this layer's, and a stale copy would silently compute another function.
        """
        red, dev = self.red, self.red.device
        flat = red.reshape(red.shape[0], red.shape[1], -1)
        rows, local, taps = torch.nonzero(flat, as_tuple=True)
        self.register_buffer("red_signs", flat[rows, local, taps])
        groups = self.base.groups if self.is_conv else 1
        cols = (rows // (red.shape[0] // groups)) * red.shape[1] + local if self.is_conv else local
        self.register_buffer("red_rows", rows)
        self.register_buffer("red_cols", cols)  # absolute input channel (feature) of each red entry
        # one common tap lets red(x) be a strided slice; otherwise it is a sparse convolution
        tap_set = set(taps.tolist())
        self.tap = () if not self.is_conv else \
            tuple(int(i) for i in torch.unravel_index(torch.tensor(tap_set.pop()), red.shape[2:])) \
            if len(tap_set) == 1 else None
        self._has_red = rows.numel() > 0
        # red(x) as a per-row gather: "identity" (row o reads channel o), "select" (every row reads one
        # channel), "scatter" (rows without or with several red entries), "conv" (no common tap)
        c_out, c_in = red.shape[0], red.shape[1] * groups
        self._red_mode = "conv" if self.tap is None else "scatter"
        row_src = torch.zeros(c_out, dtype=torch.long, device=dev)
        row_sign = torch.zeros(c_out, dtype=red.dtype, device=dev)
        arange = torch.arange(c_out, device=dev)
        if self.tap is not None and rows.numel() == c_out and torch.equal(torch.sort(rows).values, arange):
            row_src[rows], row_sign[rows] = cols, self.red_signs
            self._red_mode = "identity" if c_in == c_out and torch.equal(row_src, arange) else "select"
        # absolute input channel of each (row, column)
        chan = (torch.arange(red.shape[0], device=dev) // (red.shape[0] // groups) * red.shape[1])[:, None] + \
            torch.arange(red.shape[1], device=dev)[None, :]
        # units: s_in of each (row, column) and 1 / s_out of each row, shaped to broadcast over the weight
        self._scaled = not (bool((self.in_scale == 1).all()) and bool((self.out_scale == 1).all()))
        shape = (-1,) + (1,) * (red.dim() - 1)
        col_scale = self.in_scale[chan if groups > 1 else chan[:1]]
        self.register_buffer("col_scale", col_scale.reshape(col_scale.shape + (1,) * (red.dim() - 2)),
                             persistent=False)
        self.register_buffer("row_unit", self.out_scale.reciprocal().reshape(shape), persistent=False)
        red_values = self.red_signs * self.in_scale[cols] / self.out_scale[rows]  # red entries in the network's units
        self.register_buffer("red_values", red_values, persistent=False)
        self.register_buffer("red_net", self.red * self.col_scale * self.row_unit if self._scaled else self.red,
                             persistent=False)
        row_sign[rows] = red_values if self._red_mode in ("identity", "select") else row_sign[rows]
        self.register_buffer("row_src", row_src, persistent=False)
        self.register_buffer("row_sign", row_sign, persistent=False)
        # basis slot of each absolute input channel (the slot depends on the channel only)
        cs = self.col_slot.reshape(-1, red.shape[1])
        if groups == 1 and cs.shape[0] == 1:  # one row broadcast over all rows
            chan_slot, self._per_channel = cs[0].clone(), True
        else:
            cs = cs.expand(red.shape[0], red.shape[1])
            chan_slot = torch.zeros(c_in, dtype=torch.long, device=dev)
            chan_slot[chan.reshape(-1)] = cs.reshape(-1)
            self._per_channel = bool(torch.equal(chan_slot[chan], cs))
        self.register_buffer("chan_slot", chan_slot, persistent=False)

    @torch.no_grad()
    def set_red(self, red: torch.Tensor) -> None:
        """New red entries (same positions, e.g. other signs), with the buffers derived from them."""
        self.red.copy_(red)
        self._derive()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._derive()

    def _apply(self, fn, *args, **kwargs):
        # derived in the new dtype from the converted buffers, as a loaded checkpoint's are: bit for bit
        out = super()._apply(fn, *args, **kwargs)
        self._derive()
        return out

    # -- basis values
    def link(self, sources: list[tuple["PathLayer", torch.Tensor]]) -> None:
        """Set the upstream layers whose |V| entries give this layer's basis slots 1, 2, ..."""
        object.__setattr__(self, "_sources", [m for m, _ in sources])
        for i, (_, idx) in enumerate(sources):
            self.register_buffer(f"src_index{i}", idx)

    @property
    def sources(self) -> list["PathLayer"]:
        """The upstream layers this layer's basis slots 1, 2, ... read (not submodules: each is its own)."""
        return list(self._sources)

    def source_index(self, i: int) -> torch.Tensor:
        """Flat indices into ``sources[i].V`` of this layer's basis slots that read it."""
        return getattr(self, f"src_index{i}")

    def basis(self) -> torch.Tensor:
        parts = [self.V.new_ones(1)]
        for i, m in enumerate(self._sources):
            parts.append(m.V.reshape(-1).index_select(0, self.source_index(i)).abs())
        return torch.cat(parts)

    def _masked_v(self) -> torch.Tensor:
        return self.V * self.free if self._has_red else self.V

    def off_weight(self) -> torch.Tensor:
        """The non-red entries u = V / b (red entries 0)."""
        w = self._masked_v()
        return w / self.basis()[self.col_slot] if self._sources else w

    @property
    def weight(self) -> torch.Tensor:
        """The path form's weight: u off the red entries, ±1 on them (the rescaled network's units)."""
        w = self.off_weight()
        return w + self.red if self._has_red else w

    def effective_weight(self) -> torch.Tensor:
        """The weight in the network's own units: what a plain layer in this place computes with."""
        w = self._units(self.off_weight())
        return w + self.red_net if self._has_red else w

    def _units(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.col_scale * self.row_unit if self._scaled else w

    def step_scale(self) -> torch.Tensor:
        """Per entry of V: the factor that turns ∂L/∂V into ∂L/∂w of the effective weight w, i.e.
        b · s_out / s_in (pathfx.optim.PlanSGD scales the step by its square)."""
        b = self.basis()[self.col_slot]
        return b / (self.col_scale * self.row_unit) if self._scaled else b

    @property
    def bias(self):
        """The path form's bias (the rescaled network's units, like ``weight``)."""
        return self.base.bias

    def effective_bias(self):
        """The bias in the network's own units."""
        b = self.base.bias
        return b * self.row_unit.reshape(-1) if b is not None and self._scaled else b

    @property
    def has_red(self) -> bool:
        return self._has_red

    # -- forward
    def _run(self, x, w, bias=None):
        return self.base._conv_forward(x, w, bias) if self.is_conv else F.linear(x, w, bias)

    def _chan(self, t: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over an input/output of this layer."""
        return t.reshape((-1,) + (1,) * self._n_spatial) if self.is_conv else t

    def _off_parts(self, x, scale_input: bool = True):
        """(x', w') with layer(x', w') = layer(x, the off-red part of effective_weight()): V / b (and the
        input units) divide the smaller of weight and input."""
        w = self._masked_v()
        if not self._sources and not self._scaled:
            return x, w
        if scale_input and self._per_channel and x.numel() < w.numel():
            c = self.in_scale / self.basis()[self.chan_slot] if self._sources else self.in_scale
            return x * self._chan(c), w * self.row_unit if self._scaled else w
        return x, self._units(w / self.basis()[self.col_slot] if self._sources else w)

    def forward(self, x):
        if not self._has_red:
            return self._run(*self._off_parts(x), self.effective_bias())
        x_off, w = self._off_parts(x, scale_input=self._fast_red())
        if x_off is x:
            return self._run(x, w + self.red_net, self.effective_bias())
        return self._add_red(self._run(x_off, w, self.effective_bias()), x, None)

    def forward_off(self, x):
        return self._run(*self._off_parts(x), self.effective_bias())

    def _red_slice(self, x):
        """x at the common red tap, strided like the layer (padding only if the tap reaches into it)."""
        if not self.is_conv:
            return x
        b = self.base
        idx, pad = [], False
        for d in range(len(self.tap)):
            size = x.shape[x.dim() - len(self.tap) + d]
            n = size + 2 * b.padding[d]
            out = (n - b.dilation[d] * (b.kernel_size[d] - 1) - 1) // b.stride[d] + 1
            start = b.dilation[d] * self.tap[d] - b.padding[d]
            stop = start + b.stride[d] * (out - 1) + 1
            pad = pad or start < 0 or stop > size
            idx.append((start, stop, b.stride[d]))
        if pad:
            x = F.pad(x, [p for p in reversed(b.padding) for _ in (0, 1)])
            idx = [(s + p, e + p, st) for (s, e, st), p in zip(idx, b.padding)]
        elif all(s == 0 and st == 1 and e == x.shape[x.dim() - len(idx) + d] for d, (s, e, st) in enumerate(idx)):
            return x
        return x[(Ellipsis,) + tuple(slice(s, e, st) for s, e, st in idx)]

    def _gather_ok(self) -> bool:
        b = self.base
        return not self.is_conv or (self.tap is not None and b.padding_mode == "zeros" and not isinstance(b.padding, str))

    def _fast_red(self) -> bool:
        """red(x) is one (or no) channel gather of a slice of x."""
        return self._red_mode in ("identity", "select") and self._gather_ok()

    def _add_red(self, y, x, lam):
        """y + lam · red(x) (lam None: 1; a scalar or one value per output channel)."""
        if self._fast_red():
            xs = self._red_slice(x)
            if self._red_mode == "select":
                xs = xs.index_select(-1 - self._n_spatial if self.is_conv else -1, self.row_src)
            scale = self.row_sign if lam is None else lam * self.row_sign
            return torch.addcmul(y, xs, self._chan(scale))
        red = self.red_term(x)
        return y + red if lam is None else y + (self._chan(lam) if lam.dim() else lam) * red

    def red_term(self, x):
        """red(x): the signed channel gather of the red entries, strided like the layer (network units)."""
        if not self.is_conv:
            out = x.new_zeros(x.shape[:-1] + (self.red.shape[0],))
            return out.index_add_(-1, self.red_rows, x[..., self.red_cols] * self.red_values)
        if not self._gather_ok():
            return self._run(x, self.red_net)
        cdim = -1 - self._n_spatial
        xs = self._red_slice(x).index_select(cdim, self.red_cols)
        out = xs.new_zeros(xs.shape[:cdim] + (self.red.shape[0],) + xs.shape[cdim + 1:])
        return out.index_add_(cdim, self.red_rows, xs * self._chan(self.red_values))

    def extra_repr(self):
        return f"{type(self.base).__name__}, red={self.red_rows.numel()}, sources={len(self._sources)}"


class PBN(nn.Module):
    """P-BN after a path layer: z = BN(offdiag(x)) + λ·r ⊙ red(x) (the activation follows in the graph).

    ``red_scale`` r (one value per channel, default 1) puts the red term in the units of the BN's
    output: for a converted model, the scale of the BatchNorm that was folded into the layer, which
    the original applied to the red weight's contribution as to every other.
    """

    def __init__(self, layer: PathLayer, bn: nn.Module, lam: float = 1.0, red_scale: torch.Tensor | None = None):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.register_buffer("lam", torch.tensor(float(lam), dtype=layer.V.dtype))
        c = layer.red.shape[0]
        self.register_buffer("red_scale", layer.V.new_ones(c) if red_scale is None else red_scale.to(layer.V))

    def forward(self, x):
        return self.layer._add_red(self.bn(self.layer.forward_off(x)), x, self.lam * self.red_scale)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the one plain layer equal to this P-BN in eval mode."""
        bn, layer = self.bn, self.layer
        w_off = layer._units(layer.off_weight())
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        bias = layer.effective_bias() if layer.bias is not None else torch.zeros_like(a)
        shift = (bias - bn.running_mean) * a + (bn.bias if bn.bias is not None else 0)
        shape = (-1,) + (1,) * (w_off.dim() - 1)
        w = w_off * a.reshape(shape) + (self.lam * self.red_scale).reshape(shape) * layer.red_net
        return w, shift
