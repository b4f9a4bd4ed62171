"""Training throughput of Memory Mosaic against GPT at equal parameter counts.

One step = forward + backward + AdamW update on a random batch (the trainer's AdamW, `train.optim`,
fused where torch has it, for every model). In each cell (sequence length x dtype) the models are
measured in interleaved rounds inside one process, the order rotating from round to round, so a
slowdown of a shared machine hits every model alike, each timed step right after an untimed one of the
same model (`settle_steps`: what ran just before moves a step's time); we report each model's median and the ratio of
medians (absolute tokens/s on a busy machine mean little), with a 95 % bootstrap interval over the rounds
(`ratio_interval`) that says how far the noise alone moves each ratio.

Three models: the project's MemoryMosaic and GPT, and a plain nanoGPT written in this package
(`nanogpt.py`) that keeps the project's GPT honest. Peak memory is measured per model in a fresh
process (see `memory.py`); model-FLOPs utilisation is against the machine's matrix-product peak
measured in the same run.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.bench.nanogpt import NanoGPT, NanoGPTConfig
from memory_mosaics.train.optim import make_optimizer

MODELS = ("mosaic", "gpt", "nanogpt")


@dataclasses.dataclass
class ThroughputSettings:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 4096
    batch_size: int = 8
    lengths: tuple[int, ...] = (256, 1024, 4096)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    models: tuple[str, ...] = MODELS
    rounds: int = 5  # interleaved measurement rounds per cell
    steps_per_round: int = 1
    warmup_steps: int = 1
    # Untimed steps of the same model right before each timed one: a timed step then follows a step of its own
    # model, as in training. Without them a step that followed a Memory Mosaic step ran ~4 % slower
    # (T = 1,024 bf16, 8 trials), and the rotation puts the GPT after the Memory Mosaic in 2 rounds of 3.
    settle_steps: int = 1
    device: str = "cpu"
    threads: int = 0  # 0: leave torch's setting alone
    seed: int = 0
    memory: bool = True  # also measure peak memory (a fresh process per model and cell on CPU)
    compile: bool = False  # torch.compile each block (regional compilation)
    peak_matrix_size: int = 2048  # side of the square product that measures the machine's peak


def build_model(name: str, settings: ThroughputSettings, length: int) -> nn.Module:
    shape = dict(
        vocab_size=settings.vocab_size,
        block_size=length,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_embd=settings.n_embd,
    )
    torch.manual_seed(settings.seed)
    if name == "mosaic":
        model = MemoryMosaic(MemoryMosaicConfig(**shape, dropout=0.0, pmem_size=int(3.5 * settings.n_embd)))
    elif name == "gpt":
        model = GPT(GPTConfig(**shape, dropout=0.0))
    elif name == "nanogpt":
        model = NanoGPT(NanoGPTConfig(**shape))
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = model.to(settings.device)
    if settings.compile:
        for block in model.blocks:
            block.compile()
    return model


def training_step(model: nn.Module, settings: ThroughputSettings, length: int, dtype: str) -> Callable[[], None]:
    """A closure running one optimisation step on a fresh random batch."""
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    device, vocab = settings.device, model.config.vocab_size
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def step() -> None:
        idx = torch.randint(0, vocab, (settings.batch_size, length + 1), device=device)
        with autocast:
            _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def model_flops_per_token(model: nn.Module, length: int) -> float:
    """Matrix-product FLOPs of one training step per token (forward + backward), nanoGPT's count
    with causal attention: 6 per weight used in a product (every weight of >= 2 dimensions except the
    position table; the tied embedding counts once, as the head; a Memory Mosaic's persistent tables
    count like weights, since each slot takes part in two products per token) plus 6 L C T for
    attention (nanoGPT's 12 L C T counts the masked half of the score matrix too). Elementwise work
    (softmax, normalisation, the leaky scan) is not counted, for any model."""
    weights = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not name.startswith("wpe"))
    config = model.config
    return 6 * weights + 6 * config.n_layer * config.n_embd * length


def matmul_peak(dtype: str, device: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matrix product in `dtype` (bf16 inputs: what autocast multiplies)."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def leaky_scan_in_use(device: str) -> str:
    """Which scan `leaky_average` runs on this device: "triton" or "torch"."""
    if not device.startswith("cuda"):
        return "torch"
    from memory_mosaics.ops import leaky_average_triton

    return "triton" if leaky_average_triton.enabled_for(torch.empty(0, device=device)) else "torch"


def measure_cell(settings: ThroughputSettings, length: int, dtype: str) -> list[dict]:
    models = {name: build_model(name, settings, length) for name in settings.models}
    steps = {name: training_step(model, settings, length, dtype) for name, model in models.items()}
    for step in steps.values():
        for _ in range(settings.warmup_steps):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_index in range(settings.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(settings.settle_steps):
                steps[name]()
            start = time.perf_counter()
            for _ in range(settings.steps_per_round):
                steps[name]()
            seconds[name].append((time.perf_counter() - start) / settings.steps_per_round)
    tokens = settings.batch_size * length
    rows = []
    for name, model in models.items():
        median = statistics.median(seconds[name])
        rows.append(
            {
                "model": name,
                "seq_len": length,
                "dtype": dtype,
                "params_non_embedding": model.num_params(non_embedding=True),
                "flops_per_token": model_flops_per_token(model, length),
                "seconds_per_step": median,
                "tokens_per_second": tokens / median,
                "all_seconds_per_step": seconds[name],
            }
        )
    return rows


def ratio_interval(
    numerator_seconds: list[float], denominator_seconds: list[float], confidence: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """A bootstrap confidence interval for the throughput ratio numerator/denominator, i.e. the ratio of
    median step times denominator/numerator: rounds are resampled with replacement, each round's two times
    together (they were measured back to back, so a slow spell of the machine hits both), the ratio of the
    resampled medians taken each time, and the central `confidence` share of those ratios kept. Seeded:
    the same times give the same interval. It says how far the benchmark's noise alone moves a ratio."""
    if len(numerator_seconds) != len(denominator_seconds) or not numerator_seconds:
        raise ValueError("one time per round for both models is needed")
    rng = random.Random(0)
    rounds = range(len(numerator_seconds))
    ratios = []
    for _ in range(resamples):
        picked = rng.choices(rounds, k=len(rounds))
        numerator = statistics.median(numerator_seconds[i] for i in picked)
        ratios.append(statistics.median(denominator_seconds[i] for i in picked) / numerator)
    ratios.sort()
    tail = (1 - confidence) / 2
    return ratios[int(tail * (resamples - 1))], ratios[round((1 - tail) * (resamples - 1))]


def _interval(rows: list[dict], numerator: str, denominator: str) -> list[float] | None:
    by_model = {r["model"]: r for r in rows}
    if numerator not in by_model or denominator not in by_model:
        return None
    times = [by_model[name]["all_seconds_per_step"] for name in (numerator, denominator)]
    return list(ratio_interval(*times))


def _ratio(rows: list[dict], key: str, numerator: str, denominator: str) -> float | None:
    by_model = {r["model"]: r for r in rows}
    if numerator not in by_model or denominator not in by_model or by_model[denominator].get(key) is None:
        return None
    return by_model[numerator][key] / by_model[denominator][key]


def run_throughput(settings: ThroughputSettings, progress: Callable[[str], None] | None = None) -> dict:
    from memory_mosaics.bench.memory import peak_memory  # a subprocess helper; keeps this module light

    if settings.threads:
        torch.set_num_threads(settings.threads)
    say = progress or (lambda line: None)
    cuda = settings.device.startswith("cuda")
    # A GPU multiplies 2048^2 matrices in microseconds, where launching the kernel would count.
    peak_size = max(settings.peak_matrix_size, 8192) if cuda else settings.peak_matrix_size
    peaks = {dtype: [matmul_peak(dtype, settings.device, peak_size)] for dtype in settings.dtypes}
    say("matmul peak: " + ", ".join(f"{d} {p[0] / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    rows, cells = [], []
    for length in settings.lengths:
        for dtype in settings.dtypes:
            cell = measure_cell(settings, length, dtype)
            if settings.memory:
                for row in cell:
                    row.update(peak_memory(settings, row["model"], length, dtype))
            rows.extend(cell)
            cells.append(
                {
                    "seq_len": length,
                    "dtype": dtype,
                    "mosaic_over_gpt": _ratio(cell, "tokens_per_second", "mosaic", "gpt"),
                    "gpt_over_nanogpt": _ratio(cell, "tokens_per_second", "gpt", "nanogpt"),
                    "mosaic_over_nanogpt": _ratio(cell, "tokens_per_second", "mosaic", "nanogpt"),
                    "memory_mosaic_over_gpt": _ratio(cell, "step_peak_bytes", "mosaic", "gpt"),
                    # 95 % bootstrap intervals of the three throughput ratios (`ratio_interval`)
                    "intervals": {
                        f"{a}_over_{b}": _interval(cell, a, b)
                        for a, b in (("mosaic", "gpt"), ("gpt", "nanogpt"), ("mosaic", "nanogpt"))
                    },
                }
            )
            say(", ".join(f"{r['model']} {r['tokens_per_second']:.0f} tok/s" for r in cell) + f" (T={length}, {dtype})")
    for dtype in settings.dtypes:  # the peak again, after the cells: the better of the two counts
        peaks[dtype].append(matmul_peak(dtype, settings.device, peak_size))
    peak = {dtype: max(values) for dtype, values in peaks.items()}
    for row in rows:
        row["mfu"] = row["flops_per_token"] * row["tokens_per_second"] / peak[row["dtype"]]
    return {
        "settings": dataclasses.asdict(settings),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if cuda else None,
            "leaky_average_scan": leaky_scan_in_use(settings.device),
            "matmul_peak_flops": peak,
            "matmul_peak_measurements": peaks,
        },
        "rows": rows,
        "cells": cells,
    }
