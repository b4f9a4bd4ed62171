"""Training throughput of Memory Mosaic against GPT at equal parameter counts.

One step = forward + backward + AdamW update on a random batch. Models of a cell are measured in
interleaved rounds inside one process, so a slowdown of the shared machine hits both alike, and the
ratio of their medians is what we report (absolute tokens/s on a busy machine mean little).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig


@dataclasses.dataclass
class ThroughputSettings:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 4096
    batch_size: int = 8
    lengths: tuple[int, ...] = (256, 1024)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    rounds: int = 3  # interleaved measurement rounds per cell
    steps_per_round: int = 2
    warmup_steps: int = 1
    device: str = "cpu"
    seed: int = 0


def build_models(settings: ThroughputSettings, block_size: int) -> dict[str, torch.nn.Module]:
    shape = dict(
        vocab_size=settings.vocab_size,
        block_size=block_size,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_embd=settings.n_embd,
        dropout=0.0,
    )
    torch.manual_seed(settings.seed)
    return {
        "mosaic": MemoryMosaic(MemoryMosaicConfig(**shape, pmem_size=int(3.5 * settings.n_embd))),
        "gpt": GPT(GPTConfig(**shape)),
    }


def training_step(model: torch.nn.Module, batch_size: int, length: int, dtype: str, device: str) -> Callable[[], None]:
    """A closure running one optimisation step on a fresh random batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def step() -> None:
        idx = torch.randint(0, vocab, (batch_size, length + 1), device=device)
        with autocast:
            _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def measure_cell(settings: ThroughputSettings, length: int, dtype: str) -> Iterator[dict]:
    models = {name: m.to(settings.device) for name, m in build_models(settings, length).items()}
    steps = {name: training_step(m, settings.batch_size, length, dtype, settings.device) for name, m in models.items()}
    for step in steps.values():
        for _ in range(settings.warmup_steps):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(settings.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(settings.steps_per_round):
                step()
            seconds[name].append((time.perf_counter() - start) / settings.steps_per_round)
    tokens = settings.batch_size * length
    for name, model in models.items():
        median = statistics.median(seconds[name])
        yield {
            "model": name,
            "seq_len": length,
            "dtype": dtype,
            "params_non_embedding": model.num_params(non_embedding=True),
            "seconds_per_step": median,
            "tokens_per_second": tokens / median,
            "all_seconds_per_step": seconds[name],
        }


def run_throughput(settings: ThroughputSettings, progress: Callable[[str], None] | None = None) -> dict:
    rows = []
    for length in settings.lengths:
        for dtype in settings.dtypes:
            cell = list(measure_cell(settings, length, dtype))
            rows.extend(cell)
            if progress:
                progress(
                    ", ".join(f"{r['model']} {r['tokens_per_second']:.0f} tok/s" for r in cell)
                    + f" (T={length}, {dtype})"
                )
    ratios = []
    for length in settings.lengths:
        for dtype in settings.dtypes:
            by_model = {r["model"]: r for r in rows if r["seq_len"] == length and r["dtype"] == dtype}
            ratios.append(
                {
                    "seq_len": length,
                    "dtype": dtype,
                    "mosaic_over_gpt": by_model["mosaic"]["tokens_per_second"] / by_model["gpt"]["tokens_per_second"],
                }
            )
    return {
        "settings": dataclasses.asdict(settings),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
        "ratios": ratios,
    }
