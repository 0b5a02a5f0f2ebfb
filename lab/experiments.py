"""The reproduction report behind `pathfx experiments`: the papers' experiments at CPU size, one markdown
file with its figures.

1. The training methods of lab.train (SGD without normalisation, SGD+BN, ENorm, G-SGD+BN, G-SGD+P-BN) on
   a PlainNet on scikit-learn's digits and on an MLP, a CNN and a deep plain CNN on MNIST-1D: the learning
   rate of each method chosen from its plan's grid on a validation split of the training data, then
   several seeds at that rate: final test error and time per step (pbn §5.1 Table 1, enorm §6).
2. BN vs P-BN at initialisation: σ and gradient norm per layer of a stacked CNN (pbn §5.2, `pathfx observe`).
3. ENorm re-balancing a deliberately unbalanced 20-layer MLP (enorm Annex A, `pathfx enorm --plot`).
4. What the numbers say about the papers' claims (the sentences are written in pathfx/experiments_md.py).

Every file is checked before the first run (nothing is overwritten without ``force``) and written whole
(temporary file, then rename) after the last one.
"""
from __future__ import annotations

import io
import os
import platform
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace

import torch
import torch.nn as nn

from pathfx import InputError
from pathfx.commands import write_atomic

from .experiments_md import duration, markdown
from .plots import curves
from .train import COLUMNS, METHODS, LrSearch, TrainResult, build_model, search_lr, train

MODELS = ("plainnet18", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_plain")
MIN_ANNEX_LAYERS = 12  # Annex A scales layers 6 and 12


@dataclass
class Config:
    models: tuple = MODELS
    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2, 3, 4)
    epochs: int = 20  # on digits
    epochs_mnist1d: int = 60  # MNIST-1D's nets are small and its runs short; G-SGD + P-BN needs ~60 (F.1 trains long)
    lr_search: bool = True  # each method's lr from its plan's grid, on a validation split (seed of the first run)
    size: int = 16  # height and width of the digits seen by convnets (the images are 8×8)
    max_steps: int | None = None
    observe_depth: int = 50  # pbn §5.2: 50 layers of 128 channels, batch 128
    observe_width: int = 128
    observe_batch: int = 128
    annex_layers: int = 20  # enorm Annex A: 20 layers of 500 × 500
    annex_width: int = 500
    threads: int = 1

    @classmethod
    def quick(cls) -> "Config":
        """Every model and method, two seeds, a few epochs, small observation and Annex A nets: the whole
        report in a few minutes, to check it end to end (its numbers are not the study's)."""
        return cls(seeds=(0, 1), epochs=2, epochs_mnist1d=4, observe_depth=10, observe_width=32, observe_batch=32,
                   annex_layers=12, annex_width=50)

    def epochs_of(self, data: str) -> int:
        return self.epochs_mnist1d if data == "mnist1d" else self.epochs

    def check(self) -> None:
        import zoo

        if not self.models or not self.methods or not self.seeds:
            raise InputError("experiments need at least one model, one method and one seed")
        for m in self.methods:
            if m not in METHODS:
                raise InputError(f"unknown method '{m}' (methods: {', '.join(METHODS)})")
        for name in self.models:
            zoo.lookup(name)  # an unknown name fails now, with the closest names, not after an hour
        if min(self.epochs, self.epochs_mnist1d) < 1 or self.size < 1 or self.threads < 1:
            raise InputError("epochs, size and threads must be at least 1")
        if self.annex_layers < MIN_ANNEX_LAYERS:
            raise InputError(f"the Annex A network needs at least {MIN_ANNEX_LAYERS} layers (layers 6 and 12 are "
                             "rescaled)")


@dataclass
class ModelRuns:
    """Every method × seed on one model."""
    name: str
    width: int | None
    shape: tuple  # (C, H, W) of the training images
    convolutional: bool
    num_classes: int
    data: str = "digits"
    runs: dict[str, list[TrainResult]] = field(default_factory=dict)  # method -> one result per seed
    search: dict[str, LrSearch] = field(default_factory=dict)  # method -> its learning-rate search
    wall: dict[str, list[float]] = field(default_factory=dict)  # method -> seconds of each run, set-up included
    seconds: float = 0.0

    def finished(self, method: str) -> list[TrainResult]:
        """The runs that trained to the end: a diverged run's last error is not a final error."""
        return [r for r in self.runs.get(method, []) if r.ok and r.test_error is not None]

    def error(self, method: str) -> tuple[float, float | None] | None:
        """(mean, std over seeds or None for one run) of the final test error, None when no run finished."""
        errs = [r.test_error for r in self.finished(method)]
        if not errs:
            return None
        return statistics.fmean(errs), statistics.stdev(errs) if len(errs) > 1 else None

    def ms_per_step(self, method: str) -> float | None:
        steps = [r.seconds_per_step for r in self.runs.get(method, []) if r.steps]
        return 1000 * statistics.fmean(steps) if steps else None


