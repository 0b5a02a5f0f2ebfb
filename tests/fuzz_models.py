"""Random small DAG models for the property tests (tests/test_fuzz.py).

A ``FuzzNet`` interprets a fixed plan: tensors are numbered in creation order (0 is the
input) and each step appends one tensor computed from earlier ones. Modules are given as
constructor source (``specs``) and initialised from ``seed``, so ``repr(net)`` is Python
code that rebuilds the exact model; hypothesis prints it for a failing example.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from passes.soundness import lively_init

FNS = {
    "relu": torch.relu,
    "relu_method": lambda t: t.relu(),
    "relu_": lambda t: t.relu_(),
    "relu_inplace": lambda t: F.relu(t, inplace=True),
    "leaky": lambda t: F.leaky_relu(t, 0.1),
    "neg": operator.neg,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "maxpool": lambda t: F.max_pool2d(t, 2),
    "avgpool": lambda t: F.avg_pool2d(t, 2),
    "gap": lambda t: F.adaptive_avg_pool2d(t, 1),
    "mean": lambda t: t.mean((2, 3)),
    "amax": lambda t: torch.amax(t, (2, 3)),
    "chsum": lambda t: t.sum(1, keepdim=True),
    "flatten": lambda t: torch.flatten(t, 1),
    "view": lambda t: t.view(t.size(0), -1),
    "nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
    "bilinear": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False),
}


# Spellings that torch.fx traces through (their classes are outside torch.nn), as timm and torchvision write them.
class BNActReLU(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a rank check, ``F.batch_norm``, then the activation."""

    act = staticmethod(torch.relu)

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        training = self.training or self.running_mean is None
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training,
                                     0.1, self.eps))


class BNActSiLU(BNActReLU):
    act = staticmethod(F.silu)


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d: the per-channel affine computed from buffers in forward."""

    def __init__(self, c):
        super().__init__()
        for name, value in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


class Blur(nn.Module):
    """timm's BlurPool2d: a fixed binomial kernel, a buffer, as the weight of a depthwise conv."""

    def __init__(self, c, stride=2):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3).clone())
        self.c, self.stride = c, stride

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=self.stride, groups=self.c)


