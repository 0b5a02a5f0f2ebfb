"""Time of one training step with P-BN + G-SGD divided by one step with BN + SGD (pbn F.4: < 4:3).

ResNet-18 (torchvision, 10 classes) at the CIFAR input shape, batch 128, CPU, float32; both
models are built and timed in this one process, alternating, median over the timed steps.
Usage: python benchmarks/pbn.py [--batch 128] [--steps 5] [--warmup 2] [--model resnet18]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pathfx
import zoo


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = zoo.build(args.model, num_classes=10).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    path, report = pathfx.reparameterize(base, x[:2], pbn=True, init="paper")
    path.train()
    steps = {"bn_sgd": step_fn(base, x, y), "pbn_gsgd": step_fn(path, x, y)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    bn, pbn = statistics.median(times["bn_sgd"]), statistics.median(times["pbn_gsgd"])
    print(f"{args.model}, input {args.batch}x3x{args.size}x{args.size}, threads {torch.get_num_threads()}, "
          f"{len(report.pbn_layers)} P-BN layers, {len(report.path_layers)} path layers")
    print(f"BN + SGD step: {bn * 1e3:.1f} ms, P-BN + G-SGD step: {pbn * 1e3:.1f} ms (median of {args.steps})")
    print(f"ratio P-BN+G-SGD / BN+SGD: {pbn / bn:.3f} (target <= 1.15; paper < 1.333)")
    return pbn / bn


if __name__ == "__main__":
    main()
