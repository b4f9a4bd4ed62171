"""Training throughput and memory of Memory Mosaic vs GPT vs a plain nanoGPT (the same as `mosaic bench`).

    python benchmarks/train_throughput.py            # all cells; writes benchmarks/results/train_throughput.{json,png}
    python benchmarks/train_throughput.py --quick    # T=256 only

Any `mosaic bench` flag works here too (--lengths, --dtypes, --rounds, --threads, --no-memory, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

from memory_mosaics.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv:
        argv += ["--json", str(RESULTS / "train_throughput.json")]
    if "--png" not in argv:
        argv += ["--png", str(RESULTS / "train_throughput.png")]
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main(["bench", *argv]))
