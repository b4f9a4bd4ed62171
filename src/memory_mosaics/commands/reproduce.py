"""`mosaic reproduce`: the paper's language-modelling claims at CPU scale, from data to report."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from pathlib import Path

from memory_mosaics.errors import ConfigError

QUICK = {
    "model_overrides": {"n_embd": 32, "n_head": 2, "block_size": 128, "pmem_size": 112},
    "train_overrides": {"batch_size": 2, "eval_interval": 2, "eval_batches": 1, "warmup_steps": 1, "log_interval": 1},
    "max_steps": 3,
    "vocab_size": 300,
    "max_docs": 60,
    "max_eval_docs": 4,
    "prompts_per_category": 2,
    "sample_tokens": 8,
    "depths": (1, 2),
    "seeds": (0,),
    "jobs": 1,
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="Memory Mosaic vs GPT at depths 1, 2, 4 on TinyStories: losses, loss by position, prompt suite",
        description=(
            "Train a Memory Mosaic and a same-size GPT at each depth on the same tokens and seeds, then "
            "measure validation loss, loss by token position in and out of distribution, a likelihood-ranking "
            "prompt suite and sampled stories. Writes --json, --markdown and figures. Finished jobs are kept "
            "in --out and skipped when the command runs again. The default run (12 models) took 77 min on two "
            "CPU cores shared with other work; --quick is a toy version of a few seconds."
        ),
    )
    parser.add_argument(
        "--data",
        default="../shared/data/tinystories",
        help="train.txt + valid.txt folder, or a prepared one (default ../shared/data/tinystories)",
    )
    parser.add_argument(
        "--out",
        default="runs/reproduce",
        help="work folder: prepared data, runs, per-job results (default runs/reproduce)",
    )
    parser.add_argument("--depths", type=_int_list, help="comma-separated depths (default 1,2,4)")
    parser.add_argument("--seeds", type=_int_list, help="comma-separated seeds (default 1337,1338)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of every model (default 600)")
    parser.add_argument("--ood", help="python-docs (default), or a local text/jsonl file or folder "
                        "(e.g. Simple English Wikipedia)")  # fmt: skip
    parser.add_argument("--jobs", type=int, help="models trained at once, in worker processes (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    parser.add_argument("--eval-dtype", choices=["float32", "bfloat16"], help="evaluation autocast (default bfloat16)")
    parser.add_argument("--quick", action="store_true", help="toy sizes for a smoke test (seconds)")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: rewrite the outputs from the jobs finished in --out"
    )
    parser.add_argument(
        "--rescore-prompts", action="store_true", help="with --report-only: score the prompt suite again with the "
        "saved models (after the suite was edited)"
    )  # fmt: skip
    parser.add_argument("--json", default="docs/results.json", help="summary JSON to write (default docs/results.json)")
    parser.add_argument(
        "--markdown", default="docs/results.md", help="report to write, '' for none (default docs/results.md)"
    )
    parser.add_argument(
        "--figures", default="docs/figures", help="folder for the PNG figures, '' for none (default docs/figures)"
    )
    parser.set_defaults(run=run)


FIGURE_REFRESH_S = 300
FLAGS = ("depths", "seeds", "max_steps", "ood", "jobs", "threads", "eval_dtype")


def build_config(args: argparse.Namespace):
    """The experiment's config: defaults (or the --quick sizes), then the flags that were typed."""
    from memory_mosaics.experiments.lm_depths import ReproduceConfig

    values = dict(QUICK) if args.quick else {}
    values.update(data=args.data, out=args.out)
    values.update({name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})
    return ReproduceConfig(**values)


def command_line(args: argparse.Namespace, config) -> str:
    """The command that redoes this run (every setting spelled out)."""
    parts = ["mosaic", "reproduce", "--data", config.data, "--out", config.out]
    if args.quick:
        parts.append("--quick")
    parts += ["--depths", ",".join(map(str, config.depths)), "--seeds", ",".join(map(str, config.seeds))]
    parts += ["--max-steps", str(config.max_steps), "--ood", config.ood, "--jobs", str(config.jobs)]
    parts += ["--threads", str(config.threads), "--eval-dtype", config.eval_dtype]
    parts += ["--json", args.json, "--markdown", args.markdown, "--figures", args.figures]
    return shlex.join(parts)


