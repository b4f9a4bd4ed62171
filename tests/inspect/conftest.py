"""Tiny Memory Mosaic checkpoints for the inspector's tests (random weights; seconds to build)."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig

VOCAB = 300  # above the byte tokenizer's 257 ids, like a padded vocabulary


def tiny_config(**overrides) -> MemoryMosaicConfig:
    values = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=3, n_embd=24, pmem_size=7, dropout=0.0)
    return MemoryMosaicConfig(**{**values, **overrides})


def tiny_mosaic(seed: int = 0, **overrides) -> MemoryMosaic:
    torch.manual_seed(seed)
    model = MemoryMosaic(tiny_config(**overrides))
    # Spread the learned leaks and key scales away from their initial values, as training would,
    # so that a test cannot pass by confusing one head's parameters with another's.
    with torch.no_grad():
        for block in model.blocks:
            for memory in (block.context, block.persistent):
                if memory is not None:
                    memory.key.leak.mul_(torch.linspace(0.5, 1.5, memory.key.leak.numel()))
                    memory.key.bandwidth.add_(torch.linspace(-0.05, 0.08, memory.key.bandwidth.numel()))
    return model.eval()


# The checkpoint folders are shared by the tests of a session: they only read them.


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A save_pretrained folder without a tokenizer."""
    return tiny_mosaic().save_pretrained(tmp_path_factory.mktemp("inspect") / "model")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A training-run-like folder: RUN/checkpoint/{config.json, model.safetensors, tokenizer/}."""
    tokenizers = pytest.importorskip("memory_mosaics.data.tokenizers")
    run = tmp_path_factory.mktemp("inspect") / "run"
    folder = tiny_mosaic().save_pretrained(run / "checkpoint")
    tokenizers.ByteTokenizer().save(folder / "tokenizer")
    return run


@pytest.fixture
def make_mosaic():
    """The factory `tiny_mosaic(seed=0, **config overrides)`, for tests that need several models."""
    return tiny_mosaic
