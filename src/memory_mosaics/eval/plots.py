"""PNG figures with matplotlib's Agg backend: training curves and loss by position."""

from __future__ import annotations

import json
import os
from pathlib import Path

from memory_mosaics.errors import MosaicError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> None:
    """Save through a temporary name so a reader never sees half a PNG."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MosaicError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        _pyplot().close(fig)


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_training_curves(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """Training loss (every logged step) and validation loss (every evaluation) against step."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, png_path)


def plot_per_position(curves: dict[str, list[float | None]], png_path: str | os.PathLike[str], title: str = "") -> None:
    """One line per model: mean loss at each token position (several models overlay on one plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        points = [(i, v) for i, v in enumerate(losses) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, linewidth=1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean cross-entropy (nats/token)")
    ax.set_title(title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, png_path)
