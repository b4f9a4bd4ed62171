"""Training throughput and memory of Memory Mosaic vs GPT vs a plain nanoGPT (the same as `mosaic bench`).

    python benchmarks/train_throughput.py            # all cells; writes benchmarks/results/train_throughput.{json,png}
    python benchmarks/train_throughput.py --quick    # T=256 only; prints the table, writes nothing

Any `mosaic bench` flag works here too (--lengths, --dtypes, --rounds, --threads, --no-memory, ...).
Only a run of every cell writes the committed results by default, and only when neither --json nor
--png says where to write (a run told to write its JSON elsewhere had overwritten the committed figure,
which then disagreed with the committed JSON); a partial run (any of `PARTIAL_RUN_FLAGS`) writes files
only where --json / --png say.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memory_mosaics.cli import main

RESULTS = Path(__file__).resolve().parent / "results"
PARTIAL_RUN_FLAGS = ("--quick", "--lengths", "--dtypes", "--models", "--no-memory", "--compile", "--device")

if __name__ == "__main__":
    argv = sys.argv[1:]
    flags = {arg.split("=")[0] for arg in argv}
    full_run = not flags & set(PARTIAL_RUN_FLAGS)
    if full_run and not flags & {"--json", "--png"}:
        argv += ["--json", str(RESULTS / "train_throughput.json"), "--png", str(RESULTS / "train_throughput.png")]
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main(["bench", *argv]))
