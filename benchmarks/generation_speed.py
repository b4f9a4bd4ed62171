"""Generation with a recurrent state: speed, state memory and loss per memory policy; writes JSON + PNG.

    python benchmarks/generation_speed.py --json benchmarks/results/generation_speed.json \
        [--ckpt RUN] [--quality-text tinystories|stdlib|FILE ...]

Times are CPU time of the (single-threaded) process, with wall time beside it in the JSON.

(a) cached vs recomputed: per-token latency of `model.step` on one new token after a context of L
    tokens, against re-running the forward pass on the whole prefix (what the authors' generate does).
(b) latency vs context: per-token latency, layer-0 retrieval latency, state bytes and process RSS at
    contexts up to --max-context, for the unbounded exact memory, bounded memories (lru, fifo,
    sink+recent; --memory-size), LSH and random features. Also the recall of the exact top-10 keys
    by LSH candidates, measured on the model's own keys.
(c) quality (with --ckpt): mean next-token loss over a long text for each policy and budget vs exact.

Without --ckpt the model is a randomly initialised Memory Mosaic of the tinystories-cpu shape (speed
does not depend on the weights). Runs on one thread by default (--threads): on a shared machine
several threads fighting over two cores are slower than one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.inference.approximate import HyperplaneHash, lsh_candidates, seeded_generator, top_key_recall

TINYSTORIES_CPU = dict(
    vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, pmem_size=896, dropout=0.0
)  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lsh_budgets(spec: str) -> list[tuple[int, int]]:
    """'8x8,16x10' -> [(8, 8), (16, 10)]: (tables, bits)."""
    return [tuple(int(v) for v in item.split("x")) for item in spec.split(",")]


def policies(args) -> dict[str, dict]:
    m = args.memory_size
    configs = {
        "exact": {},
        f"lru-{m}": {"memory_size": m, "eviction": "lru"},
        f"fifo-{m}": {"memory_size": m, "eviction": "fifo"},
        f"sink+recent-{m}": {"memory_size": m, "eviction": "sink+recent"},
    }
    for tables, bits in lsh_budgets(args.lsh):
        configs[f"lsh-{tables}x{bits}"] = {"retrieval": "lsh", "lsh_tables": tables, "lsh_bits": bits}
    configs[f"features-{args.num_features}"] = {"retrieval": "features", "num_features": args.num_features}
    return configs


class Clock:
    """CPU time of this process (the primary measure: on a shared machine the wall clock mostly measures
    the other jobs; with one thread, CPU time is the work done) and wall time, in milliseconds."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu_ms = 1000 * (time.process_time() - self.cpu)
        self.wall_ms = 1000 * (time.perf_counter() - self.wall)


def medians(clocks: list[Clock]) -> tuple[float, float]:
    return statistics.median(c.cpu_ms for c in clocks), statistics.median(c.wall_ms for c in clocks)


def time_steps(model, state, tokens: torch.Tensor) -> tuple[float, float]:
    """Median (CPU, wall) ms of one single-token step, over the given tokens (the state advances)."""
    clocks = []
    for t in range(tokens.shape[1]):
        with Clock() as clock:
            model.step(tokens[:, t : t + 1], state)
        clocks.append(clock)
    return medians(clocks)


def time_retrieval(state, repeats: int = 9, layer: int = 0) -> tuple[float, float]:
    """Median (CPU, wall) ms of one query read against a layer's memory (its newest key as the query)."""
    layer = state.layers[layer]
    query = layer.pending_keys[:, :, -1:]
    clocks = []
    for _ in range(repeats):
        with Clock() as clock:
            layer.memory.lookup(query)
        clocks.append(clock)
    return medians(clocks)


def prefill(model, state, idx: torch.Tensor, upto: int, chunk: int) -> None:
    while state.position < upto:
        end = min(upto, state.position + chunk)
        model.step(idx[:, state.position : end], state)


