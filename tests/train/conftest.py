"""Fixtures for the training tests: a tiny prepared corpus and a tiny model shape."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from memory_mosaics.data import prepare_dataset

# Small enough that a step takes milliseconds, big enough to have every kind of parameter.
TINY_MOSAIC = {"n_layer": 1, "n_head": 2, "n_embd": 16, "pmem_size": 16, "block_size": 16, "dropout": 0.0}
TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Busy shared machines make multi-threaded tiny matmuls slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_stories(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    names, things = ["Tom", "Mia", "Sam", "Lily"], ["ball", "cat", "tree", "cake", "boat"]
    stories = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        stories.append(f"{name} had a {thing}. {name} liked the {thing} a lot. The end.")
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A byte-tokenized corpus of a few thousand tokens, prepared like `mosaic prepare` does."""
    root = tmp_path_factory.mktemp("tiny-data")
    train = write_stories(root / "train.txt", 60, seed=0)
    val = write_stories(root / "val.txt", 10, seed=1)
    prepare_dataset(str(train), root / "prepared", "byte", val=str(val))
    return root / "prepared"
