"""Cost of group discovery relative to what any fx user already pays.

Prints, per model, time(find_groups) / time(symbolic_trace + one eager forward at batch 1),
medians over repeats, measured in this one process. Target: <= 1.5.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.fx as fx

import pathfx
import zoo


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, repeats: int = 5) -> tuple[float, float]:
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    x = torch.randn(*zoo.lookup(name).input_shape)

    def baseline():
        fx.symbolic_trace(model)
        with torch.no_grad():
            model(x)

    baseline()
    pathfx.find_groups(model, x)  # warm-up: imports, allocator
    return median_time(lambda: pathfx.find_groups(model, x), repeats), median_time(baseline, repeats)


def main(names) -> None:
    torch.set_num_threads(1)
    print(f"{'model':<14} {'find_groups s':>14} {'trace+forward s':>16} {'ratio':>7}")
    for name in names:
        ours, base = measure(name)
        print(f"{name:<14} {ours:>14.3f} {base:>16.3f} {ours / base:>7.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet50", "vit_b_16", "densenet121"])
