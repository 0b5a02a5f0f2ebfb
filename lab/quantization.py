"""The quantization study: per-tensor int8 accuracy of networks trained on digits, as trained and balanced.

Per model and seed: train with the lab's harness (``train(model, "sgd", ...)``: SGD with momentum and
BatchNorm, the baseline plan) on digits at 3×32×32; fold the BatchNorms (``pathfx.analysis.prepare``);
derive the variants below; export each to int8 with ``pathfx.export_onnx(quantize="int8")``
(onnxruntime.quantization, QDQ, MinMax calibration on ``Config.calibration`` training images) and
measure, under onnxruntime, the test accuracy and the float-vs-int8 logit error:

* ``trained``: the BN-folded model, weights per tensor;
* ``cle``: torch.ao's cross-layer equalization (``torch.ao.quantization._equalize.equalize``) of the
  BN-folded model over every pair it supports (``cle_pairs``), per tensor;
* ``p2`` / ``pinf``: ``pathfx.enorm`` with p = 2 / p = ∞ over all rescaling groups, per tensor;
* ``per_channel``: the BN-folded model with one weight scale per output channel, the reference.

Every variant computes the float model's function; the float accuracy is measured once per variant and the
report says whether they agree. p = ∞ is measured when ``pathfx.enorm`` accepts it (``p_inf_available``).
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import pathfx
from pathfx import InputError
from pathfx.analysis import prepare

VARIANTS = ("trained", "cle", "p2", "pinf", "per_channel")
LABELS = {"trained": "as trained", "cle": "torch.ao CLE", "p2": "pathfx p = 2", "pinf": "pathfx p = ∞",
          "per_channel": "per-channel"}
MODELS = ("resnet18", "vgg11_bn_small", "dwsep_net", "mobilenet_v2_relu")
# What passes between the two layers of a CLE pair: positively homogeneous, channel by channel.
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.flatten}
_PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)


@dataclass
class Config:
    models: tuple = MODELS
    seeds: tuple = (0, 1, 2)
    epochs: int = 12
    size: int = 32  # digits resized to 3×size×size
    batch: int = 50  # the example's batch: the ONNX graph's fixed batch size (450 test images = 9 batches)
    calibration: int = 200  # training images the MinMax calibration sees
    max_steps: int | None = None
    threads: int = 1
    build: dict = field(default_factory=dict)  # model name -> builder keyword arguments (quick runs: widths)

    def check(self) -> None:
        import zoo

        if not self.models or not self.seeds:
            raise InputError("the study needs at least one model and one seed")
        for name in self.models:
            zoo.lookup(name)
        if min(self.epochs, self.size, self.batch, self.calibration, self.threads) < 1:
            raise InputError("epochs, size, batch, calibration and threads must be at least 1")
        if self.calibration % self.batch:
            raise InputError(f"calibration ({self.calibration}) must be a multiple of batch ({self.batch})")


@dataclass
class Run:
    """One model trained with one seed, and its variants under int8."""
    model: str
    seed: int
    train_seconds: float
    torch_accuracy: float  # the trained model in torch, float32
    cle_pairs: int
    float_accuracy: dict = field(default_factory=dict)  # variant -> float ONNX test accuracy
    accuracy: dict = field(default_factory=dict)  # variant -> int8 test accuracy
    mean_abs: dict = field(default_factory=dict)  # variant -> mean |float − int8| logit on the test set
    agreement: dict = field(default_factory=dict)  # variant -> fraction of test images with the float's class


@dataclass
class Study:
    config: Config
    runs: list[Run]
    variants: tuple  # the variants measured (without pinf when pathfx.enorm refuses p = ∞)
    settings: dict  # pathfx's int8 settings (format, types, calibration method)
    seconds: float
    train_size: int
    test_size: int


def p_inf_available() -> bool:
    """Whether this build's ``pathfx.enorm`` balances with p = ∞ (earlier builds refuse p = inf)."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    try:
        pathfx.enorm(net, torch.ones(1, 2), p=math.inf, cycles=1)
    except InputError:
        return False
    return True


def cle_pairs(gm: torch.fx.GraphModule) -> list[list[str]]:
    """The (layer, next layer) pairs torch.ao's ``equalize`` supports in a BN-folded graph: a Conv2d or Linear
    whose output reaches the next one through ReLU / pooling / flatten alone, used nowhere else (a residual
    add or a concatenation ends the pair), and whose channels are the next layer's input channels one to one
    (not a depthwise conv: torch.ao reads its input channels from the weight's axis 1)."""
    mods = dict(gm.named_modules())
    layer = lambda n: n.op == "call_module" and type(mods[n.target]) in (nn.Conv2d, nn.Linear)  # noqa: E731
    passes = lambda n: (n.op == "call_function" and n.target in _PASS_FUNCTIONS) or \
        (n.op == "call_method" and n.target in ("relu", "flatten")) or \
        (n.op == "call_module" and isinstance(mods[n.target], _PASS_MODULES))  # noqa: E731
    pairs = []
    for node in gm.graph.nodes:
        if not layer(node):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if layer(nxt):
                a, b = mods[node.target], mods[nxt.target]
                if getattr(b, "groups", 1) == 1 and a.weight.shape[0] == b.weight.shape[1]:
                    pairs.append([node.target, nxt.target])
                break
            if not passes(nxt):
                break
            cur = nxt
    return pairs