def lsh_recall(state, layer: int, tables: int, bits: int, seed: int, queries: int = 64, k: int = 10) -> float:
    """Recall of the exact top-k keys among LSH candidates, with the model's own stored keys: the last
    `queries` stored keys each query the keys stored before them (the hasher LSH retrieval would use)."""
    memory = state.layers[layer].memory
    keys = memory.keys[:, :, : memory.filled]
    heads, dim = keys.shape[1], keys.shape[-1]
    hasher = HyperplaneHash(heads, dim, tables, bits, seeded_generator(seed, layer)).to(keys.device, keys.dtype)
    query = keys[:, :, -queries:]
    admissible = torch.arange(keys.shape[2])[None, :] < torch.arange(keys.shape[2] - queries, keys.shape[2])[:, None]
    candidates = lsh_candidates(hasher.codes(query), hasher.codes(keys))
    return top_key_recall(query @ keys.transpose(-1, -2), candidates, k, admissible)


def candidate_fraction(state) -> float:
    """Mean share of the stored keys that are LSH candidates for the newest key of each layer."""
    shares = []
    for layer in state.layers:
        memory = layer.memory
        query = layer.pending_keys[:, :, -1:]
        _, valid = memory.index.candidates(memory.hasher.codes(query), memory.codes)
        shares.append(float(valid.sum(-1).float().mean()) / memory.filled)
    return statistics.mean(shares)


def cached_vs_recompute(model, idx, contexts: list[int], steps: int, chunk: int) -> list[dict]:
    rows = []
    state = model.init_state(1)
    for context in contexts:
        prefill(model, state, idx, context, chunk)
        cached_ms, cached_wall_ms = time_steps(model, state, idx[:, context : context + steps])
        state = model.init_state(1)  # timing advanced the state; restart so the next context is exact
        clocks = []
        for _ in range(2):
            with Clock() as clock, torch.no_grad():
                model(idx[:, : context + 1])
            clocks.append(clock)
        recompute_ms, recompute_wall_ms = min(c.cpu_ms for c in clocks), min(c.wall_ms for c in clocks)
        rows.append({
            "context": context, "cached_ms": cached_ms, "recompute_ms": recompute_ms,
            "cached_wall_ms": cached_wall_ms, "recompute_wall_ms": recompute_wall_ms,
            "cached_tokens_per_s": 1000 / cached_ms, "recompute_tokens_per_s": 1000 / recompute_ms,
            "speedup": recompute_ms / cached_ms,
        })  # fmt: skip
        speedup = rows[-1]["speedup"]
        log(f"(a) L={context:6d} cached {cached_ms:8.2f} ms  recompute {recompute_ms:9.1f} ms  x{speedup:.1f} (CPU)")
    return rows


def latency_vs_context(model, idx, configs: dict, contexts: list[int], steps: int, chunk: int, args) -> list[dict]:
    rows = []
    for name, options in configs.items():
        state = model.init_state(1, **options)
        for context in contexts:
            if context > args.max_context_for.get(name, contexts[-1]):
                break
            start = time.perf_counter()
            prefill(model, state, idx, context, chunk)
            prefill_s = time.perf_counter() - start
            retrieval_ms, retrieval_wall_ms = time_retrieval(state)
            token_ms, token_wall_ms = time_steps(model, state, idx[:, state.position : state.position + steps])
            row = {
                "policy": name, "options": options, "context": context, "token_ms": token_ms,
                "token_wall_ms": token_wall_ms, "retrieval_ms_layer0": retrieval_ms,
                "retrieval_wall_ms_layer0": retrieval_wall_ms, "state_bytes": state.nbytes(),
                "rss_bytes": rss_bytes(), "prefill_s": prefill_s,
            }  # fmt: skip
            if name == "exact":
                row["lsh_recall_top10"] = {
                    f"{tables}x{bits}": lsh_recall(state, 0, tables, bits, seed=0)
                    for tables, bits in lsh_budgets(args.lsh)
                }
            rows.append(row)
            log(
                f"(b) {name:18s} L={context:6d} token {token_ms:7.2f} ms  retrieval {retrieval_ms:7.3f} ms  "
                f"state {row['state_bytes'] / 2**20:8.2f} MiB  rss {row['rss_bytes'] / 2**20:7.0f} MiB"
            )
    return rows


