"""A one-page PNG summary of an inspection (matplotlib, Agg backend).

Top: every head's context-retrieval matrix (rows = layers, columns = heads; row t = query position,
column s = stored entry; colour = sqrt of the weight). Bottom: each head's retention exp(-beta) and key
scale, the mean look-back of its retrievals over the sequence, and the probability the model gave to
each actual next token.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import PowerNorm
from matplotlib.ticker import MaxNLocator

from memory_mosaics.inspect.retrieval import Inspection

FIGURE_WIDTH = 12.0  # inches; the heatmaps grow to fill it when there are few heads


def plot_summary(inspection: Inspection, path: str | os.PathLike[str], title: str = "") -> None:
    n_layer = len(inspection.layers)
    n_head = inspection.layers[0].context.weights.shape[0]
    cell = min(2.6, max(1.3, FIGURE_WIDTH / (n_head + 1)))
    width = max(FIGURE_WIDTH, cell * (n_head + 1))
    fig = plt.figure(figsize=(width, cell * n_layer + 3.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[cell * n_layer + 0.4, 3.2])
    _heatmaps(top, inspection)
    _head_summary(bottom, inspection)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _heatmaps(fig, inspection: Inspection) -> None:
    n_layer = len(inspection.layers)
    n_head = inspection.layers[0].context.weights.shape[0]
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    cmap = plt.get_cmap("Blues").with_extremes(bad="#dddddd")
    length = len(inspection.ids)
    steps = torch.arange(length)
    # Entries a query may not read (s > t - shift) are drawn grey, apart from weights that are just small.
    unreadable = steps[None, :] > steps[:, None] - inspection.shift
    image = None
    for layer, item in enumerate(inspection.layers):
        for head in range(n_head):
            ax = axes[layer][head]
            shown = item.context.weights[head].masked_fill(unreadable, float("nan")).numpy()
            image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="retrieval weight")
    fig.suptitle("context retrieval per head (row: query t, column: entry s)", fontsize=9)


def _head_summary(fig, inspection: Inspection) -> None:
    ax_ret, ax_scale, ax_back, ax_prob = fig.subplots(1, 4)
    for layer, item in enumerate(inspection.layers):
        heads = range(item.context.params.decay.shape[0])
        style = {"marker": "o", "label": f"layer {layer}"}
        ax_ret.plot(heads, item.context.params.retention.numpy(), **style)
        ax_scale.plot(heads, item.context.params.key_scale.numpy(), **style)
        ax_back.plot(heads, item.context.lookback[:, inspection.shift :].mean(-1).numpy(), **style)
    for ax in (ax_ret, ax_scale, ax_back):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ret.set(title="context retention exp(-beta)", xlabel="head", ylim=(0, 1.05))
    ax_scale.set(title="context key scale (1 / bandwidth)", xlabel="head")
    ax_back.set(title="mean look-back (steps)", xlabel="head")
    if len(inspection.layers) <= 12:
        ax_ret.legend(fontsize=7)
    probs = torch.softmax(inspection.logits.double(), dim=-1)
    following = torch.tensor(inspection.ids[1:], dtype=torch.long)
    next_prob = probs[:-1].gather(1, following[:, None])[:, 0] if len(following) else torch.zeros(0)
    ax_prob.plot(range(len(next_prob)), next_prob.numpy(), marker=".")
    ax_prob.set(title="p(actual next token)", xlabel="position", ylim=(0, 1.05))