def variants(model: nn.Module, x: torch.Tensor, measured: tuple) -> tuple[dict, int]:
    """({variant: (model to export, per_channel)}, number of CLE pairs); ``model`` is not modified."""
    from torch.ao.quantization._equalize import equalize

    folded = copy.deepcopy(prepare(model, x)).eval()  # prepare may share untouched leaves with the model
    pairs = cle_pairs(folded)
    out = {"trained": (folded, False), "per_channel": (folded, True)}
    if "cle" in measured:
        out["cle"] = (equalize(copy.deepcopy(folded), pairs, inplace=True) if pairs else folded, False)
    for name, p in (("p2", 2.0), ("pinf", math.inf)):
        if name in measured:
            out[name] = (pathfx.enorm(model, x, p=p)[0], False)
    return out, len(pairs)


def measure(name: str, seed: int, cfg: Config, data, measured: tuple, log) -> tuple[Run, dict]:
    """Train one model with one seed and measure every variant; (run, pathfx's int8 settings)."""
    import zoo

    from .train import train

    torch.manual_seed(seed)
    model = zoo.build(name, num_classes=data.num_classes, **cfg.build.get(name, {}))
    start = time.perf_counter()
    result = train(model, "sgd", data, cfg.epochs, seed=seed, progress=False, max_steps=cfg.max_steps)
    seconds = time.perf_counter() - start
    if result.stopped:
        raise pathfx.PathfxError(f"{name} seed {seed}: {result.stopped}")
    trained, acc = result.model.eval(), result.rows[-1]["test_acc"]
    x = data.train[0][:cfg.batch]
    models, n_pairs = variants(trained, x, measured)
    run, settings = Run(name, seed, seconds, acc, n_pairs), {}
    with tempfile.TemporaryDirectory(prefix="pathfx-quantization-") as d:
        for v in measured:
            net, per_channel = models[v]
            rep = pathfx.export_onnx(net, os.path.join(d, f"{v}.onnx"), x, quantize="int8",
                                     calibration=data.train[0][:cfg.calibration], per_channel=per_channel,
                                     labels=data.test, exporter="torchscript").quantization
            run.float_accuracy[v], run.accuracy[v] = rep.accuracy_float, rep.accuracy_int8
            run.mean_abs[v], run.agreement[v] = rep.errors[-1].mean_abs, rep.errors[-1].argmax_agreement
            settings = rep.settings
    log(f"{name} seed {seed}: trained {seconds:.0f} s, float {acc:.2%}; int8 " +
        ", ".join(f"{v} {run.accuracy[v]:.2%}" for v in measured))
    return run, settings


def check_outputs(out: str, force: bool) -> str:
    """The PNG's path beside ``out``; refuses before any work, not after half an hour of it."""
    if not out.endswith(".md"):
        raise InputError(f"the report is markdown: '{out}' does not end in .md")
    png = out[:-3] + ".png"
    for path in (out, png):
        if os.path.exists(path) and not force:
            raise InputError(f"output file '{path}' exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write '{out}': directory '{directory}' does not exist")
    return png


def run(cfg: Config, out: str = "docs/quantization.md", force: bool = False,
        command: str = "pathfx quantization", log=print) -> Study:
    """Run the study and write ``out`` and its figure (same name, .png)."""
    from pathfx.commands import write_atomic

    from .data import digits
    from .quantization_md import figure, markdown

    cfg.check()
    png = check_outputs(out, force)
    measured = tuple(v for v in VARIANTS if v != "pinf" or p_inf_available())
    if "pinf" not in measured:
        log("pathfx.enorm refuses p = inf in this build: the p = ∞ column is left out")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    try:
        data = digits((3, cfg.size, cfg.size))
        runs, settings = [], {}
        for name in cfg.models:
            for seed in cfg.seeds:
                r, settings = measure(name, seed, cfg, data, measured, log)
                runs.append(r)
    finally:
        torch.set_num_threads(threads)
    study = Study(cfg, runs, measured, settings, time.perf_counter() - start, len(data.train[1]), len(data.test[1]))
    write_atomic(png, figure(study), force=force, binary=True)
    write_atomic(out, markdown(study, os.path.basename(png), command), force=force)
    log(f"wrote {out} and {png} ({study.seconds / 60:.1f} min)")
    return study


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
