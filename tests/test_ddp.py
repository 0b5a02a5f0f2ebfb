"""The ENorm and G-SGD plans under DistributedDataParallel: gloo, two CPU processes.

Each rank trains a replica on its half of every global batch; DDP averages the gradients, so
after each step the replicas hold the same weights, and ``plan.after_step()`` (an ENorm cycle
computed from those weights) rescales them identically on every rank with no communication.
After 20 steps the replicas must be bit-identical and equal a single-process run on the global
batches (float64, to rounding).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import pathfx
from util import lively

WORLD, STEPS, BATCH = 2, 20, 8  # BATCH is the global batch: BATCH // WORLD samples per rank
DEADLINE = 120  # seconds; a hung collective must fail the test, not the whole run
CONFIGS = [("cnn", "balance"), ("cnn", "path"), ("mlp", "balance"), ("mlp", "path")]
SHAPES = {"cnn": (1, 1, 8, 8), "mlp": (1, 16)}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                            nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))
    else:
        net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    return lively(net).double().eval()


def batch(name: str, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((BATCH,) + SHAPES[name][1:], generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (BATCH,), generator=g)


def transformed(name: str, mode: str):
    example = torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = pathfx.transform(build(name), example, mode=mode)
    return r.model.train(), r.plan, example


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train(name: str, mode: str, rank: int | None = None):
    """20 plan steps; ``rank`` None: one process on the global batches, else this rank's half under DDP."""
    model, plan, example = transformed(name, mode)
    net = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = plan.optimizer(net, example)
    for step in range(STEPS):
        x, y = batch(name, step)
        opt.zero_grad()
        if rank is not None:
            part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            loss = F.cross_entropy(net(x[part]), y[part])
        elif has_bn(model):  # DDP's BatchNorm normalises each replica's half (SyncBatchNorm is CUDA-only)
            loss = sum(F.cross_entropy(net(xs), ys) for xs, ys in zip(x.chunk(WORLD), y.chunk(WORLD))) / WORLD
        else:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        plan.after_step()
    cycles = opt.hook.report.cycles if plan.kind == "enorm" else 0
    return model, cycles


def _worker(rank: int, store: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for name, mode in CONFIGS:
            model, cycles = train(name, mode, rank)
            result[f"{name}-{mode}"] = ({k: v.clone() for k, v in model.state_dict().items()}, cycles)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    # fork: the workers inherit the imported modules (importing torchvision again costs seconds per process)
    ctx = mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False,
                             start_method="fork")
    while not ctx.join(timeout=1):  # raises, naming the rank, when a worker fails
        if time.perf_counter() - start > DEADLINE:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP workers did not finish within {DEADLINE} s")
    seconds = time.perf_counter() - start
    print(f"\nDDP run: {WORLD} processes, {len(CONFIGS)} configurations x {STEPS} steps in {seconds:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name, mode", CONFIGS)
def test_replicas_are_identical_and_match_one_process(ddp_run, name, mode):
    key = f"{name}-{mode}"
    (state0, cycles0), (state1, cycles1) = ddp_run[0][key], ddp_run[1][key]
    assert state0.keys() == state1.keys()
    # BatchNorm running statistics are the one per-replica state: each rank's last forward updates its
    # own, and DDP broadcasts rank 0's at the start of the next forward. Everything else is shared.
    local = {k for k in state0 if k.endswith(("running_mean", "running_var"))}
    differ = [k for k in state0 if k not in local and not torch.equal(state0[k], state1[k])]
    assert differ == [], f"replicas differ in {differ}"
    # the path CNN keeps its BatchNorms (P-BN); the balanced CNN trains with one after its classifier
    assert len(local) == {"cnn-path": 6, "cnn-balance": 2}.get(key, 0)
    assert cycles0 == cycles1 == (STEPS if mode == "balance" else 0)  # one ENorm cycle per step, on each rank

    single, cycles = train(name, mode)
    assert cycles == cycles0
    start = transformed(name, mode)[0]
    worst = 0.0
    for k, p in single.named_parameters():
        assert not torch.equal(p, start.get_parameter(k))  # it trained
        worst = max(worst, float((state0[k] - p.detach()).abs().max() / p.detach().abs().max()))
    print(f"\n{key}: max rel. difference DDP vs one process after {STEPS} steps {worst:.2e}")
    assert worst <= 1e-10
