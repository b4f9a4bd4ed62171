"""The Memory Mosaic of an earlier commit against today's, and the GPT, interleaved in one process.

The earlier package is extracted with `git archive REV src/memory_mosaics` into a temporary folder
and imported under another name, so both models train side by side (forward + backward + AdamW,
the `mosaic bench` shape), in rotating rounds, each timed step after --settle-steps untimed ones of the
same model; median per model.

    python benchmarks/before_after.py --rev 6daeb79 --lengths 256 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from _arguments import add_cell_options, add_settle_option, cell_options, writable
from memory_mosaics.bench.throughput import ThroughputSettings, build_model, training_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def import_revision(rev: str, folder: Path):
    """The package as of `rev`, importable as `memory_mosaics_then`."""
    archive = subprocess.run(
        ["git", "archive", rev, "src/memory_mosaics"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "memory_mosaics_then"
    (folder / "src" / "memory_mosaics").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(path.read_text().replace("memory_mosaics", "memory_mosaics_then"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("memory_mosaics_then")


def measure(then, length: int, dtype: str, rounds: int, batch_size: int = 8, settle_steps: int = 1) -> dict:
    settings = ThroughputSettings(batch_size=batch_size)
    torch.manual_seed(settings.seed)
    config = then.MemoryMosaicConfig(
        vocab_size=settings.vocab_size,
        block_size=length,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_embd=settings.n_embd,
        dropout=0.0,
        pmem_size=int(3.5 * settings.n_embd),
    )
    models = {
        "mosaic_then": then.MemoryMosaic(config),
        "mosaic_now": build_model("mosaic", settings, length),
        "gpt": build_model("gpt", settings, length),
    }
    steps = {name: training_step(model, settings, length, dtype) for name, model in models.items()}
    seconds = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds + 1):  # round 0 warms up
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(settle_steps):  # untimed, of the same model: a step after another model's runs slower
                steps[name]()
            start = time.perf_counter()
            steps[name]()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "seq_len": length,
        "dtype": dtype,
        "settle_steps": settle_steps,
        "seconds_per_step": median,
        "all_seconds": seconds,
        "speedup_now_over_then": median["mosaic_then"] / median["mosaic_now"],
        "mosaic_over_gpt_then": median["gpt"] / median["mosaic_then"],
        "mosaic_over_gpt_now": median["gpt"] / median["mosaic_now"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="6daeb79")
    add_cell_options(parser, lengths="256", rounds=7, threads=1)
    add_settle_option(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="1 with a short --lengths: the per-step fixed cost")
    parser.add_argument("--json", default=str(RESULTS / "before_after.json"))
    args = parser.parse_args()
    lengths, dtypes = cell_options(parser, args)  # before the minutes of measuring
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    json_path = writable(parser, args.json)
    with tempfile.TemporaryDirectory() as folder:
        try:
            then = import_revision(args.rev, Path(folder))
        except subprocess.CalledProcessError as err:
            parser.error(f"--rev {args.rev!r}: {err.stderr.decode().strip() or 'git archive failed'}")
        cells = []
        for length in lengths:
            for dtype in dtypes:
                cells.append(measure(then, length, dtype, args.rounds, args.batch_size, args.settle_steps))
                print(json.dumps({k: v for k, v in cells[-1].items() if k != "all_seconds"}), flush=True)
    result = {
        "rev": args.rev,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "settle_steps": args.settle_steps,
        "cells": cells,
    }
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
