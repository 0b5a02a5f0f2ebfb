"""Time of one training step with P-BN + G-SGD divided by one step with BN + SGD (pbn F.4: < 4:3).

ResNet-18 (torchvision, 10 classes) at the CIFAR input shape, batch 128, CPU, float32; both
models are built and timed in this one process, alternating step by step after a warm-up,
with a fixed number of intra-op threads; the ratio is that of the median step times, and the
spread (min–max of the per-round ratios) is printed with it. One thread by default: on a
shared machine a multi-threaded step waits for its slowest thread and the figure is noise.
Usage: python benchmarks/pbn.py [--batch 128] [--steps 9] [--warmup 3] [--threads 1] [--model resnet18]
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
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = zoo.build(args.model, num_classes=10).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    path, report = pathfx.reparameterize(base, x[:2], pbn=True, init="paper")
    path.train()
    steps = {"bn_sgd": step_fn(base, x, y), "pbn_gsgd": step_fn(path, x, y)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        order = list(steps.items()) if i % 2 == 0 else list(reversed(steps.items()))
        for name, step in order:
            t = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    bn, pbn = statistics.median(times["bn_sgd"]), statistics.median(times["pbn_gsgd"])
    rounds = sorted(a / b for a, b in zip(times["pbn_gsgd"], times["bn_sgd"]))
    print(f"{args.model}, input {args.batch}x3x{args.size}x{args.size}, threads {torch.get_num_threads()}, "
          f"{len(report.pbn_layers)} P-BN layers, {len(report.path_layers)} path layers")
    print(f"BN + SGD step: {bn * 1e3:.1f} ms, P-BN + G-SGD step: {pbn * 1e3:.1f} ms "
          f"(median of {args.steps} after {args.warmup} warm-up)")
    print(f"ratio P-BN+G-SGD / BN+SGD: {pbn / bn:.3f}, per-round ratios {rounds[0]:.3f}..{rounds[-1]:.3f} "
          f"(target <= 1.15; paper < 1.333)")
    return pbn / bn


if __name__ == "__main__":
    main()
