"""`mosaic regbench`: in-context learning of random regular languages (RegBench), Memory Mosaic
against a transformer, recurrent networks and state-space models.

For each model, training-set size and seed: draw the data set (seeded), train with the benchmark's
protocol, score the best-val-loss checkpoint on the test DFAs, and print a table with the
published numbers beside ours. Writes JSON rows {model, num_train_dfas, seed, accuracy, tvd,
params, ...} (after every run, so an interrupted sweep keeps what it finished) and a PNG figure.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from memory_mosaics.commands._common import write_json
from memory_mosaics.errors import ConfigError

# The benchmark's budget (seq_icl dfa/base): days per model on a CPU, a GPU's job.
FULL = {
    "train_dfas": [100, 500, 1000, 2500],
    "num_test_dfas": 1000,
    "epochs": 200.0,
    "steps": None,
    "batch_size": 32,
    "lr": 5e-4,
    "max_len": None,
    "num_evals": None,
    "dropout": None,
    "dtype": "bfloat16",
    "threads": None,
}
# --quick: every model family on 100 training DFAs, each for the same 150 steps of 16 prompts
# cropped to their first 128 tokens (about 5 strings), float32 (faster than bf16 at these small
# widths), no dropout, one thread (these small ops gain little from a second one, and threads
# that spin on a busy machine waste most of their time), scored on 100 test DFAs. It measures
# how fast each architecture starts to learn in context, not the paper's converged numbers
# (docs/regbench.md).
QUICK = {
    "train_dfas": [100],
    "num_test_dfas": 200,
    "epochs": 200.0,
    "steps": 150,
    "batch_size": 16,
    "lr": 3e-3,
    "max_len": 128,
    "num_evals": 2,
    "dropout": 0.0,
    "dtype": "float32",
    "threads": 1,
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _orders(text: str) -> list[int]:
    orders = _int_list(text) if text.strip() else []
    if any(order < 1 for order in orders):
        raise argparse.ArgumentTypeError(f"n-gram orders must be >= 1, got {text!r}")
    return orders


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "regbench",
        help="RegBench in-context language learning: Memory Mosaic vs transformer, RNNs and SSMs",
        description=(
            "Train and test models on RegBench (random regular languages, Akyuerek et al. 2024) with the "
            "benchmark's protocol: batch 32, AdamW lr 5e-4 wd 0.1, 10% warm-up then cosine, 200 epochs, "
            "best-val-loss checkpoint scored on held-out DFAs by accuracy and TVD. That default budget is a GPU "
            "job (about a week of one CPU core for all models and sizes); --quick is a ~5 CPU-minute run of "
            "every model family (docs/regbench.md says what it measures)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help=f"a short CPU run of every model family: {QUICK}")
    parser.add_argument("--models", help="comma-separated model names (default: all available)")
    parser.add_argument("--train-dfas", type=_int_list, help="training-set sizes (default 100,500,1000,2500)")
    parser.add_argument("--seeds", type=_int_list, default=[0], help="seeds of data and initialisation")
    parser.add_argument("--num-test-dfas", type=int, help="held-out DFAs, half val, half test (default 1000)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="training budget in epochs (default 200)")
    budget.add_argument("--steps", type=int, help="training budget in optimiser steps (overrides epochs)")
    parser.add_argument("--batch-size", type=int, help="prompts per step (default 32)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    parser.add_argument("--max-len", type=int, help="crop prompts to this many tokens (default: whole prompts)")
    parser.add_argument("--num-evals", type=int, help="validation passes (default: once per epoch)")
    parser.add_argument("--dropout", type=float, help="override every model's dropout (default: their own)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="autocast dtype (default bfloat16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument(
        "--reference-data", metavar="F", help="train/val/test on a data set written by the benchmark's own generator"
    )
    parser.add_argument(
        "--ngram",
        type=_orders,
        default=[2, 3],
        help="orders of the training-free in-context n-gram anchors to score on each test split ('' for none)",
    )
    parser.add_argument("--json", metavar="F", help="write the result rows as JSON to F")
    parser.add_argument("--png", metavar="F", help="write the accuracy/TVD figure to F")
    parser.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> dict:
    settings = dict(QUICK if args.quick else FULL)
    for name in settings:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    if args.epochs is not None:  # an explicit epoch budget replaces --quick's step budget
        settings["steps"] = None
    return settings


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from memory_mosaics.tasks.regbench.data import load_reference
    from memory_mosaics.tasks.regbench.models import MODELS
    from memory_mosaics.tasks.regbench.ngram import score_ngram
    from memory_mosaics.tasks.regbench.published import published

    settings = _settings(args)
    if settings["threads"] is not None:
        if settings["threads"] < 1:
            raise ConfigError(f"--threads must be >= 1, got {settings['threads']}")
        torch.set_num_threads(settings["threads"])
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown {', '.join(unknown)}; available: {', '.join(MODELS)}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    reference = load_reference(args.reference_data) if args.reference_data else None
    overrides = {} if settings["dropout"] is None else {"dropout": settings["dropout"]}
    shared = {"settings": {**settings, "device": device, "reference_data": args.reference_data}}
    rows: list[dict] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for seed in args.seeds:
        for num_train in settings["train_dfas"]:
            splits = _splits(reference, num_train, settings["num_test_dfas"], seed)
            where = {"num_train_dfas": len(splits.train), "seed": seed}
            for order in args.ngram:  # training-free anchors on the same test prompts
                clock = time.perf_counter()
                sums = score_ngram(splits.test, order, settings["max_len"])
                anchor = {"accuracy": sums.accuracy, "tvd": sums.tvd, "params": 0}
                seconds = round(time.perf_counter() - clock, 1)
                rows.append({"model": f"ngram-{order}", **where, **anchor, "seconds": seconds, **shared})
            for name in models:
                result = _train_with_progress(name, splits, _train_config(settings, seed), device, overrides)
                rows.append({"model": name, **where, **asdict(result), **shared})
                tqdm.write(
                    f"{name:12s} @{len(splits.train):5d} seed {seed}: accuracy {result.accuracy:.3f} "
                    f"tvd {result.tvd:.3f} ({result.params} params, {result.seconds:.0f} s, "
                    f"{result.cpu_seconds:.0f} s CPU)"
                )
                if args.json:
                    write_json(args.json, rows)
    print(_table(rows, published))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"total {wall:.0f} s wall, {cpu:.0f} s CPU; settings {settings}")
    if args.png:
        from memory_mosaics.tasks.regbench.plot import plot_regbench

        title = "mosaic regbench" + (" --quick" if args.quick else "")
        plot_regbench(rows, args.png, title=f"{title}: ours (solid) vs published (dashed)")
        print(f"wrote {args.png}")
    return 0


def _splits(reference, num_train: int, num_test: int, seed: int):
    """The data set for one sweep point: drawn from `seed`, or cut from the benchmark's file."""
    from memory_mosaics.tasks.regbench.data import RegBenchConfig, RegBenchSplits, generate_regbench

    if reference is None:
        return generate_regbench(RegBenchConfig(num_train=num_train, num_test=num_test, seed=seed))
    if num_train > len(reference.train):
        raise ConfigError(f"--train-dfas {num_train}: the reference data has {len(reference.train)} training DFAs")
    return RegBenchSplits(reference.train[:num_train], reference.val, reference.test)


