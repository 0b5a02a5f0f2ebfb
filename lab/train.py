"""Training harness: the methods of the papers on a model and a dataset, on CPU.

Methods (what is trained, and by which plan):

* ``plain``: SGD without normalisation, the ENorm paper's Baseline: the model with its BatchNorms folded
  away (a convolutional net keeping the one BatchNorm after its classifier, as the paper's Baseline and
  ENorm do), trained with the ENorm plan's optimizer and schedule but no ENorm cycle.
* ``sgd``: the model as built, with its conventional BatchNorms, by SGD + momentum (plan ``sgd``).
* ``enorm``: ``transform(mode="balance", plan="enorm")``, then SGD with one ENorm cycle after every step
  (enorm-iclr2019 Alg. 2; a convolutional net trains with one BatchNorm after its classifier, §6.2–6.3).
* ``gsgd``: ``transform(mode="path", plan="gsgd", init="paper")``: SGD on the path values with P-BN.
* ``gsgd-bn``: G-SGD with conventional BatchNorm, the ablation of pbn-iclr2020:
  ``transform(mode="path", pbn=False, init="paper")``.

``init="paper"`` re-initializes the model for training from scratch, so the rewritten model is not the
original function: those transforms run with ``verify=False``. Every run ends with the plan's
``finalize`` (running statistics recomputed over the training data) before its final test error.
``search_lr`` picks the learning rate from the plan's grid on a validation split of the training data.

A seed fixes the model initialisation, the data order and the augmentation.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import pathfx
from pathfx import InputError

from .data import Data, load, random_crop_flip

METHODS = ("plain", "sgd", "enorm", "gsgd-bn", "gsgd")
CPU_WIDTH_DIVISOR = 8  # default width: the model's own width / 8, so that a default run takes minutes on a CPU
COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "lr")


@dataclass
class TrainResult:
    rows: list[dict]  # one per finished epoch, keys COLUMNS
    seconds_per_step: float
    test_error: float | None  # of the last finished epoch; None if none finished
    settings: dict
    stopped: str = ""  # why training stopped early ("" if it ran to the end)
    steps: int = 0
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.stopped

    def to_csv(self) -> str:
        lines = [",".join(COLUMNS)]
        for r in self.rows:
            lines.append(",".join(str(r["epoch"]) if c == "epoch" else f"{r[c]:.6g}" for c in COLUMNS))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def build_model(name: str, width: int | None = None) -> nn.Module:
    import zoo

    return zoo.build(name, **({"width": width} if width is not None else {}))


def default_width(model: str) -> int | None:
    """The builder's own ``width`` default divided by CPU_WIDTH_DIVISOR (kept as it is for a builder sized for a
    CPU already, whose ``hparams`` say ``cpu_sized``); None for builders without one."""
    import inspect

    import zoo

    build = zoo.lookup(model).build
    sig = inspect.signature(build)
    param = sig.parameters.get("width")
    if param is None:  # a builder that passes **kw on: the width of the class it returns
        cls = sig.return_annotation
        cls = getattr(build, "__globals__", {}).get(cls) if isinstance(cls, str) else cls
        param = inspect.signature(cls).parameters.get("width") if isinstance(cls, type) else None
    if param is None or not isinstance(param.default, int):
        return None
    if getattr(build, "hparams", {}).get("cpu_sized"):
        return param.default
    return max(1, param.default // CPU_WIDTH_DIVISOR)


def prepare(model: nn.Module, method: str, x: torch.Tensor, name: str = ""):
    """(model to train, its plan) for ``method``; ``model`` itself is not modified."""
    if method == "sgd":
        return copy.deepcopy(model), pathfx.Plan.baseline(model, x, name=name)
    if method == "enorm":
        r = pathfx.transform(model, x, mode="balance", plan="enorm", name=name)
        return r.model, r.plan
    if method == "plain":  # the ENorm plan's network and settings, the cycle switched off
        r = pathfx.transform(model, x, mode="balance", plan="enorm", cycles=0, name=name)
        return r.model, dataclasses.replace(r.plan, kind="sgd", enorm=None)
    if method in ("gsgd", "gsgd-bn"):
        r = pathfx.transform(model, x, mode="path", plan="gsgd", init="paper", pbn=method == "gsgd", verify=False,
                             name=name)
        return r.model, r.plan
    raise InputError(f"unknown method '{method}' (methods: {', '.join(METHODS)})")


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode."""
    model.eval()
    loss = correct = n = 0
    for x, y in loader:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


