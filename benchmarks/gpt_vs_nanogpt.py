"""The project's GPT against the plain nanoGPT of the throughput benchmark, paired round by round.

`mosaic bench` times three models per round in rotation and compares medians; two models that run the
same operators (the GPT differs from nanoGPT only by its GELU) differ by less than that design resolves on
a shared machine. Here each round runs GPT, nanoGPT, nanoGPT, GPT (an ABBA order, which cancels a steady
drift of the machine's speed within the round), the round's ratio is nanoGPT's time over the GPT's (above 1:
the GPT is faster), and the rounds give its median, quartiles and a sign count: in how many rounds the GPT
was the faster. Same model shapes, steps and optimiser as `mosaic bench` (`bench/throughput.py`).

    python benchmarks/gpt_vs_nanogpt.py --threads 1 --lengths 256,1024 --rounds 40 \
        --json benchmarks/results/gpt_vs_nanogpt_paired.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _arguments import add_cell_options, cell_options, writable
from memory_mosaics.bench.throughput import ThroughputSettings, build_model, training_step

ORDER = ("gpt", "nanogpt", "nanogpt", "gpt")


def paired_rounds(length: int, dtype: str, rounds: int, settings: ThroughputSettings) -> dict:
    steps = {name: training_step(build_model(name, settings, length), settings, length, dtype) for name in ORDER[:2]}
    for step in steps.values():  # warm-up: first-call allocations, kernel loading
        step()
        step()
    ratios = []
    for _ in range(rounds):
        seconds = dict.fromkeys(steps, 0.0)
        for name in ORDER:
            start = time.perf_counter()
            steps[name]()
            seconds[name] += time.perf_counter() - start
        ratios.append(seconds["nanogpt"] / seconds["gpt"])
    ordered = sorted(ratios)
    return {
        "seq_len": length,
        "dtype": dtype,
        "rounds": rounds,
        "median_gpt_over_nanogpt": statistics.median(ratios),
        "quartiles": [ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]],
        "rounds_gpt_faster": sum(ratio > 1 for ratio in ratios),
        "round_ratios": ratios,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_options(parser, lengths="256,1024", rounds=40)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    lengths, dtypes = cell_options(parser, args)
    json_path = writable(parser, args.json)
    settings = ThroughputSettings()
    cells = []
    for length in lengths:
        for dtype in dtypes:
            cell = paired_rounds(length, dtype, args.rounds, settings)
            cells.append(cell)
            low, high = cell["quartiles"]
            ratio, faster = cell["median_gpt_over_nanogpt"], cell["rounds_gpt_faster"]
            print(
                f"T={length} {dtype}: GPT/nanoGPT {ratio:.3f} (quartiles {low:.3f}-{high:.3f}),"
                f" the GPT faster in {faster} of {args.rounds} rounds"
            )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "order": ORDER, "cells": cells}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