def _train_config(settings: dict, seed: int):
    from memory_mosaics.tasks.regbench.harness import TrainConfig

    names = ("epochs", "steps", "batch_size", "lr", "max_len", "num_evals", "dtype")
    return TrainConfig(**{name: settings[name] for name in names}, seed=seed)


def _train_with_progress(name: str, splits, config, device: str, overrides: dict):
    """`run_model` with a progress bar showing the training loss."""
    from tqdm import tqdm

    from memory_mosaics.tasks.regbench.harness import run_model

    with tqdm(desc=f"{name} @{len(splits.train)} seed {config.seed}", unit="step", leave=False) as bar:

        def on_step(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

        return run_model(name, splits, config, device, on_step, **overrides)


def _table(rows: list[dict], published) -> str:
    """Mean over seeds per (model, size), with the published numbers where there are some."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["num_train_dfas"]), []).append(row)
    lines = [
        f"{'model':12s} {'params':>8s} {'train DFAs':>10s} {'seeds':>5s} {'accuracy':>8s} {'TVD':>6s}"
        f" {'published acc':>13s} {'published TVD':>13s}"
    ]
    for (model, size), runs in groups.items():
        acc = sum(r["accuracy"] for r in runs) / len(runs)
        tvd = sum(r["tvd"] for r in runs) / len(runs)
        paper = published(model, size)
        paper_acc, paper_tvd = (f"{paper[0]:.3f}", f"{paper[1]:.3f}") if paper else ("-", "-")
        lines.append(
            f"{model:12s} {runs[0]['params']:8d} {size:10d} {len(runs):5d} {acc:8.3f} {tvd:6.3f}"
            f" {paper_acc:>13s} {paper_tvd:>13s}"
        )
    return "\n".join(lines)