def train(model_name_or_module, method: str, data, epochs: int, batch_size: int | None = None,
          lr: float | None = None, seed: int = 0, width: int | None = None, progress: bool = True, log=None,
          max_steps: int | None = None, augment: bool | None = None, cifar_dir: str | None = None) -> TrainResult:
    """Train with ``method`` (sgd | enorm | gsgd | gsgd-bn) for ``epochs`` epochs on ``data`` (a ``Data`` or a
    dataset name: digits | mnist1d | synthetic | cifar10, the inputs shaped as the model's input).

    The plan gives the optimizer, the schedule over all steps, the batch size and the learning rate unless
    ``batch_size`` / ``lr`` override them. ``width`` goes to the zoo builder. ``log(row)`` is called after each
    epoch. ``max_steps`` caps the optimizer steps (short test runs). ``augment``: random crops (pad 4) and
    flips, by default for cifar10 only. A non-finite loss stops training; ``result.stopped`` says where.
    """
    if method not in METHODS:
        raise InputError(f"unknown method '{method}' (methods: {', '.join(METHODS)})")
    if epochs < 1:
        raise InputError(f"epochs must be at least 1 (got {epochs})")
    name = model_name_or_module if isinstance(model_name_or_module, str) else type(model_name_or_module).__name__
    torch.manual_seed(seed)
    if isinstance(model_name_or_module, str):
        import zoo

        shape = zoo.lookup(model_name_or_module).input_shape
        model = build_model(model_name_or_module, width)
    else:
        model, shape = model_name_or_module, None
    if not isinstance(data, Data):
        data = load(data, shape=tuple(shape[1:]) if shape else None, root=cifar_dir, seed=seed)
    x = data.train[0][:1].clone()
    torch.manual_seed(seed)  # the paper init of the path methods draws from the global generator
    model, plan = prepare(model, method, x, name)
    opt_settings = dict(plan.optimizer_settings)
    batch_size = batch_size or plan.schedule["batch_size"]
    if lr is not None:
        plan.optimizer_settings["lr"] = lr
    opt = plan.optimizer(model, x)
    per_epoch = math.ceil(len(data.train[1]) / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    sched = plan.scheduler(opt, total)
    train_loader, test_loader = data.loaders(batch_size, seed)
    augment = data.name == "cifar10" if augment is None else augment
    gen = torch.Generator().manual_seed(seed + 1)
    settings = {"model": name, "method": method, "data": data.name, "epochs": epochs, "batch_size": batch_size,
                "lr": plan.optimizer_settings["lr"], "momentum": opt_settings["momentum"],
                "weight_decay": opt_settings["weight_decay"], "schedule": plan.schedule["type"], "seed": seed,
                "width": width, "augment": augment, "max_steps": max_steps,
                "input_shape": list(data.input_shape), "train_size": len(data.train[1]),
                "test_size": len(data.test[1])}
    result = TrainResult([], 0.0, None, settings, model=model)
    step, step_seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum = correct = seen = 0
        lr_now = opt.param_groups[0]["lr"]
        bar = _bar(train_loader, progress, f"{method} epoch {epoch}/{epochs}")
        start = time.perf_counter()
        for xb, yb in bar:
            if step >= total:
                break
            if augment:
                xb = random_crop_flip(xb, gen, pad=4)
            t = time.perf_counter()
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if not torch.isfinite(loss):
                result.stopped = (f"loss is {loss.item()} at epoch {epoch}, step {step + 1} (lr {lr_now:g}): training "
                                  "diverged; try a smaller --lr")
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            plan.after_step()
            sched.step()
            step_seconds += time.perf_counter() - t
            step += 1
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if progress:
            bar.close()
        if result.stopped or seen == 0:
            break
        test_loss, test_acc = evaluate(model, test_loader)
        if not math.isfinite(test_loss):
            result.stopped = f"test loss is {test_loss} after epoch {epoch}: training diverged; try a smaller --lr"
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen, "test_loss": test_loss,
               "test_acc": test_acc, "seconds": time.perf_counter() - start, "lr": lr_now}
        result.rows.append(row)
        if log is not None:
            log(row)
        if result.stopped or step >= total:
            break
    if result.rows and not result.stopped:  # the plan's last step: running statistics of the trained weights
        plan.finalize(model, train_loader)
        test_loss, test_acc = evaluate(model, test_loader)
        result.rows[-1].update(test_loss=test_loss, test_acc=test_acc)
    result.steps = step
    result.seconds_per_step = step_seconds / max(step, 1)
    result.test_error = 1.0 - result.rows[-1]["test_acc"] if result.rows else None
    return result


@dataclass
class LrSearch:
    grid: list[float]
    validation_error: dict[float, float | None]  # lr -> final validation error (None: the run diverged)
    lr: float  # the chosen one: lowest validation error, the smaller lr on a tie
    result: TrainResult  # the chosen run, its test error measured on the test set
    validation_size: int


def lr_grid(model_name_or_module, method: str, data: Data, width: int | None = None) -> list[float]:
    """The learning rates of ``method``'s plan (its ``lr_grid``)."""
    model = build_model(model_name_or_module, width) if isinstance(model_name_or_module, str) \
        else model_name_or_module
    _, plan = prepare(model, method, data.train[0][:1].clone(), "")
    return list(plan.schedule["lr_grid"])


def search_lr(model_name_or_module, method: str, data: Data, epochs: int, seed: int = 0,
              width: int | None = None, fraction: float = 0.2, log=None, **kw) -> LrSearch:
    """Train with every learning rate of the plan's grid on the training data minus a validation split
    (``Data.split``); pick the one with the lowest final validation error; return it with its run, whose
    test error is measured on ``data``'s test set. The test set plays no part in the choice."""
    fit, val = data.split(fraction)
    grid = lr_grid(model_name_or_module, method, data, width)
    errors, runs = {}, {}
    for lr in grid:
        model = model_name_or_module if isinstance(model_name_or_module, str) else copy.deepcopy(model_name_or_module)
        r = train(model, method, fit, epochs, lr=lr, seed=seed, width=width, progress=False, **kw)
        errors[lr] = r.test_error if r.ok else None
        runs[lr] = r
        if log is not None:
            log(lr, errors[lr])
    finished = [lr for lr in grid if errors[lr] is not None]
    if not finished:
        raise pathfx.PathfxError(f"{method}: every learning rate of the grid {grid} diverged")
    best = min(finished, key=lambda lr: (errors[lr], lr))
    chosen = runs[best]
    test_loss, test_acc = evaluate(chosen.model, data.loaders(256)[1])
    chosen.rows[-1].update(test_loss=test_loss, test_acc=test_acc)
    chosen.test_error = 1.0 - test_acc
    return LrSearch(grid, errors, best, chosen, len(val.train[1]))


def _bar(loader, progress: bool, desc: str):
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
