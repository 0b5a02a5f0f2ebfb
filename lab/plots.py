"""The lab's pictures: where the ENorm energy went, and training curves (PNG through matplotlib)."""
from __future__ import annotations


def enorm_plot(report, title: str):
    """A matplotlib figure: per-unit weight norm of each layer before and after, and the objective per cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.35 * len(report.layers) + 3), 11))
    rng = np.random.default_rng(0)
    for ax, when in zip(axes[:2], ("before", "after")):
        for i, lay in enumerate(report.layers):
            energy = np.asarray(getattr(lay, f"rows_{when}"), dtype=float)
            # p = ∞ rows are already max|w|; at a large finite p a row may have left float64 (0 or inf)
            norms = energy if np.isinf(report.p) else energy ** (1 / report.p)
            ax.scatter(i + rng.uniform(-0.3, 0.3, len(norms)), norms, s=3, alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylabel("ℓ∞ norm per unit" if np.isinf(report.p) else f"ℓ{report.p:g} norm per unit")
        ax.set_title(f"{title}: energy {when} ENorm (one dot per output unit: its incoming weights, "
                     "the paper's weight-matrix column)")
        ax.set_xticks(range(len(report.layers)))
        ax.set_xticklabels([lay.name.removesuffix(".weight") for lay in report.layers], rotation=90, fontsize=6)
    # the log is exact at any p, where Σ|w|^p itself may be 0 or inf in float64
    axes[2].plot(range(len(report.log_objective)), report.log_objective, marker=".")
    axes[2].set_xlabel("cycle")
    axes[2].set_ylabel("log max|w|" if np.isinf(report.p) else f"log Σ|w|^{report.p:g}")
    axes[2].set_title("objective per cycle (0 = before)")
    fig.tight_layout()
    return fig


def curves(results: dict, path_or_file, error: bool = False, title: str | None = None) -> None:
    """Loss and accuracy curves (train dashed, test solid) of ``{label: TrainResult}`` as a PNG; ``error``
    draws the error rate 1 − accuracy instead of the accuracy, loss and error on log scales. Only
    ``result.rows`` is read, so averaged rows in any object with a ``rows`` attribute plot too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        ep = [row["epoch"] for row in r.rows]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            value = (lambda v: 1.0 - v) if error and key == "acc" else (lambda v: v)
            line, = ax.plot(ep, [value(row[f"test_{key}"]) for row in r.rows], marker="o", label=f"{label} test")
            ax.plot(ep, [value(row[f"train_{key}"]) for row in r.rows], "--", color=line.get_color(),
                    label=f"{label} train")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    if error:  # both on log scales: a few early spikes would flatten every later difference
        ax_acc.set(xlabel="epoch", ylabel="error rate (1 − accuracy)", title="error (zeros not drawn)")
        ax_acc.set_yscale("log", nonpositive="mask")
        ax_loss.set_yscale("log")
    else:
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    if title:
        fig.suptitle(title)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_or_file, format="png", dpi=100)
    plt.close(fig)
