"""The ℓ1 path-norm of a ReLU network, in float64, by the |w| trick.

What is computed, for a model and an input shape (batch dimension included, usually 1):

    φ(w) = Σ over paths p of the network's DAG, unrolled over batch and spatial positions,
           from an input unit or a bias unit to an output unit, of Π_{edges e of p} |w_e|.

The network is taken in eval mode with every BatchNorm folded as the group analysis folds it
(``passes.fold_bn``): into the conv/linear before it (row × γ/σ, bias γ(b − μ)/σ + β), otherwise a
per-channel diagonal layer (weight γ/σ, bias β − γμ/σ). A bias is an edge from a constant-1 unit
(Neyshabur et al.): a path may start there. ``bias=False`` counts only the paths that start at an
input unit; for a bias-free network both are the same number.

The |w| trick computes it exactly: replace every weight and bias by its absolute value (bias by 0
for ``bias=False``), feed an all-ones input and sum the outputs. Every value is then ≥ 0, so ReLU
is the identity and each output unit receives the sum over its incoming paths. For an MLP
without biases this is 1ᵀ|W_L|···|W_1|1. A residual add sums the two path sets, a concatenation
unites them; zero padding contributes no unit (no path starts there); average pooling is a
linear layer with weights 1/k and is counted as it is. A negation or subtraction is an edge of
weight −1 and a scalar factor c an edge of weight c: the |w| network negates nothing and scales
by |c|; a constant added to a tensor is a bias (|c|, 0 for ``bias=False``).

Max pooling is not linear: on each input it routes one element per window, so the network is
a different subnetwork on each linear region. Here every element of a window is an edge of
weight 1, i.e. max pooling is counted as sum pooling (same kernel, stride, padding, ceil mode).
That is the path-norm of the DAG of all paths a max can route, an upper bound of the path-norm
of every linear region's subnetwork. Keeping the max would give the largest single window sum,
which depends on which window wins and is not a sum over paths.

φ is invariant under every rescaling the group analysis allows (a factor d on a unit multiplies
each of its incoming edges, its bias and hence every path through it, by d and each outgoing
edge by 1/d), and so under ENorm and the path reparameterization (whose layers are folded back
to plain weights first). Activations other than ReLU-like ones have no path-norm: an error.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .fold_bn import BATCHNORMS, LAYERS, ChannelAffine
from .modules import float64_copy

MAXPOOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, torch.max_pool1d: 1,
                     torch.max_pool2d: 2, torch.max_pool3d: 3}
ADAPTIVE_MAX_FUNCTIONS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
# LeakyReLU as F.leaky_relu is: the identity on the |w| network's non-negative values
PASS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d,
        nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _triple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def sum_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, n=2):
    """Max pooling's stand-in: the sum over each window (implicit padding contributes nothing)."""
    if return_indices or any(d != 1 for d in _triple(dilation, n)):
        raise InputError("path-norm: max pooling with dilation or indices is not supported")
    k, s, p = _triple(kernel_size, n), _triple(stride or kernel_size, n), _triple(padding, n)
    if n == 1:  # avg_pool1d has no divisor_override: pool a 1×L image
        return sum_pool(x.unsqueeze(-2), (1,) + k, (1,) + s, (0,) + p, 1, ceil_mode, n=2).squeeze(-2)
    pool = F.avg_pool2d if n == 2 else F.avg_pool3d
    return pool(x, k, s, p, ceil_mode=ceil_mode, count_include_pad=True, divisor_override=1)