def interleaved_latency(model, idx, name: str, options: dict, contexts: list[int], steps: int, rounds: int) -> dict:
    """Per-token latency of one bounded policy at several contexts, measured interleaved.

    One prefill passes every context and keeps a copy of the state there; then each round times `steps`
    single-token steps from a fresh copy of every snapshot, in a shuffled order, so that drift in the
    shared machine's load falls on all contexts alike instead of on whichever was measured last."""
    state, snapshots = model.init_state(1, **options), {}
    for context in contexts:
        prefill(model, state, idx, context, chunk=1024)
        snapshots[context] = copy.deepcopy(state)
        log(f"(b') {name} prefilled to {context}")
    samples = {context: [] for context in contexts}
    order = list(contexts)
    for round_ in range(rounds):
        random.Random(round_).shuffle(order)
        for context in order:
            run = copy.deepcopy(snapshots[context])
            samples[context].append(time_steps(model, run, idx[:, context : context + steps])[0])
    medians_ms = {context: statistics.median(values) for context, values in samples.items()}
    spread = max(medians_ms.values()) / min(medians_ms.values()) - 1
    log(f"(b') {name}: " + "  ".join(f"{c}: {m:.2f}" for c, m in medians_ms.items()) + f"  spread {spread:.1%}")
    return {
        "policy": name, "options": options, "steps": steps, "rounds": rounds,
        "token_ms_median": {str(c): m for c, m in medians_ms.items()},
        "token_ms_rounds": {str(c): v for c, v in samples.items()},
        "spread_max_over_min": spread,
    }  # fmt: skip


def quality_text(spec: str, tokenizer) -> tuple[str, list[int]]:
    """TinyStories validation stories joined by end-of-text, a long Python standard-library file, or FILE."""
    if spec == "tinystories":
        path = REPO.parent / "shared/data/tinystories/valid.txt"
        stories = [s.strip() for s in path.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
        ids: list[int] = []
        for story in stories:
            ids += [tokenizer.eot_id, *tokenizer.encode(story)]
        return str(path), ids
    path = Path(sysconfig.get_paths()["stdlib"]) / "typing.py" if spec == "stdlib" else Path(spec)
    return str(path), [tokenizer.eot_id, *tokenizer.encode(path.read_text(encoding="utf-8"))]


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, options: dict, chunk: int) -> tuple[float, object]:
    state = model.init_state(1, **options)
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        end = min(ids.shape[1] - 1, start + chunk)
        logits, state = model.step(ids[:, start:end], state)
        total += float(F.cross_entropy(logits[0].float(), ids[0, start + 1 : end + 1], reduction="sum"))
        count += end - start
    return total / count, state


