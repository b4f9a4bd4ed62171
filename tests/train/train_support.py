"""Shared helpers of the training tests (a module of its own: conftest modules share one name)."""

from __future__ import annotations

import random
from pathlib import Path

# Small enough that a step takes milliseconds, big enough to have every kind of parameter.
TINY_MOSAIC = {"n_layer": 1, "n_head": 2, "n_embd": 16, "pmem_size": 16, "block_size": 16, "dropout": 0.0}
TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0}


def write_stories(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    names, things = ["Tom", "Mia", "Sam", "Lily"], ["ball", "cat", "tree", "cake", "boat"]
    stories = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        stories.append(f"{name} had a {thing}. {name} liked the {thing} a lot. The end.")
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path