def _check_outputs(args: argparse.Namespace) -> None:
    from memory_mosaics.commands._common import check_writable

    for name in ("json", "markdown"):
        if getattr(args, name):
            check_writable(getattr(args, name), f"--{name}")


def run(args: argparse.Namespace) -> int:
    import torch

    from memory_mosaics.commands._common import write_json
    from memory_mosaics.data import PreparedData
    from memory_mosaics.experiments.lm_depths import (
        check_sources,
        claim_work_folder,
        finished_rows,
        ood_token_stream,
        prepare_data,
        rescore_prompts,
        run_experiment,
    )
    from memory_mosaics.experiments.report import FIGURES, plot_all, write_markdown
    from memory_mosaics.experiments.summary import summarize

    _check_outputs(args)
    if args.rescore_prompts and not args.report_only:
        raise ConfigError("--rescore-prompts goes with --report-only (a full run scores the current suite anyway)")
    config = build_config(args)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    check_sources(config)
    claim_work_folder(config)
    data_dir = prepare_data(config)
    manifest = PreparedData.open(data_dir, verify=False).manifest
    _, ood_meta = ood_token_stream(config, data_dir)
    extra = {
        "command": command_line(args, config),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}"
        ),
        "data": {
            "path": str(data_dir),
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "val_tokens": manifest["splits"]["val"]["tokens"],
            "tokenizer": manifest["tokenizer"]["name"],
        },
        "ood": ood_meta,
    }

    drawn = [time.perf_counter()]  # when the figures were last drawn

    def report(row: dict, rows: list[dict]) -> None:
        print(f"done {row['job']}: val loss {row['val_loss']:.4f}, ood loss {row['ood_loss']:.4f}, "
              f"train {row['train_time_s'] / 60:.1f} min", flush=True)  # fmt: skip
        # Drawing takes seconds: during a long run, refresh the figures every few minutes only.
        write_outputs(rows, figures=time.perf_counter() - drawn[0] > FIGURE_REFRESH_S)

    def write_outputs(rows: list[dict], figures: bool) -> dict:
        summary = summarize(rows, config, extra)
        summary["wall_time_s"] = time.perf_counter() - started
        summary["job_time_s"] = sum(r["train_time_s"] + r["eval_time_s"] for r in rows)
        # From the first start in this work folder to the last job's end (across resumed runs).
        first_start = (Path(config.out) / "experiment.json").stat().st_mtime
        summary["span_s"] = max((r["finished_at"] for r in rows), default=first_start) - first_start
        names = {}
        if args.figures and figures:
            names = plot_all(summary, args.figures)
            drawn[0] = time.perf_counter()
        if args.json:
            write_json(args.json, summary)
        if args.markdown:
            rel = os.path.relpath(args.figures or ".", Path(args.markdown).resolve().parent)
            write_markdown(summary, args.markdown, rel, names or (FIGURES if args.figures else {}))
        return summary

    if args.report_only:
        rows = finished_rows(config)
        if args.rescore_prompts:
            rows = rescore_prompts(config, rows)
    else:
        rows = run_experiment(config, on_done=report)
    summary = write_outputs(rows, figures=True)
    for depth, entry in summary["depths"].items():
        print(f"depth {depth}: Memory Mosaic {entry['mosaic_val_loss']:.4f}, GPT {entry['gpt_val_loss']:.4f} "
              f"(params {entry['mosaic_params']:,} / {entry['gpt_params']:,})")  # fmt: skip
    print(f"wrote {', '.join(p for p in (args.json, args.markdown) if p)} in {summary['wall_time_s'] / 60:.1f} min")
    return 0
