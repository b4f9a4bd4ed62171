"""What `mosaic inspect` reads: a Memory Mosaic checkpoint, its tokenizer if it has one, and the tokens.

A checkpoint is either a folder written by `save_pretrained` (config.json + model.safetensors) or a
training run folder holding such a folder (its latest checkpoint in `checkpoint/`). A `tokenizer/`
folder beside the model, or in the run folder, is used when present; without one the inspector shows
token ids, and text input is refused (only `--ids` can be read).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from memory_mosaics.errors import CheckpointError, MosaicError
from memory_mosaics.models.base import CONFIG_FILE, load, read_config
from memory_mosaics.models.memory_mosaic import MemoryMosaic

TOKENIZER_DIR = "tokenizer"
RUN_CHECKPOINT_DIR = "checkpoint"  # where a training run keeps its latest checkpoint


def find_model_folder(path: str | os.PathLike[str]) -> Path:
    """The folder holding config.json: `path` itself, `path/checkpoint`, or its only subfolder with one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a folder written by save_pretrained or a run")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; pass the folder that holds {CONFIG_FILE}")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / RUN_CHECKPOINT_DIR / CONFIG_FILE).is_file():
        return path / RUN_CHECKPOINT_DIR
    candidates = sorted(sub for sub in path.iterdir() if (sub / CONFIG_FILE).is_file())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(sub.name for sub in candidates)
        raise CheckpointError(f"{path} holds several models ({names}); pass one of those folders")
    raise CheckpointError(
        f"{path} holds no model: no {CONFIG_FILE} in it or in a subfolder; "
        "pass a folder written by save_pretrained or a training run folder"
    )


def load_mosaic(path: str | os.PathLike[str]) -> tuple[MemoryMosaic, Path]:
    """The Memory Mosaic saved at `path` (in eval mode) and the folder it was read from."""
    folder = find_model_folder(path)
    model_type, _ = read_config(folder)
    if model_type != MemoryMosaic.model_type:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: model_type is {model_type!r}; mosaic inspect reads Memory Mosaic "
            f"checkpoints only (model_type {MemoryMosaic.model_type!r}), whose memories it can explain"
        )
    model = load(folder)
    assert isinstance(model, MemoryMosaic)  # read_config and load agree on the class
    return model.eval(), folder


def load_tokenizer_near(model_folder: Path, given: str | os.PathLike[str]):
    """The tokenizer saved beside the model (or in the run folder), or None when there is none."""
    for folder in dict.fromkeys([model_folder / TOKENIZER_DIR, Path(given) / TOKENIZER_DIR]):
        if folder.is_dir():
            try:
                from memory_mosaics.data.tokenizers import load_tokenizer
            except ImportError:  # a build without the data package: show ids
                return None
            return load_tokenizer(folder)
    return None


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """'1,2, 3' -> [1, 2, 3], each checked against the model's vocabulary."""
    ids = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise MosaicError(f"--ids: {item!r} is not an integer; pass comma-separated token ids like 1,2,3") from None
    return check_ids(ids, vocab_size, "--ids")


def check_ids(ids: list[int], vocab_size: int, origin: str) -> list[int]:
    if not ids:
        raise MosaicError(f"{origin}: no tokens to inspect; give at least one")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise MosaicError(f"{origin}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return ids


def encode_text(text: str, tokenizer, origin: str, vocab_size: int) -> list[int]:
    if tokenizer is None:
        raise MosaicError(
            f"{origin}: this checkpoint has no {TOKENIZER_DIR}/ folder, so text cannot be tokenized; "
            "pass token ids with --ids 1,2,3"
        )
    if not text.strip():
        raise MosaicError(f"{origin}: the text is empty; give some text to inspect")
    return check_ids(tokenizer.encode(text), vocab_size, origin)


def describer(tokenizer) -> Callable[[int], str]:
    """How a token is shown: its decoded text, or '#id' without a tokenizer or past its vocabulary."""

    def describe(token: int) -> str:
        if tokenizer is None or token >= tokenizer.vocab_size:  # padded model vocabularies
            return f"#{token}"
        return tokenizer.decode([token])

    return describe