def quality(model, tokenizer, args) -> list[dict]:
    configs = {"exact": {}}
    for size in (args.memory_size // 4, args.memory_size):
        for eviction in ("lru", "fifo", "sink+recent"):
            configs[f"{eviction}-{size}"] = {"memory_size": size, "eviction": eviction}
    for tables, bits in lsh_budgets(args.quality_lsh):
        configs[f"lsh-{tables}x{bits}"] = {"retrieval": "lsh", "lsh_tables": tables, "lsh_bits": bits}
    for features in (64, 256, 1024):
        configs[f"features-{features}"] = {"retrieval": "features", "num_features": features}
    if args.quality_policies:
        configs = {name: configs[name] for name in ["exact", *args.quality_policies] if name in configs}
    rows = []
    for spec in args.quality_text:
        source, ids = quality_text(spec, tokenizer)
        ids = torch.tensor([ids[: args.quality_tokens]])
        exact = None
        for name, options in configs.items():
            start = time.perf_counter()
            loss, state = mean_loss(model, ids, options, args.chunk)
            rows.append({
                "text": spec, "source": source, "tokens": ids.shape[1], "policy": name, "options": options,
                "loss": loss, "relative_to_exact": 0.0, "seconds": time.perf_counter() - start,
            })  # fmt: skip
            if not name.startswith("features"):  # retrieval speed and LSH candidates on trained keys
                per_layer = [time_retrieval(state, layer=i)[0] for i in range(len(state.layers))]
                rows[-1]["retrieval_ms_layer0"] = per_layer[0]
                rows[-1]["retrieval_ms_per_layer"] = per_layer  # trained keys cluster unevenly by layer
                if name.startswith("lsh"):
                    rows[-1]["candidate_fraction"] = candidate_fraction(state)
            if name == "exact":
                exact = loss
                # Recall of each query's exact top-10 keys among its LSH candidates, on the trained model's
                # own keys over this text (mean over layers).
                rows[-1]["lsh_recall_top10"] = {
                    f"{tables}x{bits}": statistics.mean(
                        lsh_recall(state, layer, tables, bits, seed=0) for layer in range(len(state.layers))
                    )
                    for tables, bits in lsh_budgets(args.quality_lsh)
                }
                log(f"(c) recall of the exact top-10 keys: {rows[-1]['lsh_recall_top10']}")
            rows[-1]["relative_to_exact"] = loss / exact - 1
            log(f"(c) {spec:12s} {name:18s} loss {loss:.4f} ({100 * (loss / exact - 1):+.2f} % vs exact)")
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["cached_vs_recompute"]
    left.plot([r["context"] for r in rows], [r["cached_ms"] for r in rows], "o-", label="state (one step)")
    left.plot([r["context"] for r in rows], [r["recompute_ms"] for r in rows], "s-", label="recompute prefix")
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="CPU ms per new token")
    contexts = [r["context"] for r in rows]
    left.set_xticks(contexts, [str(c) for c in contexts], minor=False)
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.set_title("(a) cached vs recomputed generation")
    left.legend()
    for name in dict.fromkeys(r["policy"] for r in result["latency_vs_context"]):
        rows = [r for r in result["latency_vs_context"] if r["policy"] == name]
        right.plot([r["context"] for r in rows], [r["token_ms"] for r in rows], "o-", label=name)
    right.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="CPU ms per new token")
    contexts = sorted({r["context"] for r in result["latency_vs_context"]})
    right.set_xticks(contexts, [f"{c // 1024}k" for c in contexts], minor=False)
    right.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    right.set_title("(b) per-token latency vs context")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a trained run or checkpoint folder (needed for --quality-text)")
    parser.add_argument("--recompute-contexts", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--max-context-exact", type=int, default=65536, help="stop exact/LSH sweeps here")
    parser.add_argument("--steps", type=int, default=8, help="single-token steps timed per point")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--lsh", default="8x8,16x10", help="LSH budgets TABLESxBITS for the latency sweep")
    parser.add_argument("--quality-lsh", default="2x8,8x8,32x8,16x10", help="LSH budgets for the loss sweep")
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--quality-text", nargs="*", default=[], help="tinystories, stdlib or a file")
    parser.add_argument("--quality-tokens", type=int, default=16384)
    parser.add_argument("--quality-policies", nargs="*", default=[], help="only these (besides exact)")
    parser.add_argument("--interleaved", nargs="*", default=[], help="policies (e.g. lru-1024) to time interleaved")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["recompute", "latency"])
    parser.add_argument("--json", default="benchmarks/results/generation_speed.json")
    parser.add_argument("--png", default=None, help="default: the JSON path with .png")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.json).read_text()), Path(args.png or Path(args.json).with_suffix(".png")))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = None
    if args.ckpt:
        from memory_mosaics.train.checkpoint import load_model, load_tokenizer_of

        model, tokenizer = load_model(args.ckpt), load_tokenizer_of(args.ckpt)
    else:
        model = MemoryMosaic(MemoryMosaicConfig(**TINYSTORIES_CPU))
    model.eval()
    contexts = [int(x) for x in args.contexts.split(",")]
    recompute_contexts = [int(x) for x in args.recompute_contexts.split(",")]
    longest = max(contexts + recompute_contexts) + 2 * args.steps + 1
    idx = torch.randint(0, model.config.vocab_size, (1, longest), generator=torch.Generator().manual_seed(0))
    configs = policies(args)
    args.max_context_for = {
        name: args.max_context_exact for name in configs if name == "exact" or name.startswith("lsh")
    }

    result = {
        "command": " ".join(sys.argv),
        "model": {"type": model.model_type, **model.config.to_dict(), "ckpt": args.ckpt},
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    if "recompute" not in args.skip:
        result["cached_vs_recompute"] = cached_vs_recompute(model, idx, recompute_contexts, args.steps, args.chunk)
    if "latency" not in args.skip:
        result["latency_vs_context"] = latency_vs_context(model, idx, configs, contexts, args.steps, args.chunk, args)
    if args.interleaved:
        result["interleaved_latency"] = [
            interleaved_latency(model, idx, name, configs[name], contexts, args.steps, args.rounds)
            for name in args.interleaved
        ]
    if args.quality_text:
        if tokenizer is None:
            parser.error("--quality-text needs --ckpt (a trained model and its tokenizer)")
        result["quality"] = quality(model, tokenizer, args)
    result["load_average_at_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if "cached_vs_recompute" in result and "latency_vs_context" in result:
        plot(result, Path(args.png or Path(args.json).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
