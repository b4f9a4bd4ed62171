"""Where a training step's time goes: MemoryMosaic against GPT, operator by operator.

Runs the `mosaic bench` step (forward + backward + AdamW, n_layer 4, n_embd 256, n_head 4, vocab 4096,
batch 8) of both models under the PyTorch profiler, sums each operator's own CPU time per step by
operator and input shape, and sorts it into groups a reader can compare:

- fused attention split by caller: the context memory's causal read (T - v_shift queries), the
  persistent memory's read (the batch folded into one sequence of queries against P slots) and the
  GPT's causal attention (T queries); the compiled kernels of both reads, where they run, apart;
- matrix products (mm, addmm, bmm, baddbmm), the loss (log-softmax forward and backward), and the rest
  (elementwise work, copies, normalisations, the optimiser).

The profiler adds a cost to every operator, and the Memory Mosaic runs several times as many, so its
profiled total is inflated more than the GPT's; the script also reports the median wall time of
unprofiled steps taken in the same interleaved rounds. Use the groups to see *where* the difference
is; `mosaic bench` says how large it is.

    python benchmarks/profile_step.py --length 256 --dtype bfloat16   # -> results/profile_step_256_bfloat16.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from memory_mosaics.bench.throughput import ThroughputSettings, build_model, training_step
from memory_mosaics.commands._common import check_writable
from memory_mosaics.errors import MosaicError

RESULTS = Path(__file__).resolve().parent / "results"
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
MODELS = ("mosaic", "gpt")
LOSS = {"aten::_log_softmax", "aten::_log_softmax_backward_data"}


def group(name: str, shapes: list, length: int) -> str:
    if name.startswith("PersistentReadCPU"):  # the compiled kernel (bf16 and float32 on AMX CPUs), fwd and bwd
        return "persistent read: compiled kernel"
    if name.startswith("ContextReadCPU"):  # the compiled kernel (bf16 and float32 on AMX CPUs)
        return "context read: compiled kernel"
    if "scaled_dot_product" in name:
        queries = shapes[0] if shapes and shapes[0] else []
        if len(queries) == 4 and queries[0] == 1 and queries[2] > length:
            return "fused attention: persistent read"
        if len(queries) == 4 and queries[2] < length:
            return "fused attention: context read"
        return "fused attention: causal self-attention"
    if name in PRODUCTS:
        return "matrix products"
    if name in LOSS:
        return "loss (log-softmax)"
    return "other"


def profile_models(length: int, dtype: str, rounds: int) -> dict:
    """Both models in interleaved rounds (the machine's speed drifts; alternating shares the drift):
    each round runs, per model, one timed unprofiled step and one profiled step."""
    settings = ThroughputSettings()
    steps = {m: training_step(build_model(m, settings, length), settings, length, dtype) for m in MODELS}
    for step in steps.values():
        for _ in range(2):
            step()
    wall = {m: [] for m in MODELS}
    operators = {m: collections.Counter() for m in MODELS}
    groups = {m: collections.Counter() for m in MODELS}
    for _ in range(rounds):
        for m, step in steps.items():
            start = time.perf_counter()
            step()
            wall[m].append((time.perf_counter() - start) * 1000)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            for event in prof.key_averages(group_by_input_shape=True):
                ms = event.self_cpu_time_total / rounds / 1000
                operators[m][f"{event.key} {event.input_shapes}"] += ms
                groups[m][group(event.key, event.input_shapes, length)] += ms
    return {
        m: {
            "wall_ms_per_step": statistics.median(wall[m]),
            "ms_per_step": sum(groups[m].values()),
            "groups": dict(groups[m]),
            "operators": dict(operators[m]),
        }
        for m in MODELS
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (after 2 untimed steps each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="operators with the largest differences to print")
    parser.add_argument("--json", default=None, help="default results/profile_step_<length>_<dtype>.json")
    args = parser.parse_args()
    if args.length < 2 or args.rounds < 1 or args.threads < 1 or args.top < 0:
        parser.error("--length must be at least 2, --rounds and --threads at least 1, --top at least 0")
    path = Path(args.json or RESULTS / f"profile_step_{args.length}_{args.dtype}.json")
    try:  # before the minutes of profiling, not after them
        path.parent.mkdir(parents=True, exist_ok=True)
        check_writable(path, "--json")
    except (OSError, MosaicError) as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    result = profile_models(args.length, args.dtype, args.rounds)
    mosaic, gpt = result["mosaic"], result["gpt"]

    print(f"T={args.length} {args.dtype}, profiler ms per step (self CPU time): mosaic / gpt")
    for name in sorted(set(mosaic["groups"]) | set(gpt["groups"])):
        print(f"  {name:40s} {mosaic['groups'].get(name, 0):8.1f} {gpt['groups'].get(name, 0):8.1f}")
    print(f"  {'total':40s} {mosaic['ms_per_step']:8.1f} {gpt['ms_per_step']:8.1f}")
    print(f"  {'wall time of unprofiled steps':40s} {mosaic['wall_ms_per_step']:8.1f} {gpt['wall_ms_per_step']:8.1f}")
    operators = set(mosaic["operators"]) | set(gpt["operators"])
    difference = lambda op: mosaic["operators"].get(op, 0) - gpt["operators"].get(op, 0)  # noqa: E731
    print("largest differences (mosaic - gpt), ms per step:")
    for op in sorted(operators, key=lambda op: -abs(difference(op)))[: args.top]:
        print(f"  {difference(op):+8.1f}  {op[:150]}")

    payload = {"length": args.length, "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds, **result}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
