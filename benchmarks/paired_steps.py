"""Two models of the throughput benchmark paired round by round: the GPT against nanoGPT by default.

`mosaic bench` times three models per round in rotation and compares medians with bootstrap intervals;
two models whose steps differ by a few per cent differ by less than that design resolves on a shared
machine. Here each round runs A, B, B, A (`--models A,B`; an ABBA order, which cancels a steady drift of
the machine's speed within the round), the round's ratio is B's time over A's (above 1: A is faster,
as a throughput ratio A/B), and the rounds give its median, quartiles and a sign count: in how many
rounds A was the faster. Same model shapes, steps and optimiser as `mosaic bench` (`bench/throughput.py`).

    python benchmarks/paired_steps.py --threads 1 --lengths 256,1024 --rounds 40 \
        --json benchmarks/results/gpt_vs_nanogpt_paired.json
    python benchmarks/paired_steps.py --models mosaic,gpt --threads 1 --lengths 256 --rounds 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _arguments import add_cell_options, cell_options, writable
from memory_mosaics.bench.throughput import MODELS, ThroughputSettings, build_model, training_step


def paired_rounds(models: tuple[str, str], length: int, dtype: str, rounds: int, settings: ThroughputSettings) -> dict:
    first, second = models
    steps = {name: training_step(build_model(name, settings, length), settings, length, dtype) for name in models}
    for step in steps.values():  # warm-up: first-call allocations, kernel loading
        step()
        step()
    ratios = []
    for _ in range(rounds):
        seconds = dict.fromkeys(steps, 0.0)
        for name in (first, second, second, first):
            start = time.perf_counter()
            steps[name]()
            seconds[name] += time.perf_counter() - start
        ratios.append(seconds[second] / seconds[first])
    ordered = sorted(ratios)
    return {
        "seq_len": length,
        "dtype": dtype,
        "rounds": rounds,
        "order": [first, second, second, first],
        f"median_{first}_over_{second}": statistics.median(ratios),
        "quartiles": [ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]],
        f"rounds_{first}_faster": sum(ratio > 1 for ratio in ratios),
        "round_ratios": ratios,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt,nanogpt", help=f"two of {', '.join(MODELS)} (default gpt,nanogpt)")
    add_cell_options(parser, lengths="256,1024", rounds=40)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    models = tuple(args.models.split(","))
    if len(models) != 2 or len(set(models)) != 2 or not set(models) <= set(MODELS):
        parser.error(f"--models: two different models of {', '.join(MODELS)}, got {args.models!r}")
    lengths, dtypes = cell_options(parser, args)
    json_path = writable(parser, args.json)
    first, second = models
    settings = ThroughputSettings()
    cells = []
    for length in lengths:
        for dtype in dtypes:
            cell = paired_rounds(models, length, dtype, args.rounds, settings)
            cells.append(cell)
            low, high = cell["quartiles"]
            ratio, faster = cell[f"median_{first}_over_{second}"], cell[f"rounds_{first}_faster"]
            print(
                f"T={length} {dtype}: {first}/{second} {ratio:.3f} (quartiles {low:.3f}-{high:.3f}),"
                f" {first} faster in {faster} of {args.rounds} rounds"
            )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "models": models, "cells": cells}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
