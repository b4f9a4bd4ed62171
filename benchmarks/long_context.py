"""Training at T = 16,384 on CPU: peak memory, and the largest tensor any operator builds.

One training step (forward + backward + AdamW) of the benchmark's Memory Mosaic (and, with
--models, the GPT) at batch 1, in a fresh process per model (see memory_mosaics.bench.memory). A
dispatch mode records the largest tensor returned by any operator: for a Memory Mosaic it must be far
below T^2 — the leaky average is a chunked scan and the persistent memory reads through the fused
attention kernel — while the context memory's attention is the fused kernel, whose scratch is blocks
of T (attention's own).

    python benchmarks/long_context.py     # writes benchmarks/results/long_context.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memory_mosaics.bench.memory import peak_memory
from memory_mosaics.bench.throughput import ThroughputSettings

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--models", default="mosaic", help="comma-separated: mosaic,gpt")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=str(RESULTS / "long_context.json"))
    args = parser.parse_args()
    settings = ThroughputSettings(batch_size=1, lengths=(args.length,), dtypes=(args.dtype,), threads=args.threads)
    rows = []
    for model in args.models.split(","):
        row = {"model": model, "seq_len": args.length, "dtype": args.dtype, "batch_size": 1}
        row.update(peak_memory(settings, model, args.length, args.dtype, largest=True, timeout=7200))
        row["largest_tensor_over_t_squared"] = row["largest_tensor_numel"] / args.length**2
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
