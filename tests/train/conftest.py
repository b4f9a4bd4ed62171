"""Fixtures for the training tests: a tiny prepared corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_support import write_stories

from memory_mosaics.data import prepare_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A byte-tokenized corpus of a few thousand tokens, prepared like `mosaic prepare` does."""
    root = tmp_path_factory.mktemp("tiny-data")
    train = write_stories(root / "train.txt", 60, seed=0)
    val = write_stories(root / "val.txt", 10, seed=1)
    prepare_dataset(str(train), root / "prepared", "byte", val=str(val))
    return root / "prepared"
