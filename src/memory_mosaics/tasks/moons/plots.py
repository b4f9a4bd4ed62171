"""The authors' four kinds of three-moons plots, as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen first
import torch

from memory_mosaics.tasks.moons.model import MoonsMemory

MOON_COLORS = ("tab:blue", "tab:orange", "tab:green")


def _np(values):
    """matplotlib wants numpy arrays; tensors go through numpy's deprecated copy path otherwise."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


def _period_lines(ax, periods: list[float], joint: float, origin: float = 0.0, label: bool = False) -> None:
    """Grey dashed lines at each moon period, a red line at the joint period (in tokens from origin)."""
    for i, p in enumerate(periods):
        ax.axvline(origin + p, color="grey", ls="--", lw=0.8, label="moon periods" if label and i == 0 else None)
    ax.axvline(origin + joint, color="red", lw=0.8, label="joint period" if label else None)


def plot_generations(
    path: Path,
    panels: list[dict],
    prompt_len: int,
    title: str,
) -> None:
    """One column per panel, one row per moon (its sine): truth, teacher-forced, generated.

    Each panel: {"name", "truth" (T, 6), "teacher" (T, 6), "generated" (G, 6), "periods", "joint"};
    the model saw x_0..x_{prompt_len-1}, so generated[j] is its prediction of y_{prompt_len-1+j}.
    """
    fig, axes = plt.subplots(3, len(panels), figsize=(6 * len(panels), 7), sharex=True, squeeze=False)
    for col, panel in enumerate(panels):
        truth, teacher, generated = (_np(panel[k]) for k in ("truth", "teacher", "generated"))
        steps = range(truth.shape[0])
        gen_steps = range(prompt_len - 1, prompt_len - 1 + generated.shape[0])
        for moon in range(3):
            ax = axes[moon, col]
            ax.plot(steps, truth[:, 2 * moon], color="black", lw=1.5, label="truth")
            ax.plot(steps, teacher[:, 2 * moon], color=MOON_COLORS[moon], lw=0.8, label="teacher-forced")
            ax.plot(gen_steps, generated[:, 2 * moon], color="magenta", lw=0.8, ls=":", label="generated")
            ax.axvline(prompt_len - 1, color="black", lw=0.5)
            _period_lines(ax, panel["periods"], panel["joint"], label=moon == 0)
            ax.set_xlim(0, len(steps) - 1)
            ax.set_ylabel(f"sin, moon {moon + 1}")
        axes[0, col].set_title(panel["name"])
        axes[-1, col].set_xlabel("step t (prediction of y_t = x_{t+1})")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_error_vs_context(
    path: Path,
    panels: list[tuple[str, list[int], dict[str, list[float]]]],
    periods: list[float],
    joint: float,
    title: str,
) -> None:
    """Mean absolute prediction error against the context length, one panel per way of predicting.

    Each panel is (name, context lengths, {network label: errors}).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (name, context_lengths, curves) in zip(axes[0], panels, strict=True):
        for label, curve in curves.items():
            ax.plot(context_lengths, curve, label=label)
        _period_lines(ax, periods, joint, label=True)
        ax.set_yscale("log")
        ax.set_xlim(0, max(context_lengths))
        ax.set_xlabel("context length L (the first prediction is of x_L)")
        ax.set_ylabel("mean |prediction - truth|")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention(path: Path, attention: torch.Tensor, title: str) -> None:
    """Each head's attention matrix (query t down, key s across) on one sequence."""
    n_head = attention.shape[0]
    fig, axes = plt.subplots(1, n_head, figsize=(5 * n_head, 5), squeeze=False)
    for h in range(n_head):
        ax = axes[0, h]
        ax.imshow(_np(attention[h].sqrt()), cmap="viridis", interpolation="nearest")  # sqrt shows weak weights
        ax.set_title(f"head {h + 1}")
        ax.set_xlabel("key position s")
        ax.set_ylabel("query position t")
    fig.suptitle(title + " (sqrt of the weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_complex_blocks(path: Path, model: MoonsMemory, title: str) -> None:
    """Moduli |a + ic| of the complex blocks of W_phi (keys), W_psi (values), W_z (output)."""
    maps = {
        "W_phi (key)": model.key.block_moduli(),
        "W_psi (value)": model.value.block_moduli(),
        "W_z (output)": model.out.block_moduli(),
    }
    pairs = model.config.head_dim // 2
    coords = [
        f"h{i // pairs + 1}" + (f".{i % pairs + 1}" if pairs > 1 else "") for i in range(model.config.n_head * pairs)
    ]
    moons = [f"moon {j + 1}" for j in range(model.config.input_dim // 2)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (name, moduli) in zip(axes, maps.items(), strict=True):
        moduli = _np(moduli)
        image = ax.imshow(moduli, cmap="magma", vmin=0)
        for i in range(moduli.shape[0]):
            for j in range(moduli.shape[1]):
                ax.text(j, i, f"{moduli[i, j]:.2f}", ha="center", va="center", color="cyan", fontsize=9)
        rows, cols = (moons, coords) if name.startswith("W_z") else (coords, moons)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
