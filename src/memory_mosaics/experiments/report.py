"""Figures (PNG, matplotlib Agg) and the Markdown report of a `mosaic reproduce` summary.

The Markdown is regenerated from the numbers on every run. A hand-written reading placed between
the markers READING_START and READING_END in an existing report is carried over unchanged, so a
re-run refreshes the tables without erasing the discussion (which then may need a new look).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from memory_mosaics.eval.plots import _pyplot, _save
from memory_mosaics.experiments.lm_depths import KINDS
from memory_mosaics.experiments.prompts import CATEGORIES
from memory_mosaics.experiments.summary import BUCKETS, bucket_name, spread

READING_START = "<!-- reading:start -->"
READING_END = "<!-- reading:end -->"
LABELS = {"mosaic": "Memory Mosaic", "gpt": "GPT"}
COLORS = {"mosaic": "tab:red", "gpt": "tab:blue"}
FIGURES = {
    "val_loss": "results_val_loss_by_depth.png",
    "per_position": "results_loss_by_position.png",
    "gap": "results_position_gap.png",
    "curves": "results_training_curves.png",
    "prompts": "results_prompt_suite.png",
}


def _binned(curve: list[float | None], edges: list[int]) -> tuple[list[float], list[float]]:
    """Mean of the curve in [edges[i], edges[i+1]) ranges, at each range's midpoint counted from 1
    (position p has seen p + 1 tokens of the document, which a log axis can show)."""
    xs, ys = [], []
    for lo, hi in itertools.pairwise(edges):
        values = [v for v in curve[lo:hi] if v is not None]
        if values:
            xs.append((lo + hi - 1) / 2 + 1)
            ys.append(sum(values) / len(values))
    return xs, ys


def _edges(length: int) -> list[int]:
    """Single positions up to 8, then ranges that grow about 25% each: readable on a log axis."""
    edges, x = list(range(9)), 8
    while x < length:
        x = min(length, max(x + 1, round(x * 1.25)))
        edges.append(x)
    return edges


def plot_all(summary: dict, folder: str | Path) -> dict[str, str]:
    """Draw every figure that the summary has data for; returns {figure: file name}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    depths = list(summary["depths"])
    if not depths:
        return {}
    plt = _pyplot()
    # Validation loss against depth, one dot per seed.
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in KINDS:
        xs = [int(d) for d in depths]
        ax.plot(
            xs, [summary["depths"][d][f"{kind}_val_loss"] for d in depths], "o-", color=COLORS[kind], label=LABELS[kind]
        )
        for d in depths:
            seeds = summary["depths"][d][f"{kind}_val_loss_seeds"]
            ax.plot([int(d)] * len(seeds), seeds, ".", color=COLORS[kind], alpha=0.5)
    ax.set_xlabel("depth (blocks)")
    ax.set_xticks([int(d) for d in depths])
    ax.set_ylabel("TinyStories validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, folder / FIGURES["val_loss"])
    # Loss by position, in and out of distribution, one column per depth.
    fig, axes = plt.subplots(2, len(depths), figsize=(4 * len(depths), 6.5), squeeze=False)
    for row, split in enumerate(("val", "ood")):
        for col, d in enumerate(depths):
            ax = axes[row][col]
            for kind in KINDS:
                curve = summary["per_position"][split][d][kind]
                ax.plot(*_binned(curve, _edges(len(curve))), color=COLORS[kind], label=LABELS[kind])
            ax.set_xscale("log")
            ax.set_title(f"depth {d}, {'TinyStories valid' if split == 'val' else 'out of distribution'}", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("mean loss (nats/token)")
            if row == 1:
                ax.set_xlabel("tokens of the document seen (position + 1)")
    axes[0][0].legend()
    fig.tight_layout()
    _save(fig, folder / FIGURES["per_position"])
    # The gap (GPT minus Memory Mosaic) by position: above zero, the Memory Mosaic predicts better.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "ood"), strict=True):
        for i, d in enumerate(depths):
            gpt, mm = summary["per_position"][split][d]["gpt"], summary["per_position"][split][d]["mosaic"]
            gap = [None if g is None or m is None else g - m for g, m in zip(gpt, mm, strict=True)]
            ax.plot(
                *_binned(gap, _edges(len(gap))), color=plt.cm.viridis(i / max(1, len(depths) - 1)), label=f"depth {d}"
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens of the document seen (position + 1)")
        ax.set_title("TinyStories valid" if split == "val" else "out of distribution", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GPT loss - Memory Mosaic loss (nats/token)")
    axes[0].legend()
    _save(fig, folder / FIGURES["gap"])
    # Validation loss during training, mean over seeds.
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 3.5), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], depths, strict=True):
        for kind in KINDS:
            runs = summary["val_curves"][d][kind]
            steps = [s for s, _ in runs[0]]
            values = [sum(run[i][1] for run in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, values, "o-", markersize=3, color=COLORS[kind], label=LABELS[kind])
        ax.set_title(f"depth {d}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (sampled windows)")
    axes[0][0].legend()
    _save(fig, folder / FIGURES["curves"])
    # Prompt-suite accuracy per category.
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = [*CATEGORIES, "overall"]
    width = 0.8 / (2 * len(depths))
    for j, d in enumerate(depths):
        for k, kind in enumerate(KINDS):
            accs = [summary["prompt_suite"][d][kind].get(g, {}).get("accuracy", math.nan) for g in groups]
            offset = (2 * j + k) * width - 0.4 + width / 2
            ax.bar([i + offset for i in range(len(groups))], accs, width, color=COLORS[kind],
                   alpha=0.4 + 0.6 * (j + 1) / len(depths), label=f"{LABELS[kind]} d{d}")  # fmt: skip
    chance = [summary["prompt_suite"][depths[0]]["mosaic"].get(g, {}).get("chance", math.nan) for g in groups]
    ax.plot(range(len(groups)), chance, "k_", markersize=30, label="chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (correct continuation ranked first)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, folder / FIGURES["prompts"])
    return dict(FIGURES)


# ---------------------------------------------------------------------------------------------------
# Markdown


def _pm(values: list[float]) -> str:
    center = sum(values) / len(values)
    return f"{center:.3f} ± {spread(values):.3f}" if len(values) > 1 else f"{center:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _setup_table(summary: dict) -> list[str]:
    rows = []
    for d, e in summary["depths"].items():
        rows.append([
            d, f"{e['mosaic_params']:,}", f"{e['gpt_params']:,}", f"{e['mosaic_params_non_embedding']:,}",
            f"{e['gpt_params_non_embedding']:,}", f"{e['train_steps']:,}", f"{e['train_tokens']:,}",
            f"{e['mosaic_lr']:g} / {e['gpt_lr']:g}",
            f"{e['mosaic_train_time_s'] / 60:.1f} / {e['gpt_train_time_s'] / 60:.1f}",
        ])  # fmt: skip
    header = ["depth", "MM params", "GPT params", "MM non-emb.", "GPT non-emb.", "steps", "tokens", "peak lr MM / GPT",
              "train min MM / GPT"]  # fmt: skip
    return _table(header, rows)


def _loss_table(summary: dict, what: str) -> list[str]:
    rows = []
    for d, e in summary["depths"].items():
        mm, gpt = e[f"mosaic_{what}_seeds"], e[f"gpt_{what}_seeds"]
        diffs = [g - m for g, m in zip(gpt, mm, strict=True)]
        per_seed = ", ".join(f"{s}: {m:.3f} / {g:.3f}" for s, m, g in zip(e["seeds"], mm, gpt, strict=True))
        rows.append([d, _pm(mm), _pm(gpt), _pm(diffs), f"{sum(x > 0 for x in diffs)}/{len(diffs)}", per_seed])
    header = ["depth", "Memory Mosaic", "GPT", "GPT − MM", "seeds where MM lower", "seed: MM / GPT"]
    return _table(header, rows)


def _bucket_table(summary: dict, split: str) -> list[str]:
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    rows = []
    for d, b in summary["per_position_buckets"][split].items():
        for kind in KINDS:
            rows.append([d, LABELS[kind], *[("—" if b[kind][n] is None else f"{b[kind][n]:.3f}") for n in names]])
        gaps = [
            "—" if b["gpt"][n] is None or b["mosaic"][n] is None else f"{b['gpt'][n] - b['mosaic'][n]:+.3f}"
            for n in names
        ]
        rows.append([d, "GPT − MM", *gaps])
    return _table(["depth", "model", *[f"positions {n}" for n in names]], rows)


def _prompt_table(summary: dict) -> list[str]:
    groups = [*CATEGORIES, "overall"]
    rows = []
    for d, by_kind in summary["prompt_suite"].items():
        for kind in KINDS:
            cells = []
            for g in groups:
                s = by_kind[kind].get(g)
                cells.append("—" if s is None else f"{s['accuracy']:.2f} ({s['right']}/{s['n']})")
            rows.append([d, LABELS[kind], *cells])
    first = next(iter(summary["prompt_suite"].values()))["mosaic"]
    rows.append(["", "chance", *[f"{first[g]['chance']:.2f}" if g in first else "—" for g in groups]])
    return _table(["depth", "model", *groups], rows)


def _samples(summary: dict) -> list[str]:
    lines = []
    for d, by_kind in summary["samples"].items():
        for kind in KINDS:
            lines.append(f"**{LABELS[kind]}, depth {d}** (first seed)")
            lines.append("")
            for s in by_kind[kind]:
                text = (s["prompt"] + s["continuation"]).replace("\n", " ")
                lines.append(f"> {text}")
                lines.append(">")
            lines[-1] = ""
    return lines


def _kept_reading(path: Path) -> str:
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if READING_START in text and READING_END in text:
            return text[text.index(READING_START) : text.index(READING_END) + len(READING_END)]
    return f"{READING_START}\n_(No reading written yet for these numbers.)_\n{READING_END}"


def write_markdown(summary: dict, path: str | Path, figures_rel: str, figures: dict[str, str]) -> None:
    """docs/results.md from the summary (see the module docstring for the kept reading)."""
    path = Path(path)
    cfg, ood, jobs = summary["config"], summary.get("ood", {}), summary["jobs"]
    fig = {k: f"{figures_rel}/{v}" for k, v in figures.items()}
    if not summary["depths"]:
        done = ", ".join(jobs["finished"]) or "none"
        path.write_text(f"# Memory Mosaics vs GPT on TinyStories at CPU scale\n\nRun in progress: no depth has "
                        f"both models finished yet (finished jobs: {done}).\n", encoding="utf-8")  # fmt: skip
        return
    lines = [
        "# Memory Mosaics vs GPT on TinyStories at CPU scale",
        "",
        "Generated by `mosaic reproduce` from a real run; every number below was measured by it. The paper's",
        "claims are in `../shared/reference/paper_results.md` (Memory Mosaics, ICLR 2025, Figures 7 and 8).",
        "",
        "## How this was run",
        "",
        "```",
        summary.get("command", "mosaic reproduce"),
        "```",
        "",
        f"- Run time: {summary.get('span_s', 0) / 60:.1f} min from start to the last job's end, with "
        f"{cfg['jobs']} worker process(es) of {cfg['threads']} torch thread(s) each "
        f"({summary.get('job_time_s', 0) / 60:.1f} min of training and evaluation summed over jobs); "
        f"{summary.get('machine', '')}.",
        f"- Training data: TinyStories sample ({summary.get('data', {}).get('train_tokens', '?'):,} training tokens, "
        f"{summary.get('data', {}).get('val_tokens', '?'):,} validation tokens, BPE {cfg['vocab_size']} trained on the "
        "training stories).",
        f"- Out-of-distribution text: {ood.get('description', '?')} — {ood.get('documents', '?')} documents, "
        f"{ood.get('tokens', 0):,} tokens (see `experiments/README.md` for why).",
        f"- Seeds: {', '.join(map(str, cfg['seeds']))}; the same seed gives both models the same training windows.",
        f"- Jobs finished: {len(jobs['finished'])} of {len(jobs['planned'])}"
        + (f"; **missing: {', '.join(jobs['missing'])}**" if jobs["missing"] else "")
        + ".",
        "",
        "Both models have the same width, heads, block and tokens at each depth. The Memory Mosaic's",
        "persistent memory has 3.5 × width slots so that a block holds 12·C² weights like a GPT block; the",
        "GPT also has a position table (block × width), the Memory Mosaic has none. Learning rates are those",
        "of the shipped presets, each the best of three in a 120-step proxy run of the 4-layer model (MM:",
        "3e-3/1e-2/2e-2; GPT: 1.5e-3/3e-3/6e-3; see `experiments/README.md`).",
        "",
        *_setup_table(summary),
        "",
        "## Validation loss by depth (the paper's Figure 7 claim)",
        "",
        "Mean over seeds ± half the range; loss in nats per token on the whole TinyStories validation split.",
        "",
        *_loss_table(summary, "val_loss"),
        "",
        f"![validation loss by depth]({fig.get('val_loss', '')})",
        f"![validation loss during training]({fig.get('curves', '')})",
        "",
        "## Loss by token position (the paper's Figure 8 claim)",
        "",
        "Mean loss of the token at each position of a document (position 0 is the first token after the",
        "document start), averaged over the positions in each range.",
        "",
        "**In distribution (TinyStories validation):**",
        "",
        *_bucket_table(summary, "val"),
        "",
        "**Out of distribution:**",
        "",
        *_bucket_table(summary, "ood"),
        "",
        "Whole-set out-of-distribution loss:",
        "",
        *_loss_table(summary, "ood_loss"),
        "",
        f"![loss by position]({fig.get('per_position', '')})",
        f"![gap by position]({fig.get('gap', '')})",
        "",
        "## Generation quality: the likelihood-ranking prompt suite",
        "",
        "Accuracy = share of prompts whose correct continuation has the highest total log-likelihood",
        "(right/asked, pooled over seeds). The suite (`src/memory_mosaics/experiments/prompts.jsonl`) was",
        "written for this project.",
        "",
        *_prompt_table(summary),
        "",
        f"![prompt suite]({fig.get('prompts', '')})",
        "",
        "## Sampled stories",
        "",
        f"Temperature 0.8, top-k 50, at most {cfg['sample_tokens']} new tokens, stopped at the end-of-text token.",
        "",
        *_samples(summary),
        "## Reading",
        "",
        _kept_reading(path),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
