"""Cost of ENorm in training relative to the optimizer step it follows.

Prints, on resnet18 (CPU, float32, BN folded so that every group is free), the median time of
one ENorm cycle including the momentum-buffer rescale, divided by the median time of one
``torch.optim.SGD(momentum=0.9, foreach=True).step()`` on the same parameters, both measured
in this one process after a warm-up. Target: <= 1.5. The same step with the compiled loops
switched off (ATen operations only) is measured alongside.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import zoo
from passes import kernels
from passes.manager import prepare
from pathfx.optim import ENorm


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median time of each function, calling them in turn so that load from elsewhere hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def measure(name: str = "resnet18", repeats: int = 30, threads: tuple = (1, None)):
    """(threads, ENorm step s, SGD step s) per thread count, and the number of parameters."""
    torch.manual_seed(0)
    x = torch.randn(*zoo.lookup(name).input_shape)
    model = prepare(zoo.build(name).eval(), x)  # BN folded: the network ENorm trains (no BN barriers)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # creates the momentum buffers
    enorm = ENorm(model, opt, x)

    def aten_only():
        with kernels.disabled():
            enorm.step()

    default = torch.get_num_threads()
    rows = []
    for n in threads:
        torch.set_num_threads(n or default)
        for _ in range(3):  # warm-up
            opt.step()
            enorm.step()
            aten_only()
        rows.append((n or default, *interleaved_medians([enorm.step, aten_only, opt.step], repeats)))
    torch.set_num_threads(default)
    return rows, sum(p.numel() for p in params)


def main(argv) -> None:
    name = argv[0] if argv else "resnet18"
    rows, n = measure(name)
    print(f"{name}: {n / 1e6:.1f}M parameters (float32, CPU); medians of interleaved runs")
    print(f"compiled loops (passes/kernels.c): {'yes' if kernels.lib() else 'no, ATen only'}")
    print(f"{'threads':>7}  {'ENorm cycle + momentum ms':>25}  {'SGD(momentum=0.9, foreach) ms':>29}  {'ratio':>6}"
          f"  {'ATen only ms':>12}  {'ratio':>6}")
    for threads, t_enorm, t_aten, t_sgd in rows:
        print(f"{threads:>7}  {t_enorm * 1e3:>25.2f}  {t_sgd * 1e3:>29.2f}  {t_enorm / t_sgd:>6.2f}"
              f"  {t_aten * 1e3:>12.2f}  {t_aten / t_sgd:>6.2f}")
    print("target: ratio <= 1.5")


if __name__ == "__main__":
    main(sys.argv[1:])
