"""Train with a pathfx plan under DistributedDataParallel (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py --mode balance --steps 100

Every rank builds the same model (same seed) and transforms it; DDP averages the gradients, and
the plan's optimizer steps on every rank: its ENorm cycle is a function of the weights, which are
identical after each synchronised step, so the replicas stay identical without extra communication.
``plan.finalize`` ends the run on every rank over the whole training set, so the BatchNorm statistics
eval mode reads are the same everywhere too.
The data are scikit-learn's bundled digits (no download), split across ranks by DistributedSampler.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pathfx
from lab.data import digits
from lab.train import evaluate


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["balance", "path"], default="balance", help="ENorm plan or G-SGD plan")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split evenly across the ranks")
    args = ap.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    data = digits()
    example = data.train[0][:1]

    torch.manual_seed(0)  # the same model on every rank (DDP also broadcasts rank 0's at wrap time)
    result = pathfx.transform(build().eval(), example, mode=args.mode)
    model, plan = result.model.train(), result.plan
    ddp = DistributedDataParallel(model)
    opt = plan.optimizer(ddp, example)
    sched = plan.scheduler(opt, args.steps)

    train_set = TensorDataset(*data.train)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch // world, sampler=sampler, drop_last=True)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()  # on every rank: SGD, then (ENorm plan) one ENorm cycle
            sched.step()
            step += 1
            if step == args.steps:
                break
        epoch += 1

    plan.finalize(model, DataLoader(TensorDataset(*data.train), batch_size=256))  # eval-mode statistics
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    loss = loss.detach()
    dist.all_reduce(loss)
    loss /= world
    if rank == 0:
        _, acc = evaluate(model, DataLoader(TensorDataset(*data.test), batch_size=256))
        same = all(torch.equal(c, flat) for c in copies)
        print(f"{plan.kind} plan ({args.mode} form), {world} ranks, {step} steps of global batch {args.batch}: "
              f"last loss {loss.item():.4f}, test accuracy {acc:.3f}, replicas identical: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