@dataclass
class Report:
    config: Config
    models: list[ModelRuns]
    observation: dict  # lab.observe.observe() result
    annex: object  # the ENorm report of pathfx.enorm
    started: datetime
    seconds: float
    load: tuple  # load average (1 min) at start and end, when the OS tells it


# -- running ---------------------------------------------------------------------------------------------------

def dataset_of(name: str) -> str:
    """MNIST-1D for the 1-D models (a 1×40 input), digits for every other."""
    import zoo

    return "mnist1d" if tuple(zoo.lookup(name).input_shape[1:]) == (1, 40) else "digits"


def image_shape(name: str, width: int | None, size: int) -> tuple[tuple, bool]:
    """(input shape a model trains on, whether it has convolutions): its registered input, at ``size``×``size``
    for a 2-D convnet on digits (global pooling takes any size, and 8×8 digits upsampled to 32×32 only
    quadruple the cost); an MLP's first layer, or MNIST-1D's 40 samples, fix the others."""
    import zoo

    shape = tuple(zoo.lookup(name).input_shape[1:])
    convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in build_model(name, width).modules())
    return ((shape[0], size, size) if convs and len(shape) == 3 else shape), convs


def train_model(name: str, cfg: Config, log) -> ModelRuns:
    from .data import load
    from .train import default_width

    start = time.perf_counter()
    width = default_width(name)
    shape, convs = image_shape(name, width, cfg.size)
    kind = dataset_of(name)
    data = load(kind, shape=shape)
    out = ModelRuns(name, width, shape, convs, data.num_classes, kind)
    epochs = cfg.epochs_of(kind)
    for method in cfg.methods:
        lr = None
        if cfg.lr_search:
            t = time.perf_counter()
            found = search_lr(name, method, data, epochs, seed=cfg.seeds[0], width=width,
                              max_steps=cfg.max_steps)
            found.result.model = None
            out.search[method], lr = found, found.lr
            grid = ", ".join(f"{g:g}: {'diverged' if e is None else f'{100 * e:.1f}%'}"
                             for g, e in found.validation_error.items())
            log(f"{name} {method}: lr {lr:g} chosen on validation ({grid}), {time.perf_counter() - t:.0f} s")
        for seed in cfg.seeds:
            t = time.perf_counter()
            r = train(name, method, data, epochs, seed=seed, width=width, progress=False,
                      max_steps=cfg.max_steps, lr=lr)
            r.model = None  # 36 trained models need not stay in memory
            out.runs.setdefault(method, []).append(r)
            out.wall.setdefault(method, []).append(time.perf_counter() - t)
            err = "-" if r.test_error is None else f"{100 * r.test_error:.2f}%"
            log(f"{name} {method} seed {seed}: test error {err}, {1000 * r.seconds_per_step:.0f} ms/step, "
                f"{time.perf_counter() - t:.0f} s" + (f" (stopped: {r.stopped})" if r.stopped else ""))
    out.seconds = time.perf_counter() - start
    return out


def observation(cfg: Config) -> dict:
    """pbn §5.2 on the first training mini-batch of digits (the paper: of CIFAR-10), at the digits' own 8×8."""
    from .data import digits
    from .observe import observe

    x, y = next(iter(digits((3, 8, 8)).loaders(cfg.observe_batch, seed=0)[0]))
    return observe(cfg.observe_depth, cfg.observe_width, seed=0, x=x, y=y)


def unbalanced_mlp(layers: int = 20, width: int = 500, seed: int = 0) -> nn.Sequential:
    """enorm Annex A: ``layers`` Xavier-initialised ``width``×``width`` layers, layer 6 × 1.2, layer 12 × 0.8.
    The layers are named layer1, layer2, ... so that the figure's labels count as the text does."""
    torch.manual_seed(seed)
    mods = OrderedDict()
    for i in range(1, layers + 1):
        lin = nn.Linear(width, width)
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
        mods[f"layer{i}"] = lin
        if i < layers:
            mods[f"relu{i}"] = nn.ReLU()
    model = nn.Sequential(mods).double()
    with torch.no_grad():
        model.layer6.weight.mul_(1.2)
        model.layer12.weight.mul_(0.8)
    return model


