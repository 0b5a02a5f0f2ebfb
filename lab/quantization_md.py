"""The markdown and the figure of `pathfx quantization` (lab/quantization.py).

Every comparison sentence is computed from the measured numbers, so a regenerated report can say the
opposite of the last one.
"""
from __future__ import annotations

import io
import statistics

from .experiments import machine
from .experiments_md import duration, table
from .quantization import LABELS, Study, mean_std

BALANCED = ("cle", "p2", "pinf")  # the variants that rescale weights before the per-tensor int8 export


def _runs(study: Study, model: str) -> list:
    return [r for r in study.runs if r.model == model]


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _models(study: Study) -> list[str]:
    return list(dict.fromkeys(r.model for r in study.runs))


def accuracy_table(study: Study) -> str:
    head = ["model", "float"] + [LABELS[v] for v in study.variants] + ["CLE pairs"]
    rows = []
    for model in _models(study):
        runs = _runs(study, model)
        rows.append([model, _pm([r.float_accuracy["trained"] for r in runs])] +
                    [_pm([r.accuracy[v] for r in runs]) for v in study.variants] + [str(runs[0].cle_pairs)])
    return table(head, rows)


def metric_table(study: Study, key: str, scale: float, digits: int) -> str:
    head = ["model"] + [LABELS[v] for v in study.variants]
    return table(head, [[model] + [_pm([getattr(r, key)[v] for r in _runs(study, model)], scale, digits)
                                   for v in study.variants] for model in _models(study)])


def runs_table(study: Study) -> str:
    head = ["model", "seed", "train s", "float (torch)", "float (ONNX)"] + [LABELS[v] for v in study.variants]
    return table(head, [[r.model, str(r.seed), f"{r.train_seconds:.0f}", f"{100 * r.torch_accuracy:.2f}",
                         f"{100 * r.float_accuracy['trained']:.2f}"] +
                        [f"{100 * r.accuracy[v]:.2f}" for v in study.variants] for r in study.runs])


REFERENCE = {"trained": "the model as trained", "cle": "torch.ao CLE"}


def _versus(runs: list, v: str, ref: str) -> str:
    a, b = (statistics.fmean(r.accuracy[k] for r in runs) for k in (v, ref))
    at_least = sum(r.accuracy[v] >= r.accuracy[ref] for r in runs)
    seeds = f"≥ on {at_least} of {len(runs)} seed(s)"
    if a == b:
        return f"the same mean accuracy as {REFERENCE[ref]}, {seeds}"
    return f"{100 * abs(a - b):.2f} points {'above' if a > b else 'below'} {REFERENCE[ref]}, {seeds}"


def findings(study: Study) -> list[str]:
    out = []
    differ = [(r.model, r.seed) for r in study.runs if max(r.float_accuracy.values()) != min(r.float_accuracy.values())]
    out.append("Every variant has the float model's test accuracy under onnxruntime on every run: rescaling "
               "preserves the function." if not differ else
               "The float accuracy differs between variants on " + ", ".join(f"{m} seed {s}" for m, s in differ) +
               ": a rescaling changed some predictions of the float model (ties broken by rounding).")
    out.append(resolution(study))
    for model in _models(study):
        runs = _runs(study, model)
        drop = {v: statistics.fmean(r.float_accuracy[v] - r.accuracy[v] for r in runs) for v in ("trained", "per_channel")}
        ratio = statistics.fmean(r.mean_abs["per_channel"] / r.mean_abs["trained"] for r in runs)
        where = "most of it is not in the weights' scales but in the activations'" if ratio > 0.95 else \
            "a share of it is in the weights' per-tensor scales"
        out.append(f"{model}: per-tensor int8 of the model as trained {_change(drop['trained'])} (per-channel int8: "
                   f"{_change(drop['per_channel'])}); per-channel weight scales leave × {ratio:.2f} of its mean logit "
                   f"error: {where}.")
        has_cle = runs[0].cle_pairs > 0
        if not has_cle:
            out.append(f"{model}: torch.ao's equalize supports no pair of its layers; the CLE column is the model "
                       "as trained.")
        for v in BALANCED:
            if v not in study.variants or (v == "cle" and not has_cle):
                continue
            refs = ("trained", "cle") if v != "cle" and has_cle else ("trained",)
            ratio = statistics.fmean(r.mean_abs[v] / r.mean_abs["trained"] for r in runs)
            out.append(f"{model}, {LABELS[v]}: " + "; ".join(_versus(runs, v, ref) for ref in refs) +
                       f"; mean logit error × {ratio:.2f} of the model as trained's.")
    out.append(criterion(study))
    return out


