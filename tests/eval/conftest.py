"""Fixtures for the evaluation tests: tiny saved models with their tokenizer, and tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.data import make_tokenizer, prepare_dataset

STORIES = [
    "Tom had a red ball. Tom threw the ball to Mia.",
    "Mia found a cat. The cat was small and soft.",
    "Sam and Lily ate cake. The cake was sweet.",
    "A boat sailed on the lake. The sun was warm.",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def byte_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    tokenizer = make_tokenizer("byte")
    return {kind: save_checkpoint_folder(root / kind, kind, tokenizer) for kind in ("mosaic", "gpt")}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORIES * 3) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "byte"
    prepare_dataset(str(text_file), out, "byte", val=str(text_file))
    return out
