"""P-BN: pbn eq. (3)-(5) element by element, fold for export, training a torchvision resnet18."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
import zoo
from pathfx.nn import PBN, PathLayer
from passes.fold import fold
from passes.soundness import outputs, rel_error


class SmallNet(nn.Module):
    """Widths that change (3→6→8→4), a stride-2 conv, BN after every conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_pbn_equations_elementwise():
    torch.manual_seed(0)
    net = SmallNet().double()
    x = torch.randn(6, 3, 12, 12, dtype=torch.float64)
    pm, rep = pathfx.reparameterize(net, x, pbn=True, init="paper")
    assert rep.pbn_layers == ["c2", "c3"] and isinstance(pm.get_submodule("b1"), nn.BatchNorm2d)
    with torch.no_grad():  # non-trivial affine parameters and λ
        for p in pm.modules():
            if isinstance(p, PBN):
                p.bn.weight.uniform_(0.5, 1.5)
                p.bn.bias.uniform_(-0.5, 0.5)
                p.lam.fill_(0.3)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in pm.named_modules() if isinstance(m, PBN)]
    pm.train()(x)
    for h in hooks:
        h.remove()
    for name, stride in (("c2", 2), ("c3", 1)):
        mod = pm.get_submodule(name)
        inp, out = seen[name]
        w = mod.layer.weight.detach()
        c_out, c_in = w.shape[:2]
        red = torch.zeros_like(w, dtype=torch.bool)
        for k in range(c_in):  # the generalized diagonal at the kernel centre
            red[k % c_out, k, 1, 1] = True
        assert torch.equal(red, mod.layer.red != 0)
        assert set(w[red].tolist()) <= {-1.0, 1.0}
        o_off = F.conv2d(inp, torch.where(red, torch.zeros_like(w), w), stride=stride, padding=1)  # eq. (3)
        mu = o_off.mean(dim=(0, 2, 3), keepdim=True)
        var = o_off.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        bn = mod.bn
        normed = bn.weight.view(1, -1, 1, 1) * (o_off - mu) / torch.sqrt(var + bn.eps) + bn.bias.view(1, -1, 1, 1)
        skip = torch.zeros_like(normed)  # red(x): x_k of the red source, strided like the conv
        for k in range(c_in):
            skip[:, k % c_out] += w[k % c_out, k, 1, 1] * inp[:, k, ::stride, ::stride]
        want = normed + 0.3 * skip  # eq. (5), before the ReLU
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_eval_pbn_folds_to_plain_convs():
    torch.manual_seed(1)
    net = SmallNet().double()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    pm, _ = pathfx.reparameterize(net, x, pbn=True, init="paper")
    pm.train()
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    for _ in range(3):  # move V, γ, β and the running statistics away from their initial values
        opt.zero_grad()
        pm(x).square().mean().backward()
        opt.step()
    pm.eval()
    plain = fold(pm)
    kinds = {type(m) for m in plain.modules()}
    assert PBN not in kinds and PathLayer not in kinds and nn.BatchNorm2d not in kinds
    assert rel_error(outputs(pm, [x]), outputs(plain, [x]))[0] <= 1e-12


def test_resnet18_pbn_gsgd_trains():
    torch.manual_seed(0)
    model = zoo.build("resnet18", num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    pm, rep = pathfx.reparameterize(model, x[:1], pbn=True, init="paper")
    assert rep.lam == 0.1 and len(rep.pbn_layers) == 8
    pm.train()
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(pm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
