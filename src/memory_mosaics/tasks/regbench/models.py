"""The models RegBench compares, behind one interface: `build_model(name, block_size)`.

Every model maps token ids (B, T) to logits (B, T, V) via `model(idx)`. Memory Mosaic uses the
authors' RegBench configuration (2 layers, d=128, 8 heads, 448 persistent slots, dropout 0.05);
the transformer is the project's GPT at the same depth and width, which gives it the same number
of parameters (not counting its position table); the recurrent and state-space baselines come
from `memory_mosaics.models.baselines`, their width fitted to Memory Mosaic's parameter count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from memory_mosaics.errors import MosaicError
from memory_mosaics.tasks.regbench.data import VOCAB_SIZE


def _mosaic_settings(**overrides) -> dict:
    settings = dict(n_layer=2, n_head=8, n_embd=128, pmem_size=448, pmem_count=1, dropout=0.05, bias=False)
    settings.update(overrides)
    return settings


def _memory_mosaic(block_size: int, **overrides) -> nn.Module:
    from memory_mosaics import MemoryMosaic, MemoryMosaicConfig

    return MemoryMosaic(
        MemoryMosaicConfig(vocab_size=VOCAB_SIZE, block_size=block_size, **_mosaic_settings(**overrides))
    )


def _transformer(block_size: int, **overrides) -> nn.Module:
    from memory_mosaics import GPT, GPTConfig

    # 2 layers of width 128 (12·d² each) come within 0.1 % of Memory Mosaic's count (the authors
    # chose 448 persistent slots for that); 2 heads as in the benchmark's transformer baseline.
    settings = dict(n_layer=2, n_head=2, n_embd=128, dropout=0.05, bias=False)
    settings.update(overrides)
    return GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=block_size, **settings))


@functools.cache
def mosaic_param_count() -> int:
    """Parameters of the RegBench Memory Mosaic: the target the baselines' widths are fitted to."""
    with torch.random.fork_rng():  # building it must not move the caller's random stream
        return count_params(_memory_mosaic(block_size=16))


def _baseline(name: str) -> Callable[..., nn.Module]:
    def build(block_size: int, **overrides) -> nn.Module:
        from memory_mosaics.models import baselines

        if "n_embd" not in overrides:  # fit the width to Memory Mosaic's parameter count
            with torch.random.fork_rng():
                overrides["n_embd"] = baselines.fit_width(
                    name, VOCAB_SIZE, block_size, mosaic_param_count(), **overrides
                )
        return baselines.build_baseline(name, VOCAB_SIZE, block_size, **overrides)

    return build


def _baseline_names() -> tuple[str, ...]:
    try:
        from memory_mosaics.models.baselines import BASELINE_NAMES
    except ImportError:  # RegBench still runs Memory Mosaic and GPT without the baselines
        return ()
    return tuple(BASELINE_NAMES)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mosaic": _memory_mosaic,
    "transformer": _transformer,
    **{name: _baseline(name) for name in _baseline_names()},
}


def build_model(name: str, block_size: int, **overrides) -> nn.Module:
    """Build a fresh model for RegBench's 20-token vocabulary; `overrides` are config fields."""
    if name not in MODELS:
        raise MosaicError(f"unknown RegBench model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](block_size, **overrides)


def count_params(model: nn.Module) -> int:
    """All trainable parameters except a learned position table (GPT's `wpe`), which grows with
    the block size rather than with the model's capacity; tied tables are counted once."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.endswith("wpe.weight"))