def adaptive_sum_pool(x, output_size, return_indices=False, n=2):
    """Adaptive max pooling's stand-in: adaptive average × each window's size (windows differ in size)."""
    if return_indices:
        raise InputError("path-norm: adaptive max pooling with indices is not supported")
    out = _triple(output_size, n)
    out = tuple(x.shape[-n + i] if o is None else o for i, o in enumerate(out))
    avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[n](x, out)
    for axis, (size, o) in enumerate(zip(x.shape[-n:], out)):
        counts = torch.tensor([math.ceil((i + 1) * size / o) - (i * size) // o for i in range(o)], dtype=x.dtype)
        avg = avg * counts.reshape((-1,) + (1,) * (n - 1 - axis))
    return avg


class SumPool(nn.Module):
    def __init__(self, pool: nn.Module, n: int, adaptive: bool):
        super().__init__()
        self.pool, self.n, self.adaptive = pool, n, adaptive

    def forward(self, x):
        p = self.pool
        if self.adaptive:
            return adaptive_sum_pool(x, p.output_size, p.return_indices, self.n)
        return sum_pool(x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode, p.return_indices, self.n)


def _pool_dim(mod):
    for n, (plain, adaptive) in enumerate(((nn.MaxPool1d, nn.AdaptiveMaxPool1d), (nn.MaxPool2d, nn.AdaptiveMaxPool2d),
                                           (nn.MaxPool3d, nn.AdaptiveMaxPool3d)), 1):
        if isinstance(mod, plain):
            return n, False
        if isinstance(mod, adaptive):
            return n, True
    return None


def abs_network(model: nn.Module, input_shape, bias: bool = True) -> fx.GraphModule:
    """The float64 |w| network of ``model`` (a new module; ``model`` is not modified)."""
    from .fold import fold
    from .manager import prepare
    from .pathnn import PBN, PathLayer

    if any(isinstance(m, (PathLayer, PBN)) for m in model.modules()):
        if not isinstance(model, fx.GraphModule):
            raise InputError("path-norm: a model with path layers must be the GraphModule transform returned")
        model = fold(float64_copy(model))
    if isinstance(model, fx.GraphModule) and not any(isinstance(m, BATCHNORMS) for m in model.modules()):
        gm = model  # already traced and folded (e.g. the analysis' module): only its graph is read
    else:  # folded in float64: a fold in float32 would round the products before the sum is taken
        gm = prepare(float64_copy(model), torch.zeros(input_shape, dtype=torch.float64))
    memo = {}
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, LAYERS + (ChannelAffine,)):
            memo[id(mod.weight)] = nn.Parameter(mod.weight.detach().double().abs(), requires_grad=False)
            if mod.bias is not None:
                b = mod.bias.detach().double()
                memo[id(mod.bias)] = nn.Parameter(b.abs() if bias else torch.zeros_like(b), requires_grad=False)
        elif mod is not None and _pool_dim(mod) is None and not isinstance(mod, PASS):
            raise InputError(f"path-norm: '{node.target}' ({type(mod).__name__}) is not part of a ReLU network")
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in _NOT_RELU:
            raise InputError(f"path-norm: '{node.name}' ({node.target.__name__}) is not part of a ReLU network")
    if len(memo) != len(list(gm.parameters())):
        raise InputError("path-norm: the model has parameters outside conv/linear layers and BatchNorms")
    net = copy.deepcopy(gm, memo).double()  # the memo maps each parameter to its |w| copy: no fp32 copy
    for name, mod in list(net.named_modules()):
        dim = _pool_dim(mod)
        if dim is not None:
            net.set_submodule(name, SumPool(mod, *dim))
    for node in net.graph.nodes:
        if node.op == "call_function" and node.target in MAXPOOL_FUNCTIONS:
            node.kwargs = {**node.kwargs, "n": MAXPOOL_FUNCTIONS[node.target]}
            node.target = sum_pool
        elif node.op == "call_function" and node.target in ADAPTIVE_MAX_FUNCTIONS:
            node.kwargs = {**node.kwargs, "n": ADAPTIVE_MAX_FUNCTIONS[node.target]}
            node.target = adaptive_sum_pool
        elif node.target in (torch.amax, "amax"):  # a max over whole dims is max pooling: counted as a sum
            node.target = torch.sum if node.op == "call_function" else "sum"
    _abs_arithmetic(net.graph, bias)
    net.recompile()
    return net.eval()


def _number(a) -> bool:
    return isinstance(a, numbers.Number) and not isinstance(a, bool)


def _abs_arithmetic(graph: fx.Graph, bias: bool) -> None:
    """Signs out of the linear ops between layers: left in, x − y would subtract path sets and
    a ReLU after −x or −1.5·x would drop them (the path-norm came out ≤ 0)."""
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target in (operator.neg, torch.neg, "neg"):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in (operator.add, operator.sub, operator.mul, operator.truediv) and len(node.args) == 2:
            # a scalar factor is an edge weight; a scalar added is a bias
            keep = bias or node.target in (operator.mul, operator.truediv)
            node.args = tuple((abs(a) if keep else 0) if _number(a) else a for a in node.args)
            if node.target is operator.sub:
                node.target = operator.add


_NOT_RELU = {"sigmoid", "tanh", "gelu", "silu", "hardswish", "hardsigmoid", "elu", "softmax", "layer_norm",
             "group_norm", "relu6", "hardtanh", "exp", "log_softmax", "batch_norm"}


@torch.no_grad()
def path_norm(model: nn.Module, input_shape, bias: bool = True) -> float:
    """ℓ1 path-norm of ``model`` for inputs of ``input_shape`` (see the module docstring), in float64."""
    net = abs_network(model, tuple(input_shape), bias=bias)
    out = net(torch.ones(tuple(input_shape), dtype=torch.float64))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return float(sum(o.sum() for o in outs if torch.is_tensor(o)))
