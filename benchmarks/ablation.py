"""Each optimisation of the Memory Mosaic's training step, measured by taking it away.

The current model ("all") is timed against variants that each put back the previous implementation
of one piece (written out below, as they were before the performance work), and against the project's
GPT: forward + backward + AdamW, n_layer 4, n_embd 256, n_head 4, vocab 4096, batch 8, as in
`mosaic bench`. Each variant's step runs right after a step of the full model and we keep the ratio
of the pair (median over --rounds); every timed step comes after --settle-steps untimed ones of its own
model, as in `mosaic bench`. Variants patch module globals only while their own step runs.

    python benchmarks/ablation.py --lengths 256 --dtypes bfloat16,float32   # -> results/ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import memory_mosaics.layers.memory as memory_layers
import memory_mosaics.models.memory_mosaic as mosaic_model
from _arguments import add_cell_options, add_settle_option, cell_options, writable
from memory_mosaics.bench.throughput import ThroughputSettings, build_model, training_step
from memory_mosaics.ops import (
    context_read_cpu,
    context_retrieval,
    features_cpu,
    gelu_cpu,
    leaky_average_reference,
    persistent_read_cpu,
    retrieval,
    scaled_normalize_reference,
)
from memory_mosaics.ops import leaky_average as leaky_average_now
from memory_mosaics.ops.leaky_average import _decay_matrix, _decay_powers

RESULTS = Path(__file__).resolve().parent / "results"


# -- the implementations before the performance work ---------------------------------------------


def leaky_average_autograd(x, beta, initial=None, chunk_size=32):
    """The chunked scan differentiated by autograd (every chunking step recorded)."""
    length = x.shape[-2]
    if length <= chunk_size:
        return leaky_average_reference(x, beta, initial)
    n_chunks = -(-length // chunk_size)
    padded = n_chunks * chunk_size
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    *lead, heads, _, dim = x.shape
    chunks = x.reshape(*lead, heads, n_chunks, chunk_size, dim)
    local = torch.einsum("hij,...hnjd->...hnid", _decay_matrix(beta, chunk_size).to(x.dtype), chunks)
    carried = leaky_average_autograd(local[..., -1, :], beta * chunk_size, chunk_size=chunk_size)
    entering = torch.cat([torch.zeros_like(carried[..., :1, :]), carried[..., :-1, :]], dim=-2)
    y = local + _decay_powers(beta, chunk_size, x.dtype).unsqueeze(-3) * entering.unsqueeze(-2)
    return y.reshape(*lead, heads, padded, dim)[..., :length, :]


def scaled_tables(memory_values, value_scale):
    return memory_values if value_scale is None else memory_values * value_scale[:, None, None]


def persistent_retrieval_materialised(
    queries, memory_keys, memory_values, dropout_p=0.0, training=False, value_scale=None
):
    """Batch and time folded, two products per table, softmax differentiated by autograd."""
    memory_values = scaled_tables(memory_values, value_scale)
    batch, heads, length, dim = queries.shape
    folded = queries.transpose(0, 1).reshape(heads, batch * length, dim)
    out = 0.0
    for table_keys, table_values in zip(memory_keys, memory_values, strict=True):
        weights = torch.softmax(folded @ table_keys.transpose(-1, -2).to(folded.dtype), dim=-1)
        out = out + weights.to(folded.dtype) @ table_values.to(folded.dtype)
    out = out / memory_keys.shape[0]
    return out.view(heads, batch, length, dim).transpose(0, 1)


def persistent_retrieval_blocked(queries, memory_keys, memory_values, dropout_p=0.0, training=False, value_scale=None):
    """The previous CPU path (until the fused-attention read): blocked products, hand-written backward."""
    from memory_mosaics.ops.persistent_read import persistent_read

    memory_values = scaled_tables(memory_values, value_scale)
    batch, heads, length, dim = queries.shape
    keys, values = memory_keys.to(queries.dtype), memory_values.to(queries.dtype)
    folded = queries.transpose(0, 1).reshape(heads, batch * length, dim)
    with torch.autocast("cpu", enabled=False):
        out = persistent_read(folded, keys, values)
    return out.view(heads, batch, length, dim).transpose(0, 1)


class KeysAsTwoSlices:
    """The context read's queries and stored keys as two plain slices (each slice's backward pass fills a
    zero tensor and copies into it, and autograd adds the two)."""

    @staticmethod
    def apply(keys, shift):
        return keys[..., shift:, :], keys[..., : keys.shape[-2] - shift, :]


def context_forward_unfused(self, x):
    """Two projections, values for every position, zero rows padded before the output projection (the
    compiled read where it runs, so that only the projections differ)."""
    keys, values = self.key(x), self.value(x)
    if context_read_cpu.usable(keys, self.shift, dropout=self.training and self.dropout > 0):
        return self.resid_dropout(self.c_proj(context_read_cpu.context_read_cpu(keys, values, self.shift)))
    read = context_retrieval(keys, values, self.shift, self.dropout, self.training)
    return self.resid_dropout(self.c_proj(memory_layers.merge_heads(read)))


def persistent_read_scaling_tables(self, queries):
    """The output scale applied to the value tables before the read (until the kernel applied it)."""
    values = scaled_tables(self.memory_values, torch.exp(10 * self.out_scale))
    return memory_layers.merge_heads(memory_layers.persistent_retrieval(queries, self.memory_keys, values))


def persistent_read_scaling_reads(self, queries):
    """The output scale applied to the (B, H, T, d) reads instead of the (H, P, d) value table."""
    read = memory_layers.persistent_retrieval(queries, self.memory_keys, self.memory_values)
    return memory_layers.merge_heads(read * torch.exp(10 * self.out_scale).to(read.dtype)[:, None, None])


def forward_scaling_logits(self, idx, targets=None):
    x = self.wte(idx)
    for block in self.blocks:
        x = block(x)
    logits = self.lm_head(self.ln_f(x)) * self.logit_scale
    return logits, mosaic_model.language_model_loss(logits, targets)


def normalize_plain(x, scale, impl="fast"):
    return scaled_normalize_reference(x, scale)


VARIANTS = {
    "leaky average by autograd": [(memory_layers, "leaky_average", leaky_average_autograd)],
    "normalisation by autograd": [(memory_layers, "normalize_and_scale", normalize_plain)],
    "persistent read by autograd": [(memory_layers, "persistent_retrieval", persistent_retrieval_materialised)],
    "persistent read by blocked products": [(memory_layers, "persistent_retrieval", persistent_retrieval_blocked)],
    "persistent read by fused attention (no compiled kernel)": [(persistent_read_cpu, "usable", lambda *a, **k: False)],
    "context read by fused attention (no compiled kernel)": [(context_read_cpu, "usable", lambda *a, **k: False)],
    "key and value features by PyTorch operators (no compiled kernel)": [(features_cpu, "usable", lambda *a: False)],
    "queries and stored keys as two slices": [(retrieval, "_QueriesAndStoredKeys", KeysAsTwoSlices)],
    "stored values as a slice": [(memory_layers, "leading_rows", lambda x, count: x[..., :count, :])],
    "unfused context projections": [(memory_layers.ContextMemory, "forward", context_forward_unfused)],
    "output scale on reads": [(memory_layers.PersistentMemory, "read", persistent_read_scaling_reads)],
    "output scale on the value tables": [(memory_layers.PersistentMemory, "read", persistent_read_scaling_tables)],
    "logit scale on logits": [(mosaic_model.MemoryMosaic, "forward", forward_scaling_logits)],
}


# Changes to the fused attention path of the context read, which the compiled kernel (float32 and bf16 on
# CPUs with AMX) replaces: there they change nothing, so they run only when asked for by name.
FALLBACK_ONLY = ("queries and stored keys as two slices", "stored values as a slice")


@contextmanager
def patched(patches):
    with ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


def measure(length: int, dtype: str, rounds: int, variants: list[str], settle_steps: int = 1) -> dict:
    """Paired design: in every round each variant (and GPT) runs right after a step of the full
    model, and we keep the ratio of the two; the machine's load drifts less within a pair than
    across a round. Each timed step comes right after `settle_steps` untimed ones of the same model (a
    step that follows another model's runs slower; `mosaic bench --settle-steps`). Reported: the median
    over rounds of each ratio."""
    settings = ThroughputSettings()
    models = {"all": build_model("mosaic", settings, length), "gpt": build_model("gpt", settings, length)}
    for name in variants:
        models[name] = build_model("mosaic", settings, length)
    patches = {name: VARIANTS.get(name, []) for name in models}
    steps = {name: training_step(model, settings, length, dtype) for name, model in models.items()}

    def timed(name: str) -> float:
        with patched(patches[name]):
            for _ in range(settle_steps):
                steps[name]()
            start = time.perf_counter()
            steps[name]()
            return time.perf_counter() - start

    for name in steps:  # warm-up
        timed(name)
    others = ["gpt", *variants]
    ratios: dict[str, list[float]] = {name: [] for name in others}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds):
        shift = round_index % len(others)
        for name in others[shift:] + others[:shift]:
            full, other = timed("all"), timed(name)
            seconds["all"].append(full)
            seconds[name].append(other)
            ratios[name].append(other / full)
    median = {name: statistics.median(values) for name, values in ratios.items()}
    return {
        "seq_len": length,
        "dtype": dtype,
        "settle_steps": settle_steps,
        "median_seconds_per_step": {name: statistics.median(values) for name, values in seconds.items()},
        "slowdown_without": {name: median[name] for name in variants},
        "mosaic_over_gpt": median["gpt"],
        "paired_ratios": ratios,
    }


def components(length: int, dtype: str, rounds: int, settle_steps: int = 1) -> dict:
    """Forward + backward of single pieces and layers (batch 8, C 256, 4 heads, P 896), interleaved,
    median over rounds, milliseconds: each optimised piece beside its predecessor, and each memory
    beside the transformer layer it stands for."""
    from memory_mosaics.layers import ContextMemory, PersistentMemory
    from memory_mosaics.models.gpt import MLP, CausalSelfAttention, GPTConfig
    from memory_mosaics.ops import persistent_retrieval, scaled_normalize

    batch, channels, heads = 8, 256, 4
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=8, block_size=length, n_layer=4, n_head=heads, n_embd=channels, dropout=0.0)
    wide = torch.randn(batch, length, 2 * channels)
    split = lambda t: t[..., :channels].view(batch, length, heads, -1).transpose(1, 2)  # noqa: E731
    decay = torch.linspace(0.5, 5.0, heads)
    scales, mix_heads = torch.full((heads,), 2.7), torch.rand(heads)
    mix = mix_heads[:, None, None]
    ahead = lambda t: F.pad(t[:, 1:], (0, 0, 0, 1))  # noqa: E731
    tables = torch.randn(2, 1, heads, 896, channels // heads) / 8
    queries = F.normalize(torch.randn(heads, batch, length, channels // heads), dim=-1).transpose(0, 1) * 2
    activations = torch.randn(batch, length, 4 * channels)
    pieces = {
        "leaky average (autograd)": (lambda x: leaky_average_autograd(split(x), decay), wide),
        "leaky average (now)": (lambda x: leaky_average_now(split(x), decay), wide),
        "normalise (autograd)": (lambda x: scaled_normalize_reference(split(x), decay), wide),
        "normalise (now)": (lambda x: scaled_normalize(split(x), decay), wide),
        "key features (operators)": (lambda x: scaled_normalize(leaky_average_now(split(x), decay), scales), wide),
        "key features (compiled kernel)": (
            lambda x: features_cpu.key_features(x[..., :channels], heads, decay, scales),
            wide,
        ),
        "value features (operators)": (
            lambda x: scaled_normalize(torch.lerp(split(ahead(x)), split(x), mix.to(x.dtype)), scales),
            wide,
        ),
        "value features (compiled kernel)": (
            lambda x: features_cpu.value_features(x[..., :channels], heads, 1, mix_heads, scales),
            wide,
        ),
        "persistent read (autograd)": (lambda q: persistent_retrieval_materialised(q, *tables), queries),
        "persistent read (blocked products)": (lambda q: persistent_retrieval_blocked(q, *tables), queries),
        "persistent read (now)": (lambda q: persistent_retrieval(q, *tables), queries),
        # keys as queries: (B, H, T, d), head-major as the features kernels write them; values derived from them
        "context read (fused attention)": (
            lambda k: memory_layers.merge_heads(context_retrieval(k, k.flip(-1), 1)),
            queries,
        ),
        "context read (compiled kernel)": (lambda k: context_read_cpu.context_read_cpu(k, k.flip(-1), 1), queries),
        "tanh GELU (PyTorch)": (lambda x: F.gelu(x, approximate="tanh"), activations),
        "tanh GELU (compiled kernel)": (gelu_cpu.gelu_tanh, activations),
        "exact GELU (PyTorch; nanoGPT's)": (F.gelu, activations),
        "GPT attention": (CausalSelfAttention(config), wide[..., :channels]),
        "ContextMemory": (ContextMemory(channels, heads, 4), wide[..., :channels]),
        "GPT MLP": (MLP(config), wide[..., :channels]),
        "PersistentMemory": (PersistentMemory(channels, heads, 896, 1, 4), wide[..., :channels]),
    }

    def run(fn, source) -> None:
        x = source.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            y = fn(x.bfloat16() if dtype == "bfloat16" and not isinstance(fn, torch.nn.Module) else x)
        y.backward(torch.ones_like(y))

    def timed(fn, source) -> float:
        for _ in range(settle_steps):  # what ran just before moves a piece's time as it does a step's
            run(fn, source)
        start = time.perf_counter()
        run(fn, source)
        return 1e3 * (time.perf_counter() - start)

    times = {name: [] for name in pieces}
    names = list(pieces)
    for round_index in range(rounds + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timed(*pieces[name])
            if round_index:
                times[name].append(elapsed)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"seq_len": length, "dtype": dtype, "settle_steps": settle_steps, "median_ms": median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_options(parser, lengths="256", rounds=5)
    add_settle_option(parser)
    parser.add_argument(
        "--variants",
        default=",".join(name for name in VARIANTS if name not in FALLBACK_ONLY),
        help="comma-separated (default: all but " + " and ".join(repr(name) for name in FALLBACK_ONLY) + ")",
    )
    parser.add_argument("--components", action="store_true", help="time single pieces and layers instead")
    parser.add_argument("--json", default=None, help="default results/ablation.json (or components.json)")
    args = parser.parse_args()
    # Checked before the minutes of measuring: an unknown variant would be timed unpatched, as the full model.
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
    lengths, dtypes = cell_options(parser, args)
    default = RESULTS / ("components.json" if args.components else "ablation.json")
    path = writable(parser, args.json or default, make_folder=args.json is None)
    assert memory_layers.leaky_average is leaky_average_now  # the patch targets the name the layers use
    cells = []
    for length in lengths:
        for dtype in dtypes:
            if args.components:
                cells.append(components(length, dtype, args.rounds, args.settle_steps))
                print(json.dumps(cells[-1]))
                continue
            cell = measure(length, dtype, args.rounds, variants, args.settle_steps)
            cells.append(cell)
            print(json.dumps({k: cell[k] for k in ("seq_len", "dtype", "slowdown_without", "mosaic_over_gpt")}))
    result = {"threads": torch.get_num_threads(), "rounds": args.rounds, "settle_steps": args.settle_steps}
    result["cells"] = cells
    path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
