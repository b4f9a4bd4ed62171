"""Forward + backward + AdamW tokens/s of Memory Mosaic vs GPT at equal parameter counts; writes JSON.

    python benchmarks/train_throughput.py --json benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memory_mosaics.bench.throughput import ThroughputSettings, run_throughput


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024", help="comma-separated sequence lengths")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    settings = ThroughputSettings(
        lengths=tuple(int(x) for x in args.lengths.split(",")),
        dtypes=tuple(args.dtypes.split(",")),
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        device=args.device,
    )
    result = run_throughput(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for ratio in result["ratios"]:
        print(f"T={ratio['seq_len']:5d} {ratio['dtype']:9s} mosaic/gpt = {ratio['mosaic_over_gpt']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
