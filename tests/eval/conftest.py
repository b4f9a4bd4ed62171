"""Fixtures for the evaluation tests: tiny saved models with their tokenizer, tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_support import STORIES, save_checkpoint_folder

from memory_mosaics.data import make_tokenizer, prepare_dataset


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
