"""LSH retrieval against exact retrieval on a trained model's own keys at a long context; writes JSON.

    python benchmarks/lsh_trained_keys.py --ckpt RUN --tokens 32768 --lsh 8x10,8x12 \
        --json benchmarks/results/lsh_trained_keys.json

A trained model's keys cluster (a frequent token's occurrences share a bucket), unlike a random model's,
so LSH speed measured on random keys says little about a real text. This reads the first --tokens
tokens of the TinyStories validation stories with exact retrieval, then, in every layer, times one
query (the newest key) read exactly and through LSH on the same stored pairs, three ways: walking the
query's buckets and gathering its candidates, scanning every stored code with one masked product, and
the rule generation uses (`GATHER_LIMIT`). The read returns the same result each way (tested in
tests/inference/test_approximate.py). CPU time of the single-threaded process, median of --repeats,
the variants interleaved in each repeat so that load drift falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import lsh_budgets, mean_loss, quality_text
from memory_mosaics.inference import bounded
from memory_mosaics.inference.approximate import HyperplaneHash, seeded_generator
from memory_mosaics.inference.bounded import SlotMemory, dense_read

RULES = {"gather": 0, "scan": 10**9, "auto": bounded.GATHER_LIMIT}  # GATHER_LIMIT each variant forces


def cpu_ms(read) -> float:
    start = time.process_time()
    read()
    return 1000 * (time.process_time() - start)


def time_layer(keys, values, query, tables: int, bits: int, layer: int, repeats: int) -> dict:
    hasher = HyperplaneHash(keys.shape[1], keys.shape[-1], tables, bits, seeded_generator(0, layer))
    memory = SlotMemory(None, None, shift=1, hasher=hasher)
    memory._append(keys, values, first_pair=0)  # store every pair as a prefill would
    memory.index.rebuild(memory.codes, memory.filled)
    samples = {"exact": [], **{name: [] for name in RULES}}
    for _ in range(repeats + 1):  # the first round warms up
        samples["exact"].append(cpu_ms(lambda: dense_read(query, keys, values, None)))
        for name, limit in RULES.items():
            bounded.GATHER_LIMIT = limit
            samples[name].append(cpu_ms(lambda: memory.lookup(query)))
    bounded.GATHER_LIMIT = RULES["auto"]
    row = {name: statistics.median(values[1:]) for name, values in samples.items()}
    _, valid = memory.index.candidates(hasher.codes(query), memory.codes)
    row["candidate_fraction"] = float(valid.sum(-1).float().mean()) / memory.filled
    row["bucket_total_fraction"] = memory.index.bucket_total(memory.index.buckets(hasher.codes(query))) / memory.filled
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a trained run or checkpoint folder")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--lsh", default="8x10,8x12", help="TABLESxBITS budgets")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", default="benchmarks/results/lsh_trained_keys.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from memory_mosaics.train.checkpoint import load_model, load_tokenizer_of

    model, tokenizer = load_model(args.ckpt), load_tokenizer_of(args.ckpt)
    model.eval()
    source, ids = quality_text("tinystories", tokenizer)
    with torch.no_grad():
        loss, state = mean_loss(model, torch.tensor([ids[: args.tokens]]), {}, chunk=1024)
    result = {"command": " ".join(sys.argv), "ckpt": args.ckpt, "text": source, "tokens": args.tokens,
              "exact_loss": loss, "load_average_at_start": os.getloadavg(), "budgets": {}}  # fmt: skip
    for tables, bits in lsh_budgets(args.lsh):
        rows = []
        for index, layer in enumerate(state.layers):
            memory = layer.memory
            keys, values = memory.keys[:, :, : memory.filled], memory.values[:, :, : memory.filled]
            with torch.no_grad():
                rows.append(time_layer(keys, values, layer.pending_keys[:, :, -1:], tables, bits, index, args.repeats))
            print(f"{tables}x{bits} layer {index}: " + "  ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()))
        totals = {name: sum(row[name] for row in rows) for name in ["exact", *RULES]}
        result["budgets"][f"{tables}x{bits}"] = {"layers": rows, "total_ms": totals,
                                                 "speedup_auto": totals["exact"] / totals["auto"]}  # fmt: skip
        print(f"{tables}x{bits} all layers: " + "  ".join(f"{k} {v:.2f} ms" for k, v in totals.items()))
    result["load_average_at_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