class FLinear(nn.Linear):
    """timm's Linear: an nn.Linear subclass whose forward calls F.linear."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class DataGate(nn.Module):
    """Python control flow on a tensor's values, which symbolic tracing cannot follow: the analysis keeps
    the module opaque (an automatic leaf). ``share``: the index of a conv of the net that it calls too,
    a module used both by the traced graph and inside the opaque leaf (set by ``link``)."""

    def __init__(self, share=None):
        super().__init__()
        self.share = share

    def forward(self, x):
        y = self.inner(x) if self.share is not None else x
        if y.mean() > 0:
            return torch.relu(y)
        return 0.5 * y


def link(mods) -> None:
    """Give each DataGate the conv it shares."""
    for m in mods:
        if isinstance(m, DataGate) and m.share is not None:
            m.inner = mods[m.share]


SPEC_NAMES = {"nn": nn, "BNActReLU": BNActReLU, "BNActSiLU": BNActSiLU, "FrozenBN": FrozenBN, "Blur": Blur,
              "FLinear": FLinear, "DataGate": DataGate}

# Ops that are not part of a ReLU network: passes.pathnorm must refuse them, naming them.
NOT_RELU = {"gelu": "gelu", "tanh": "tanh", "relu6": "relu6", "sigmoid": "sigmoid", "nn.GELU": "GELU",
            "nn.Tanh": "Tanh", "nn.ReLU6": "ReLU6", "nn.LayerNorm": "LayerNorm", "nn.PReLU": "PReLU",
            "nn.ConvTranspose2d": "ConvTranspose2d", "gate": "sigmoid", "fgate": "sigmoid", "BNActSiLU": "silu",
            "DataGate": "DataGate"}


def run_op(op, ts, mods):
    kind, i, *a = op
    x = ts[i]
    if kind == "mod":
        return mods[a[0]](x)
    if kind == "fn":
        return FNS[a[0]](x)
    if kind == "add":
        return x + ts[a[0]]
    if kind == "sub":
        return x - ts[a[0]]
    if kind == "learned":  # a 1x1 conv on one branch, identity on the other
        return mods[a[1]](x) + ts[a[0]]
    if kind == "cat":
        return torch.cat([x, ts[a[0]]], 1)
    if kind == "slice":
        return x[:, a[0]:a[1]]
    if kind == "chunk":
        return x.chunk(a[0], 1)[a[1]]
    if kind == "split":
        return torch.split(x, a[0], 1)[a[1]]
    if kind == "gate":  # squeeze-and-excitation
        return x * torch.sigmoid(mods[a[1]](torch.relu(mods[a[0]](F.adaptive_avg_pool2d(x, 1)))))
    if kind == "fgate":
        return x * torch.sigmoid(mods[a[1]](torch.relu(mods[a[0]](x))))
    if kind == "scale":
        return x * a[0]
    if kind == "div":
        return x / a[0]
    if kind == "iadd":  # not `x += y`: torch.fx records that as an out-of-place add, and ts[i] would go stale
        return x.add_(ts[a[0]])
    if kind == "pw":  # a Linear over the channels of a channels-last view
        return mods[a[0]](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if kind == "shift":
        return x + a[0]
    if kind == "pad":
        return F.pad(x, (a[0],) * 4, mode=a[1])
    if kind == "ghost":  # GhostNet: a primary conv, a cheap depthwise conv of it, both concatenated
        y = mods[a[0]](x)
        return torch.cat([y, mods[a[1]](y)], 1)
    if kind == "partial":  # FasterNet's partial conv: a conv on the first channels, the others as they are
        return torch.cat([mods[a[1]](x[:, :a[0]]), x[:, a[0]:]], 1)
    raise ValueError(kind)


class FuzzNet(nn.Module):
    def __init__(self, in_shape, seed, training, specs, plan):
        super().__init__()
        self.in_shape, self.seed, self.specs, self.plan = tuple(in_shape), seed, list(specs), list(plan)
        self.mods = nn.ModuleList([eval(s, dict(SPEC_NAMES)) for s in specs])
        link(self.mods)
        lively_init(self, seed, gain=2.0)  # conv/linear weights, BatchNorm statistics and affine
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.mods:
                if isinstance(m, nn.PReLU):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                elif isinstance(m, FrozenBN):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                elif isinstance(m, nn.ConvTranspose2d):  # not one of lively_init's layers
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        self.double().train(training)

    def forward(self, x):
        ts = [x]
        for op in self.plan:
            ts.append(run_op(op, ts, self.mods))
        return ts[-1]

    def example(self, batch=2, dtype=torch.float64):
        return torch.randn((batch,) + self.in_shape, generator=torch.Generator().manual_seed(self.seed), dtype=dtype)

    def live_steps(self) -> list:
        """The steps the output depends on (tracing drops the others)."""
        need, keep = {len(self.plan)}, []
        for t in range(len(self.plan), 0, -1):
            op = self.plan[t - 1]
            inplace = op[0] == "iadd" or op[0] == "fn" and op[2] in ("relu_", "relu_inplace") or \
                op[0] == "mod" and "inplace=True" in self.specs[op[2]]
            if t in need or inplace and op[1] in need:  # a later reader of the mutated tensor needs it
                keep.append(op)
                need |= {op[1]} | ({op[2]} if op[0] in ("add", "sub", "cat", "learned", "iadd") else set())
        return keep[::-1]

    def uses(self, name: str) -> bool:
        """Whether a live step uses ``name``: a step kind, an FNS key, or a module class as 'nn.Class'."""
        steps = self.live_steps()
        mods = {op[2] for op in steps if op[0] == "mod"} | {op[3] for op in steps if op[0] == "learned"} | \
            {k for op in steps if op[0] in ("gate", "fgate", "ghost") for k in op[2:]} | \
            {op[3] for op in steps if op[0] == "partial"}
        return any(name in op for op in steps) or any(self.specs[k].startswith(name + "(") for k in mods)

    def features(self) -> set[str]:
        """What the model exercises: step kinds, functions, module classes and a few layer traits."""
        out = {op[0] for op in self.plan} | {op[2] for op in self.plan if op[0] == "fn"}
        out |= {s.split("(")[0] for s in self.specs}
        called = [op[2] for op in self.plan if op[0] == "mod"]
        if len(called) > len(set(called)):
            out.add("shared")
        for m in self.mods:
            if isinstance(m, nn.Conv2d):
                out |= {name for name, flag in [
                    ("depthwise", m.groups > 1 and m.groups == m.in_channels),
                    ("grouped", 1 < m.groups < m.in_channels), ("dilated", m.dilation != (1, 1)),
                    ("padding_mode", m.padding_mode != "zeros"), ("no-bias", m.bias is None)] if flag}
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
                out.add("train" if self.training else "eval-bn")
        return out

    def to_code(self) -> str:
        body = "".join(f"        {s!r},\n" for s in self.specs)
        steps = "".join(f"        {op!r},\n" for op in self.plan)
        return (f"FuzzNet(in_shape={self.in_shape!r}, seed={self.seed}, training={self.training},\n"
                f"    specs=[\n{body}    ],\n    plan=[\n{steps}    ])")

    def __repr__(self):
        return self.to_code()


class _Builder:
    """Draws steps one by one; a step is kept only if it runs on the current (zero) tensors."""

    def __init__(self, draw, in_shape):
        self.draw, self.specs, self.mods, self.plan = draw, [], [], []
        self.vals = [torch.zeros((1,) + in_shape)]

    def shape(self, i):
        return tuple(self.vals[i].shape[1:])

    def push(self, op, specs=()):
        mods = self.mods + [eval(s, dict(SPEC_NAMES)) for s in specs]
        link(mods)
        try:
            with torch.no_grad():
                out = run_op(op, self.vals, [m.eval() for m in mods])
        except (RuntimeError, ValueError, IndexError):  # a kernel larger than its input, and the like
            return False
        if out.numel() == 0 or max(out.shape) > 2000:
            return False
        self.specs += specs
        self.mods = mods
        self.plan.append(op)
        self.vals.append(out)
        return True

    def new(self, k=0):
        return len(self.specs) + k  # index of the k-th module a step adds

    def pick(self, pred=lambda s: True, first=1):
        """A tensor from ``first`` on satisfying ``pred``, mostly the latest (None if none does).
        The input (0) is left to second operands: a step on it would mostly start a dead branch."""
        idx = [j for j in range(first, len(self.vals)) if pred(self.shape(j))]
        if not idx:
            return None
        return idx[-1 - min(self.draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3])), len(idx) - 1)]


# Step kinds, repeated by weight.
SPATIAL = ["conv"] * 5 + ["act"] * 4 + ["shared", "pool", "bn", "add", "learned", "inplace"] * 2 + [
    "norm", "cat", "slice", "chunk", "split", "gate", "scale", "shift", "pad", "up", "flatten", "gap", "pointwise",
    "reduce", "deconv", "bnact", "frozen", "blur", "ghost", "partial", "untraceable"]
FLAT = ["linear"] * 3 + ["act"] * 3 + ["shared", "bn"] * 2 + ["norm", "add", "cat", "slice", "chunk", "fgate",
                                                              "scale", "inplace"]
RELU_LIKE = ["fn:relu", "fn:relu_method", "fn:leaky", "nn.ReLU()", "nn.LeakyReLU(0.2)", "nn.PReLU()", "prelu_c",
             "nn.Identity()"]
BARRIERS = ["fn:gelu", "fn:tanh", "fn:relu6", "fn:sigmoid", "nn.GELU()", "nn.Tanh()", "nn.ReLU6()"]


def _conv_spec(d, c, out=None, k=None):
    out = out or d(st.integers(1, 6))
    k = k or d(st.sampled_from([1, 2, 3]))
    depthwise = d(st.integers(0, 4)) == 0
    if depthwise:
        groups, out = c, c * d(st.integers(1, 2))
    else:
        groups = d(st.sampled_from([g for g in (1, 1, 2, 3) if c % g == 0 and out % g == 0]))
    stride, pad, dil = d(st.sampled_from([1, 1, 2])), d(st.integers(0, 2)), d(st.sampled_from([1, 1, 2]))
    mode = d(st.sampled_from(["zeros"] * 4 + ["reflect", "replicate", "circular"])) if pad else "zeros"
    return f"nn.Conv2d({c}, {out}, {k}, {stride}, {pad}, {dil}, {groups}, {d(st.booleans())}, {mode!r})"


def _act(b, i, c):
    a = b.draw(st.sampled_from(RELU_LIKE * 3 + BARRIERS))
    if a.startswith("fn:"):
        return b.push(("fn", i, a[3:]))
    if a == "prelu_c":
        a = f"nn.PReLU({c})"
    return b.push(("mod", i, b.new()), [a])


def _spatial_step(b, op, i):
    d = b.draw
    c, h, w = b.shape(i)
    if op == "conv":
        return b.push(("mod", i, b.new()), [_conv_spec(d, c)])
    if op == "shared":
        convs = [k for k, m in enumerate(b.mods) if isinstance(m, nn.Conv2d) and m.in_channels == c]
        return bool(convs) and b.push(("mod", i, d(st.sampled_from(convs))))
    if op == "act":
        return _act(b, i, c)
    if op == "pool":
        kind = d(st.sampled_from(["fn:maxpool", "fn:avgpool", "max", "avg", "amax", "aavg"]))
        if kind.startswith("fn:"):
            return b.push(("fn", i, kind[3:]))
        if kind in ("amax", "aavg"):
            size = (d(st.integers(1, h)), d(st.integers(1, w)))
            spec = f"nn.Adaptive{'Max' if kind == 'amax' else 'Avg'}Pool2d({size})"
        else:
            k = d(st.integers(2, 3))
            args = f"{k}, {d(st.integers(1, 2))}, {d(st.integers(0, k // 2))}"
            ceil = d(st.booleans())
            spec = f"nn.MaxPool2d({args}, ceil_mode={ceil})" if kind == "max" else \
                f"nn.AvgPool2d({args}, ceil_mode={ceil}, count_include_pad={d(st.booleans())})"
        return b.push(("mod", i, b.new()), [spec])
    if op == "bn":
        return b.push(("mod", i, b.new()), [f"nn.BatchNorm2d({c})"])
    if op == "norm":
        return b.push(("mod", i, b.new()), [f"nn.LayerNorm({(c, h, w) if d(st.booleans()) else w})"])
    if op in ("add", "cat"):
        j = b.pick(lambda s: s[1:] == (h, w) and (op == "cat" or s[0] == c) and (op == "add" or s[0] + c <= 10), 0)
        return j is not None and b.push((d(st.sampled_from(["add", "add", "sub"])) if op == "add" else "cat", i, j))
    if op == "learned":
        stride = d(st.sampled_from([1, 2]))
        j = b.pick(lambda s: len(s) == 3 and s[1:] == ((h - 1) // stride + 1, (w - 1) // stride + 1), 0)
        return j is not None and b.push(
            ("learned", i, j, b.new()), [f"nn.Conv2d({c}, {b.shape(j)[0]}, 1, {stride}, bias={d(st.booleans())})"])
    if op == "gate":
        r = d(st.integers(1, 4))
        return b.push(("gate", i, b.new(), b.new(1)), [f"nn.Conv2d({c}, {r}, 1)", f"nn.Conv2d({r}, {c}, 1)"])
    if op == "pad":
        return b.push(("pad", i, d(st.integers(1, 2)), d(st.sampled_from(["constant", "reflect", "replicate"]))))
    if op == "up":
        return h <= 6 and b.push(("fn", i, d(st.sampled_from(["nearest", "bilinear"]))))
    if op == "flatten":
        how = d(st.sampled_from(["flatten", "view", "module"]))
        return b.push(("mod", i, b.new()), ["nn.Flatten()"]) if how == "module" else b.push(("fn", i, how))
    if op == "gap":
        return b.push(("fn", i, "gap"))
    if op == "pointwise":
        return b.push(("pw", i, b.new()), [f"nn.Linear({c}, {d(st.integers(1, 6))}, {d(st.booleans())})"])
    if op == "reduce":
        return b.push(("fn", i, d(st.sampled_from(["mean", "amax", "chsum"]))))
    if op == "bnact":
        return b.push(("mod", i, b.new()), [f"{d(st.sampled_from(['BNActReLU', 'BNActSiLU']))}({c})"])
    if op == "frozen":
        return b.push(("mod", i, b.new()), [f"FrozenBN({c})"])
    if op == "blur":
        return h >= 2 and w >= 2 and b.push(("mod", i, b.new()), [f"Blur({c}, {d(st.sampled_from([1, 2]))})"])
    if op == "ghost":
        m = d(st.integers(1, 4))
        return b.push(("ghost", i, b.new(), b.new(1)), [f"nn.Conv2d({c}, {m}, 1)", f"nn.Conv2d({m}, {m}, 3, 1, 1, "
                                                                                    f"groups={m})"])
    if op == "partial":
        k = d(st.integers(1, c))
        return b.push(("partial", i, k, b.new()), [f"nn.Conv2d({k}, {k}, 3, 1, 1, bias=False)"])
    if op == "deconv":
        return b.push(("mod", i, b.new()), [f"nn.ConvTranspose2d({c}, {d(st.integers(1, 4))}, 2, 2)"])
    if op == "untraceable":
        convs = [k for k, m in enumerate(b.mods) if type(m) is nn.Conv2d and m.in_channels == c]
        return b.push(("mod", i, b.new()), [f"DataGate({d(st.sampled_from([None] + convs))})"])
    return _channel_step(b, op, i, c)


def _flat_step(b, op, i):
    d = b.draw
    (f,) = b.shape(i)
    if op == "linear":
        return b.push(("mod", i, b.new()), [f"nn.Linear({f}, {d(st.integers(1, 8))}, {d(st.booleans())})"])
    if op == "shared":
        fcs = [k for k, m in enumerate(b.mods) if isinstance(m, nn.Linear) and m.in_features == f]
        return bool(fcs) and b.push(("mod", i, d(st.sampled_from(fcs))))
    if op == "act":
        return _act(b, i, f)
    if op == "bn":
        return b.push(("mod", i, b.new()), [f"nn.BatchNorm1d({f})"])
    if op == "norm":
        return b.push(("mod", i, b.new()), [f"nn.LayerNorm({f})"])
    if op in ("add", "cat"):
        j = b.pick(lambda s: len(s) == 1 and (s[0] == f if op == "add" else s[0] + f <= 40), 0)
        return j is not None and b.push((op, i, j))
    if op == "fgate":
        r = d(st.integers(1, 4))
        return b.push(("fgate", i, b.new(), b.new(1)), [f"nn.Linear({f}, {r})", f"nn.Linear({r}, {f})"])
    return _channel_step(b, op, i, f)


def _channel_step(b, op, i, c):
    d = b.draw
    if op == "slice":
        if c < 2:
            return False
        lo = d(st.integers(0, c - 2))
        return b.push(("slice", i, lo, d(st.integers(lo + 1, c))))
    if op == "chunk":
        n = d(st.integers(2, 3))
        return c >= n and b.push(("chunk", i, n, d(st.integers(0, n - 1))))
    if op == "split":
        size = d(st.integers(1, max(1, c - 1)))
        return b.push(("split", i, size, d(st.integers(0, (c - 1) // size))))
    if op == "scale":
        kind = d(st.sampled_from(["scale", "div", "neg"]))
        return b.push(("fn", i, "neg") if kind == "neg" else (kind, i, d(st.sampled_from([0.5, 2.0, -1.5]))))
    if op == "inplace":
        # not on the input, a view, or a tensor with views: eager and traced aliasing would differ,
        # which is no property of the library
        v = b.vals[i]
        if i == 0 or v._base is not None or any(u._base is v for u in b.vals):
            return False
        kind = d(st.sampled_from(["relu_", "relu_inplace", "module", "iadd"]))
        if kind == "iadd":
            j = b.pick(lambda s: s == b.shape(i), 0)
            return b.push(("iadd", i, j))
        return b.push(("mod", i, b.new()), ["nn.ReLU(inplace=True)"]) if kind == "module" else b.push(("fn", i, kind))
    if op == "shift":
        return b.push(("shift", i, d(st.sampled_from([1.0, 0.0]))))
    raise ValueError(op)


def _pbn_block(b):
    """layer-BN-ReLU-layer-BN on the last tensor: the second layer reads a free group and
    writes toward the output, so the path form has red weights followed by BN (a P-BN)."""
    d, i = b.draw, len(b.vals) - 1
    spatial = len(b.shape(i)) == 3
    c0, c1, c2 = b.shape(i)[0], d(st.integers(2, 6)), d(st.integers(2, 6))
    layer = (lambda a, z: f"nn.Conv2d({a}, {z}, 3, padding=1)") if spatial else (lambda a, z: f"nn.Linear({a}, {z})")
    bn = "nn.BatchNorm2d" if spatial else "nn.BatchNorm1d"
    for k, spec in enumerate([layer(c0, c1), f"{bn}({c1})", None, layer(c1, c2), f"{bn}({c2})"]):
        ok = b.push(("fn", i + k, "relu")) if spec is None else b.push(("mod", i + k, b.new()), [spec])
        assert ok, spec


@st.composite
def fuzz_nets(draw, max_steps: int = 10, pbn: bool = False):
    """A random FuzzNet (float64); with ``pbn`` its last layers are ``_pbn_block``."""
    in_shape = (draw(st.integers(1, 3)), draw(st.integers(6, 10)), draw(st.integers(6, 10)))
    b = _Builder(draw, in_shape)
    # A stem conv and a ReLU, so that most models have free variables.
    c = draw(st.integers(2, 6))
    if not b.push(("mod", 0, 0), [_conv_spec(draw, in_shape[0], out=c, k=3)]):
        b.push(("mod", 0, 0), [f"nn.Conv2d({in_shape[0]}, {c}, 3, padding=1)"])
    b.push(("fn", 1, "relu"))
    if draw(st.integers(0, 3)):  # and mostly a second conv: a free group right away
        _spatial_step(b, "conv", 2)
    for _ in range(draw(st.integers(1, max_steps))):
        i = b.pick()
        if len(b.shape(i)) == 3:
            _spatial_step(b, draw(st.sampled_from(SPATIAL)), i)
        else:
            _flat_step(b, draw(st.sampled_from(FLAT)), i)
    if pbn:
        _pbn_block(b)
    last = len(b.vals) - 1
    head = draw(st.sampled_from(["none", "linear", "linear", "linear", "gap", "gap"]))
    if head == "gap" and len(b.shape(last)) == 3:
        b.push(("fn", last, "gap"))
        b.push(("fn", last + 1, "flatten"))
    elif head != "none" and len(b.shape(last)) == 3:
        b.push(("fn", last, "flatten"))
    if head != "none":
        fc = draw(st.sampled_from(["nn.Linear", "nn.Linear", "FLinear"]))
        b.push(("mod", len(b.vals) - 1, b.new()), [f"{fc}({b.shape(len(b.vals) - 1)[0]}, 3)"])
    has_bn = any("BatchNorm" in s for s in b.specs)
    # the mode only matters for BatchNorm; a traced F.batch_norm keeps the mode it was traced in, so a
    # net with a fused norm-activation is drawn in eval mode only
    training = has_bn and not any(s.startswith("BNAct") for s in b.specs) and draw(st.booleans())
    return FuzzNet(in_shape, draw(st.integers(0, 2 ** 16)), training, b.specs, b.plan)
