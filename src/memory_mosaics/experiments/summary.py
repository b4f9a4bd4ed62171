"""Fold the per-job results of `lm_depths` into one summary: means over seeds, per depth and kind.

The summary is what `mosaic reproduce` writes to docs/results.json; `report.py` draws and writes it.
Only depths where both kinds finished a seed are compared, and only over the seeds both finished.
"""

from __future__ import annotations

import math
from statistics import mean

from memory_mosaics.experiments.lm_depths import KINDS, ReproduceConfig, config_dict, plan_jobs
from memory_mosaics.experiments.prompts import CATEGORIES

# Token-position ranges (0-based: position p predicts the document's token p + 1 from p + 1 tokens).
BUCKETS = ((0, 16), (16, 64), (64, 128), (128, 256))


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi - 1}"


def mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    """Elementwise mean of several per-position curves (None where any of them is None)."""
    out = []
    for values in zip(*curves, strict=True):
        out.append(None if any(v is None for v in values) else mean(values))
    return out


def bucket_means(losses: list[float | None], counts: list[int]) -> dict[str, float | None]:
    """Count-weighted mean loss in each position range that the curve reaches."""
    out = {}
    for lo, hi in BUCKETS:
        pairs = [(v, c) for v, c in zip(losses[lo:hi], counts[lo:hi], strict=True) if v is not None and c]
        weight = sum(c for _, c in pairs)
        out[bucket_name(lo, hi)] = sum(v * c for v, c in pairs) / weight if weight else None
    return out


def _prompt_totals(rows: list[dict]) -> dict:
    """Prompt-suite accuracy pooled over seeds (each seed's model answers every prompt once)."""
    out = {}
    for name in (*CATEGORIES, "overall"):
        parts = [r["prompt_suite"]["summary"][name] for r in rows if name in r["prompt_suite"]["summary"]]
        if not parts:
            continue
        n, right = sum(p["n"] for p in parts), sum(p["right"] for p in parts)
        out[name] = {
            "n": n,
            "right": right,
            "accuracy": right / n,
            "accuracy_by_mean": sum(p["accuracy_by_mean"] * p["n"] for p in parts) / n,
            "chance": sum(p["chance"] * p["n"] for p in parts) / n,
            "accuracy_per_seed": [p["accuracy"] for p in parts],
        }
    return out


def _depth_entry(by_kind: dict[str, list[dict]]) -> dict:
    entry: dict = {"seeds": [r["seed"] for r in by_kind["mosaic"]]}
    for kind in KINDS:
        rows = by_kind[kind]
        entry[f"{kind}_val_loss"] = mean(r["val_loss"] for r in rows)
        entry[f"{kind}_val_loss_seeds"] = [r["val_loss"] for r in rows]
        entry[f"{kind}_ood_loss"] = mean(r["ood_loss"] for r in rows)
        entry[f"{kind}_ood_loss_seeds"] = [r["ood_loss"] for r in rows]
        entry[f"{kind}_params"] = rows[0]["params"]["total"]
        entry[f"{kind}_params_non_embedding"] = rows[0]["params"]["non_embedding"]
        entry[f"{kind}_train_time_s"] = mean(r["train_time_s"] for r in rows)
        entry[f"{kind}_lr"] = rows[0]["train_config"]["lr"]
    entry["train_tokens"] = by_kind["mosaic"][0]["train_tokens"]
    entry["train_steps"] = by_kind["mosaic"][0]["train_steps"]
    return entry


def summarize(rows: list[dict], config: ReproduceConfig, extra: dict | None = None) -> dict:
    """The results.json payload from the finished jobs' rows."""
    planned = [job.name for job in plan_jobs(config)]
    finished = {row["job"]: row for row in rows}
    summary: dict = {
        "experiment": "Memory Mosaic vs GPT at several depths on TinyStories (CPU scale)",
        "config": config_dict(config),
        **(extra or {}),
        "jobs": {
            "planned": planned,
            "finished": [name for name in planned if name in finished],
            "missing": [name for name in planned if name not in finished],
        },
        "depths": {},
        "per_position": {"val": {}, "ood": {}},
        "per_position_buckets": {"val": {}, "ood": {}},
        "prompt_suite": {},
        "samples": {},
        "val_curves": {},
    }
    for depth in config.depths:
        seeds = [
            s for s in config.seeds if all(f"{kind}-d{depth}-s{s}" in finished for kind in KINDS)
        ]  # compare on the seeds both kinds finished
        if not seeds:
            continue
        by_kind = {kind: [finished[f"{kind}-d{depth}-s{s}"] for s in seeds] for kind in KINDS}
        key = str(depth)
        summary["depths"][key] = _depth_entry(by_kind)
        for split in ("val", "ood"):
            curves, buckets = {}, {}
            for kind, kind_rows in by_kind.items():
                curves[kind] = mean_curve([r[f"per_position_{split}"] for r in kind_rows])
                per_seed = [
                    bucket_means(r[f"per_position_{split}"], r[f"per_position_{split}_counts"]) for r in kind_rows
                ]
                buckets[kind] = {name: _mean_or_none([b[name] for b in per_seed]) for name in per_seed[0]}
            buckets["counts"] = by_kind["mosaic"][0][f"per_position_{split}_counts"]
            summary["per_position"][split][key] = curves
            summary["per_position_buckets"][split][key] = buckets
        summary["prompt_suite"][key] = {kind: _prompt_totals(kind_rows) for kind, kind_rows in by_kind.items()}
        summary["samples"][key] = {kind: kind_rows[0]["samples"] for kind, kind_rows in by_kind.items()}
        summary["val_curves"][key] = {kind: [r["val_curve"] for r in kind_rows] for kind, kind_rows in by_kind.items()}
    return summary


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else mean(values)


def spread(values: list[float]) -> float:
    """Half the range over seeds (0 for one seed): the error bar the report shows."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def all_finite(summary: dict) -> bool:
    """Whether every loss in the summary's depth table is a finite number."""
    losses = [v for entry in summary["depths"].values() for k, v in entry.items() if k.endswith("_loss")]
    return bool(losses) and all(isinstance(v, float) and math.isfinite(v) for v in losses)
