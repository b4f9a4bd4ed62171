"""Tiny random models shared by the inference tests (dropout 0, eval mode)."""

from __future__ import annotations

import torch

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig

VOCAB = 37


def tiny_mosaic(seed: int = 0, **overrides) -> MemoryMosaic:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, pmem_size=12, dropout=0.0,
        leaky_chunk_size=8,
    )  # fmt: skip
    fields.update(overrides)
    return MemoryMosaic(MemoryMosaicConfig(**fields)).eval()


def tiny_gpt(seed: int = 0, block_size: int = 48) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(config).eval()


def run_chunks(model, idx: torch.Tensor, sizes: list[int], **options) -> tuple[torch.Tensor, object]:
    """Feed idx to model.step in chunks of the given sizes; returns the concatenated logits and the state."""
    assert sum(sizes) == idx.shape[1]
    state = model.init_state(idx.shape[0], **options)
    outputs, start = [], 0
    for size in sizes:
        logits, state = model.step(idx[:, start : start + size], state)
        outputs.append(logits)
        start += size
    return torch.cat(outputs, dim=1), state


def random_split(length: int, generator: torch.Generator) -> list[int]:
    """A random composition of `length` mixing single steps and longer chunks."""
    sizes, left = [], length
    while left:
        size = 1 if torch.rand((), generator=generator) < 0.5 else int(torch.randint(1, 12, (), generator=generator))
        size = min(size, left)
        sizes.append(size)
        left -= size
    return sizes