def _change(drop: float) -> str:
    """A mean accuracy change float → int8 in words."""
    return "keeps the float accuracy" if drop == 0 else \
        f"{'loses' if drop > 0 else 'gains'} {100 * abs(drop):.2f} points"


def resolution(study: Study) -> str:
    """How many test images the accuracy differences amount to: whether the accuracy columns can separate the
    variants at all."""
    image = 100 / study.test_size
    moved = max(abs(r.float_accuracy[v] - r.accuracy[v]) * study.test_size for r in study.runs for v in study.variants)
    spread = max(max(m) - min(m) for m in ([statistics.fmean(r.accuracy[v] for r in _runs(study, model))
                                           for v in study.variants] for model in _models(study)))
    images = spread * study.test_size
    reading = "at this size the accuracy columns barely separate the variants; the mean logit error is the finer " \
        "measure" if images < 2 else "the accuracy columns separate them"
    return (f"One test image is {image:.2f} points. int8 changes the test accuracy of a run by at most "
            f"{round(moved)} image(s), and the variants' mean accuracies of one model lie within {100 * spread:.2f} "
            f"points ({images:.1f} image(s) per seed on average) of each other: {reading}.")


def criterion(study: Study) -> str:
    """pathfx p = ∞ per-tensor int8 accuracy ≥ the model as trained and ≥ torch.ao CLE (where it applies), per
    model on the mean over seeds."""
    if "pinf" not in study.variants:
        return ("pathfx p = ∞ was not measured: this build's `pathfx.enorm` refuses p = inf, so the criterion "
                "(p = ∞ ≥ as trained and ≥ torch.ao CLE on every model) is not decided by this run.")
    fails = []
    for model in _models(study):
        runs = _runs(study, model)
        mean = {v: statistics.fmean(r.accuracy[v] for r in runs) for v in ("pinf", "trained", "cle")}
        refs = ("trained", "cle") if runs[0].cle_pairs else ("trained",)
        fails += [f"{model} (below {LABELS[ref]})" for ref in refs if mean["pinf"] < mean[ref]]
    if not fails:
        return ("Criterion met: pathfx p = ∞ per-tensor int8 accuracy (mean over seeds) ≥ the model as trained "
                "and ≥ torch.ao CLE where CLE applies, on every model.")
    return "Criterion not met on " + ", ".join(fails) + " (pathfx p = ∞ per-tensor int8, mean over seeds)."