def annex_a(cfg: Config):
    import pathfx

    model = unbalanced_mlp(cfg.annex_layers, cfg.annex_width)
    _, report = pathfx.enorm(model, torch.randn(1, cfg.annex_width, dtype=torch.float64))
    return report


def outputs(out: str, models) -> dict[str, str]:
    """Every file the report writes, by role: the markdown, and beside it a directory of the same name."""
    figures = os.path.splitext(out)[0]
    paths = {"markdown": out, "observe.png": os.path.join(figures, "observe.png"),
             "observe.csv": os.path.join(figures, "observe.csv"),
             "annex.png": os.path.join(figures, "enorm_annex_a.png")}
    for name in models:
        paths[name] = os.path.join(figures, f"{name.replace(':', '_').replace('/', '_')}.png")
    return paths


def check_outputs(paths: dict[str, str], force: bool) -> None:
    """Refuse before any work, not after half an hour of it."""
    if not paths["markdown"].endswith(".md"):
        raise InputError(f"the report is markdown: '{paths['markdown']}' does not end in .md")
    for path in paths.values():
        if os.path.exists(path) and not force:
            raise InputError(f"output file '{path}' exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(paths["markdown"]))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write '{paths['markdown']}': directory '{directory}' does not exist")


def run(cfg: Config, out: str = "docs/experiments.md", force: bool = False, command: str = "pathfx experiments",
        log=print) -> Report:
    """Run everything and write the report and its figures; returns the measured numbers."""
    cfg.check()
    paths = outputs(out, cfg.models)
    check_outputs(paths, force)
    started, start, load0 = datetime.now(timezone.utc), time.perf_counter(), _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        models = [train_model(name, cfg, log) for name in cfg.models]
        log("pbn §5.2 observation: BN vs P-BN at initialisation")
        obs = observation(cfg)
        log("enorm Annex A: balancing the unbalanced MLP")
        annex = annex_a(cfg)
    finally:
        torch.set_num_threads(threads)
    report = Report(cfg, models, obs, annex, started, time.perf_counter() - start, (load0, _load()))
    write(report, paths, command, force)
    log(f"wrote {out} and {len(paths) - 1} files in {os.path.dirname(paths['annex.png'])}/ "
        f"({duration(report.seconds)})")
    return report


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# -- writing ---------------------------------------------------------------------------------------------------

def mean_rows(results: list[TrainResult]) -> list[dict]:
    """Per epoch, the mean of every column over the runs that reached that epoch."""
    rows = []
    for epoch in range(1, max((len(r.rows) for r in results), default=0) + 1):
        have = [r.rows[epoch - 1] for r in results if len(r.rows) >= epoch]
        rows.append({c: statistics.fmean(row[c] for row in have) for c in COLUMNS} | {"epoch": epoch})
    return rows


def curves_png(m: ModelRuns) -> bytes:
    # the same runs as the table's means; a method with no finished run still shows how far it got
    means = {method if m.finished(method) else f"{method} (diverged)":
             SimpleNamespace(rows=mean_rows(m.finished(method) or runs)) for method, runs in m.runs.items()}
    buf = io.BytesIO()
    n = len(next(iter(m.runs.values())))
    curves(means, buf, error=True, title=f"{m.name} on digits {'×'.join(map(str, m.shape))}: "
                                       + (f"mean of {n} seeds" if n > 1 else "one seed"))
    return buf.getvalue()


def write(report: Report, paths: dict[str, str], command: str, force: bool) -> None:
    from .observe import to_csv, to_png
    from .plots import enorm_plot

    os.makedirs(os.path.dirname(paths["annex.png"]), exist_ok=True)
    for m in report.models:
        write_atomic(paths[m.name], curves_png(m), force=force, binary=True)
    write_atomic(paths["observe.png"], to_png(report.observation), force=force, binary=True)
    write_atomic(paths["observe.csv"], to_csv(report.observation), force=force)
    fig = enorm_plot(report.annex, f"{report.config.annex_layers}-layer MLP, {report.config.annex_width} wide")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")  # the plot's titles are wider than its axes
    import matplotlib.pyplot as plt  # after enorm_plot has chosen the Agg backend

    plt.close(fig)
    write_atomic(paths["annex.png"], buf.getvalue(), force=force, binary=True)
    links = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(paths["markdown"])))
             for k, v in paths.items()}
    write_atomic(paths["markdown"], markdown(report, links, command, machine()), force=force)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical cores"
