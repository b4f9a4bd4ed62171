"""The GPT's GELU against nanoGPT's: the compiled tanh-GELU kernel, PyTorch's tanh GELU and PyTorch's exact
GELU, per activation, forward and forward + backward through autograd.

The project's GPT runs the same operators as the benchmark's plain nanoGPT except this one (the tanh form
the authors' baseline prescribes, where nanoGPT takes the exact GELU), so whether the GPT can be slower than
nanoGPT by construction comes down to these timings. One (batch, T, 4 C) activation of the throughput
benchmark's model (8, 256, 1,024 by default); the forms are timed in interleaved rounds, the order
alternating, median of the rounds. In bf16 also the compiled forward with the software rounding the kernel
keeps for CPUs without AVX512-BF16 (where this CPU has the instruction), to show what the rounding costs.

    python benchmarks/gelu_speed.py --threads 1 --rounds 41 --json benchmarks/results/gelu_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _arguments import add_cell_options, cell_options, integers, writable
from memory_mosaics.ops import gelu_cpu


def forms(dtype: torch.dtype) -> dict[str, Callable]:
    kernel = gelu_cpu.kernel()
    found = {
        "compiled tanh GELU (the GPT's)": gelu_cpu.gelu_tanh,
        "exact GELU (nanoGPT's)": F.gelu,
        "PyTorch tanh GELU": lambda x: F.gelu(x, approximate="tanh"),
    }
    if dtype == torch.bfloat16 and kernel is not None and kernel.native_rounding():
        found["compiled tanh GELU, software rounding (forward only)"] = lambda x: kernel.forward(
            x.detach().contiguous(), software_rounding=True
        )
    return found


def measure(shape: tuple[int, ...], dtype: torch.dtype, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms of forward and of forward + backward per form (forward only where the form has no backward)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(dtype)
    named = forms(dtype)
    times = {name: {"forward_ms": [], "forward_backward_ms": []} for name in named}
    order = list(named)

    def run(name: str) -> tuple[float, float | None]:
        x.grad = None
        start = time.perf_counter()
        y = named[name](x)
        middle = time.perf_counter()
        if not y.requires_grad:
            return middle - start, None
        y.backward(grad)
        return middle - start, time.perf_counter() - start

    for round_index in range(rounds + 1):  # round 0 warms up and is dropped
        for name in order if round_index % 2 else reversed(order):
            # Untimed first: where a call's outputs land (pages the allocator keeps, or fresh ones the system
            # must fault in and zero) depends on what ran just before, and moved a 1-2 ms call by up to a
            # third in trials; after a call of the same form the timed call meets its own steady state.
            run(name)
            forward, forward_backward = run(name)
            if round_index:
                times[name]["forward_ms"].append(1e3 * forward)
                if forward_backward is not None:
                    times[name]["forward_backward_ms"].append(1e3 * forward_backward)
    return {
        name: {key: statistics.median(values) for key, values in measured.items() if values}
        for name, measured in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,256,1024", help="the activation's shape (default 8,256,1024)")
    add_cell_options(parser, lengths=None, rounds=41)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    shape = tuple(integers(parser, "--shape", args.shape, 1))
    _, dtypes = cell_options(parser, args)
    json_path = writable(parser, args.json)
    if not gelu_cpu.usable(torch.empty(0)):
        print("the compiled GELU is off or cannot be built or run here: nothing to compare", file=sys.stderr)
        return 1
    result = {"shape": shape, "rounds": args.rounds, "threads": torch.get_num_threads(), "cells": []}
    for dtype in dtypes:
        medians = measure(shape, getattr(torch, dtype), args.rounds)
        exact = medians["exact GELU (nanoGPT's)"]
        ratios = {
            name: {key: value / exact[key] for key, value in measured.items()} for name, measured in medians.items()
        }
        result["cells"].append({"dtype": dtype, "median_ms": medians, "over_exact_gelu": ratios})
        for name, measured in medians.items():
            cells = ", ".join(f"{key} {value:.2f} ({ratios[name][key]:.2f}x exact)" for key, value in measured.items())
            print(f"{dtype:9} {name}: {cells}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
