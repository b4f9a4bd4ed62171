"""Figures and tables from a throughput result (the dict `run_throughput` returns)."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def _cell_rows(result: dict) -> list[tuple[int, str, dict[str, dict]]]:
    cells = []
    for cell in result["cells"]:
        rows = {
            r["model"]: r for r in result["rows"] if r["seq_len"] == cell["seq_len"] and r["dtype"] == cell["dtype"]
        }
        cells.append((cell["seq_len"], cell["dtype"], rows))
    return cells


def markdown_table(result: dict) -> str:
    """One line per cell: tokens/s, ratios (with their 95 % bootstrap interval where the result has one),
    MFU and step memory of each model."""
    models = list(result["settings"]["models"])
    pairs = [("mosaic", "gpt"), ("mosaic", "nanogpt"), ("gpt", "nanogpt")]
    pairs = [(a, b) for a, b in pairs if a in models and b in models]
    names = {"mosaic": "MM", "gpt": "GPT", "nanogpt": "nanoGPT"}
    head = ["T", "dtype"] + [f"{m} tok/s" for m in models] + [f"{names[a]}/{names[b]}" for a, b in pairs]
    head += [f"{m} MFU" for m in models] + [f"{m} step MiB" for m in models] + ["MM/GPT memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (length, dtype, rows), cell in zip(_cell_rows(result), result["cells"], strict=True):
        values = [str(length), dtype] + [f"{rows[m]['tokens_per_second']:.0f}" for m in models]
        intervals = cell.get("intervals", {})
        for a, b in pairs:
            interval = intervals.get(f"{a}_over_{b}")
            ratio = _fmt(rows[a]["tokens_per_second"] / rows[b]["tokens_per_second"])
            values.append(ratio + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else ""))
        values += [f"{100 * rows[m]['mfu']:.1f}%" for m in models]
        values += [f"{rows[m]['step_peak_bytes'] / MIB:.0f}" if "step_peak_bytes" in rows[m] else "-" for m in models]
        memory = [rows[m].get("step_peak_bytes") for m in ("mosaic", "gpt") if m in rows]
        values += [_fmt(memory[0] / memory[1]) if len(memory) == 2 and None not in memory else "-"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_throughput(result: dict, path: str | Path) -> None:
    """Tokens/s per model and cell (left), MM/GPT throughput and memory ratios (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cell_rows(result)
    labels = [f"T={length}\n{dtype}" for length, dtype, _ in cells]
    models = list(result["settings"]["models"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        xs = [i + (index - (len(models) - 1) / 2) * width for i in range(len(cells))]
        left.bar(xs, [rows[model]["tokens_per_second"] for _, _, rows in cells], width, label=model)
    left.set_xticks(range(len(cells)), labels)
    left.set_yscale("log")
    left.set_ylabel("training tokens / s (median)")
    left.set_title("forward + backward + AdamW")
    left.legend()
    series = []  # (label, values, 95 % intervals or None)
    for other in ("gpt", "nanogpt"):
        if "mosaic" in models and other in models:
            values = [rows["mosaic"]["tokens_per_second"] / rows[other]["tokens_per_second"] for _, _, rows in cells]
            intervals = [cell.get("intervals", {}).get(f"mosaic_over_{other}") for cell in result["cells"]]
            series.append((f"throughput MM / {other}", values, intervals if all(intervals) else None))
    memory = [cell.get("memory_mosaic_over_gpt") for cell in result["cells"]]
    if any(m is not None for m in memory):
        series.append(("step memory MM / gpt", [m or 0.0 for m in memory], None))
    bar = 0.8 / max(1, len(series))
    for index, (label, values, intervals) in enumerate(series):
        xs = [i + (index - (len(series) - 1) / 2) * bar for i in range(len(cells))]
        # error bars: the ratio's 95 % bootstrap interval over the rounds
        errors = (
            None
            if intervals is None
            else [
                [v - lo for v, (lo, _) in zip(values, intervals, strict=True)],
                [hi - v for v, (_, hi) in zip(values, intervals, strict=True)],
            ]
        )
        right.bar(xs, values, bar, yerr=errors, capsize=2 if errors else 0, label=label)
    if any(intervals for _, _, intervals in series):
        right.set_ylabel("ratio (error bars: 95 % interval)")
    right.axhline(0.9, color="k", linestyle="--", linewidth=1, label="throughput target 0.9")
    right.axhline(1.2, color="grey", linestyle=":", linewidth=1, label="memory target 1.2 (T=4096)")
    right.set_xticks(range(len(cells)), labels)
    right.set_title("Memory Mosaic relative to the project's GPT")
    # Below the axes: inside, the legend hid the tallest bars (memory ratios above 1.2).
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.suptitle(
        f"{result['machine']['processor'] or result['machine']['platform']}, {result['machine']['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