def markdown(study: Study, png: str, command: str) -> str:
    cfg, s = study.config, study.settings
    missing = "" if "pinf" in study.variants else (
        "\n\n**p = ∞ is not in this run**: `pathfx.enorm` of this build refuses p = inf. Re-run "
        "`make quantization` on a build whose `pathfx.enorm` accepts it; the column then appears.")
    parts = [
        "# Per-tensor int8 after balancing",
        f"Made by `{command}` in {duration(study.seconds)} on {machine()}, {cfg.threads} torch thread(s). "
        f"Models {', '.join(cfg.models)}; seeds {', '.join(map(str, cfg.seeds))}.{missing}",
        "## Setting\n\n"
        f"- Data: scikit-learn's digits, 3×{cfg.size}×{cfg.size} (grey channel repeated), the lab's fixed split "
        f"({study.train_size:,} training, {study.test_size} test images), standardized.\n"
        f"- Training: `lab.train.train(model, \"sgd\", ...)`: SGD with momentum 0.9 and BatchNorm, the baseline "
        f"plan, {cfg.epochs} epoch(s){f' (at most {cfg.max_steps} steps)' if cfg.max_steps else ''}, one run per "
        "seed (the seed fixes the initialisation and the data order).\n"
        "- Variants, all from the BN-folded model (`pathfx.analysis.prepare`): *as trained*; *torch.ao CLE*: "
        "`torch.ao.quantization._equalize.equalize` over every conv/linear pair it supports (a layer whose output "
        "reaches the next one through ReLU, pooling or flatten only; not a residual add, a concatenation or a "
        "depthwise conv as the second layer); *pathfx p = 2* and *p = ∞*: `pathfx.enorm` over all rescaling "
        "groups (residual streams, depthwise convs); *per-channel*: the model as trained with one weight scale per "
        "output channel, the reference.\n"
        f"- int8: `pathfx.export_onnx(quantize=\"int8\")`, onnxruntime.quantization in the {s.get('format')} "
        f"format; weights {s.get('weights')} (per tensor except the per-channel column); activations "
        f"{s.get('activations')}; {s.get('calibration')} calibration on the first {cfg.calibration} training "
        f"images; the ONNX graph's batch is {cfg.batch}. Accuracies are measured under onnxruntime on the test "
        "split.",
        "## Test accuracy % under int8 (mean ± std over seeds)\n\n"
        "*float* is the float ONNX model (the same for every variant: see below). *CLE pairs*: how many layer "
        "pairs torch.ao's equalize balanced.\n\n" + accuracy_table(study),
        "## Mean |float − int8| logit on the test set (× 1000, mean ± std over seeds)\n\n" +
        metric_table(study, "mean_abs", 1000.0, 2),
        "## Test images whose int8 class is the float model's class (%, mean ± std)\n\n" +
        metric_table(study, "agreement", 100.0, 2),
        "## Every run (test accuracy %)\n\n" + runs_table(study),
        f"## Figure\n\n![accuracy lost to int8 and logit error per variant]({png})",
        "## What the numbers say\n\n" + "\n".join(f"- {line}" for line in findings(study)),
    ]
    return "\n\n".join(parts) + "\n"


def figure(study: Study) -> bytes:
    """Two panels per model and variant, mean ± std over seeds: accuracy lost to int8 (points), and the mean
    |logit error| relative to the model as trained (logit scales differ between models; 1 = no change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = _models(study)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(study.variants)
    for i, v in enumerate(study.variants):
        pos = np.arange(len(models)) + (i - (len(study.variants) - 1) / 2) * width
        drop = [mean_std([100 * (r.float_accuracy[v] - r.accuracy[v]) for r in _runs(study, m)]) for m in models]
        err = [mean_std([r.mean_abs[v] / r.mean_abs["trained"] for r in _runs(study, m)]) for m in models]
        for ax, values in ((axes[0], drop), (axes[1], err)):
            ax.bar(pos, [m for m, _ in values], width, yerr=[s for _, s in values], capsize=2, label=LABELS[v])
    axes[0].set_ylabel("float − int8 test accuracy (points)")
    axes[0].axhline(0, color="black", lw=0.6)
    for sign in (1, -1):  # what one test image is worth
        axes[0].axhline(sign * 100 / study.test_size, color="grey", lw=0.6, ls=":",
                        label="± one test image" if sign > 0 else None)
    axes[1].set_ylabel("mean |float − int8| logit / the same as trained")
    axes[1].axhline(1, color="black", lw=0.6)
    for ax, title in zip(axes, ("accuracy lost to int8", "int8 logit error relative to as trained")):
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, fontsize=8)
        ax.set_title(f"{title}\n(mean ± std over {len(study.config.seeds)} seed(s))", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
