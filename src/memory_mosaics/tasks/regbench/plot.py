"""The paper's RegBench figure: accuracy and TVD against the number of training DFAs, our runs
(solid, one colour per model, the mean over seeds) beside the published curves (dashed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from memory_mosaics.tasks.regbench.published import PUBLISHED, PUBLISHED_NAME, TRAIN_DFAS


def mean_by_model(rows: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    """model -> num_train_dfas -> (mean accuracy, mean tvd) over seeds, models in row order."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["model"], row["num_train_dfas"]].append(row)
    means: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for (model, size), runs in groups.items():
        means[model][size] = (
            sum(r["accuracy"] for r in runs) / len(runs),
            sum(r["tvd"] for r in runs) / len(runs),
        )
    return means


def plot_regbench(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the two-panel figure to `path` (PNG) and return the path."""
    means = mean_by_model(rows)
    fig, (ax_acc, ax_tvd) = plt.subplots(1, 2, figsize=(13.5, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    anchors = {model: points for model, points in means.items() if model.startswith("ngram-")}
    dashes = [":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2))]
    for i, (model, points) in enumerate(anchors.items()):  # training-free: one level, drawn across
        acc, tvd = (sum(p[k] for p in points.values()) / len(points) for k in (0, 1))
        style = dict(color="grey", ls=dashes[i % len(dashes)], lw=1, label=f"in-context {model} (no training)")
        ax_acc.axhline(acc, **style)
        ax_tvd.axhline(tvd, **style)
    trained = [(model, points) for model, points in means.items() if model not in anchors]
    for i, (model, points) in enumerate(trained):
        colour = colours[i % len(colours)]
        sizes = sorted(points)
        for ax, k in ((ax_acc, 0), (ax_tvd, 1)):
            ax.plot(sizes, [points[s][k] for s in sizes], "o-", color=colour, label=f"{model} (ours)")
        family = PUBLISHED_NAME.get(model)
        if family:
            acc, tvd = PUBLISHED[family]
            ax_acc.plot(TRAIN_DFAS, acc, "s--", color=colour, alpha=0.45, ms=3, label=f"{family} (published)")
            ax_tvd.plot(TRAIN_DFAS, tvd, "s--", color=colour, alpha=0.45, ms=3)
    for ax, label in ((ax_acc, "accuracy (greedy next symbol accepted)"), (ax_tvd, "TVD (summed L1, no 1/2)")):
        ax.set_xscale("log")
        ax.set_xlabel("number of training DFAs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.83, 0.5))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
