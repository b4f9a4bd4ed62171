"""Shared helpers of the evaluation tests (a module of its own: conftest modules share one name)."""

from __future__ import annotations

from pathlib import Path

import torch

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig

STORIES = [
    "Tom had a red ball. Tom threw the ball to Mia.",
    "Mia found a cat. The cat was small and soft.",
    "Sam and Lily ate cake. The cake was sweet.",
    "A boat sailed on the lake. The sun was warm.",
]


def save_checkpoint_folder(folder: Path, model_type: str, tokenizer) -> Path:
    """A checkpoint as `mosaic train` lays it out (model + tokenizer/), with random weights."""
    torch.manual_seed(0)
    shape = {"vocab_size": tokenizer.vocab_size, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16}
    if model_type == "mosaic":
        model = MemoryMosaic(MemoryMosaicConfig(**shape, pmem_size=16, dropout=0.0))
    else:
        model = GPT(GPTConfig(**shape, dropout=0.0))
    model.save_pretrained(folder / "checkpoint")
    tokenizer.save(folder / "checkpoint" / "tokenizer")
    return folder
