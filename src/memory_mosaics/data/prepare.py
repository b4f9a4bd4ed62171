"""Prepared data sets: corpora turned into token shards (`prepare_dataset`) and read back
(`PreparedData.open`).

A prepared folder holds

    manifest.json   what is here: tokenizer (name, fingerprint, vocab_size, eot_id), the splits
                    with their shard files, token counts, sizes and sha256, document counts, and
                    where the documents came from
    tokenizer/      the saved tokenizer (reloads with no network access)
    train.bin       the train split's tokens: every document followed by the EOT token
    val.bin         the validation split, same layout

The folder is built under a temporary name next to the target and renamed into place at the end,
so an interrupted or failed preparation never leaves a half-written data set behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memory_mosaics.data.corpora import Corpus, is_validation, open_corpus
from memory_mosaics.data.errors import CorpusError, DataError, ShardError
from memory_mosaics.data.shards import ShardWriter, dtype_for_vocab, read_shard, read_shard_header
from memory_mosaics.data.tokenizers import (
    BPE_VOCAB_RANGE,
    KINDS,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    make_tokenizer,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "memory-mosaics-prepared-data"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
_BATCH_CHARS = 1 << 20  # documents are tokenized in batches of about this many characters


def prepare_dataset(
    data: str,
    out: str | os.PathLike[str],
    tokenizer: str,
    *,
    val: str | None = None,
    vocab_size: int | None = None,
    gpt2_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.05,
    max_docs: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    fmt: str = "auto",
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenize corpus `data` (and `val`, else a `val_fraction` of `data`'s documents) into `out`.

    `max_docs` keeps the first N documents of each source. A bpe tokenizer is trained on the
    train documents only. Returns the manifest. Raises a `MosaicError` for any bad input, before
    the long work where it can.
    """
    _check_arguments(tokenizer, vocab_size, val, val_fraction, max_docs)
    out = Path(out).absolute()  # so that "." has a name to stage beside
    staging = _make_staging_folder(out, force)
    try:
        train_corpus = open_corpus(data, text_field=text_field, fmt=fmt)
        val_corpus = open_corpus(val, text_field=text_field, fmt=fmt) if val is not None else None

        def documents(split: str, task: str) -> Iterator[str]:
            """The split's documents; the progress bar counts every document read for `task`."""
            label = f"{task} (reading {data if val_corpus is None or split == 'train' else val})"
            if val_corpus is None:
                for index, doc in enumerate(_limited(train_corpus, max_docs, progress, label)):
                    if is_validation(index, seed, val_fraction) == (split == "val"):
                        yield doc
            else:
                yield from _limited(train_corpus if split == "train" else val_corpus, max_docs, progress, label)

        texts = documents("train", "training bpe") if tokenizer == "bpe" else None
        tok = make_tokenizer(tokenizer, vocab_size=vocab_size, texts=texts, gpt2_dir=gpt2_dir)
        splits = {
            split: _write_split(tok, documents(split, f"tokenizing {split}"), staging / f"{split}.bin", split)
            for split in SPLITS
        }
        tok.save(staging / "tokenizer")
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "tokenizer": {
                "name": tok.name,
                "fingerprint": tok.fingerprint(),
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "folder": "tokenizer",
            },
            "dtype": dtype_for_vocab(tok.vocab_size).name,
            "splits": splits,
            "source": {
                "train": train_corpus.description,
                "val": val_corpus.description if val_corpus else f"{val_fraction} of train documents",
                "val_fraction": None if val_corpus else val_fraction,
                "seed": seed,
                "max_docs": max_docs,
            },
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out)
    except OSError as err:  # a full disk, or a folder that became unwritable
        shutil.rmtree(staging, ignore_errors=True)
        where = f" ({err.filename})" if err.filename else ""
        raise DataError(f"cannot prepare --out {out}: {err.strerror or err}{where}; nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_arguments(tokenizer, vocab_size, val, val_fraction, max_docs) -> None:
    if tokenizer not in KINDS:
        raise TokenizerError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(KINDS)}")
    if tokenizer == "bpe" and vocab_size is not None and not BPE_VOCAB_RANGE[0] <= vocab_size <= BPE_VOCAB_RANGE[1]:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is out of range: a BPE vocabulary needs "
            f"{BPE_VOCAB_RANGE[0]}..{BPE_VOCAB_RANGE[1]}"
        )
    if tokenizer != "bpe" and vocab_size is not None:
        raise TokenizerError(f"--vocab-size applies to --tokenizer bpe only (the {tokenizer} vocabulary is fixed)")
    if val is None and not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} is out of range: it must lie strictly between 0 and 1")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"--max-docs {max_docs} must be at least 1")


def _make_staging_folder(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out} exists and is not empty: refusing to overwrite it (pass --force to replace it)")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as err:
        raise DataError(f"cannot write --out {out}: {err.strerror or err}") from err
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)  # keeps the old data until the new folder is in place
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _limited(corpus: Corpus, max_docs: int | None, progress: bool, label: str) -> Iterator[str]:
    total = corpus.num_documents if max_docs is None else min(max_docs, corpus.num_documents or max_docs)
    bar = tqdm(total=total, desc=label, unit="doc", disable=not progress, file=sys.stderr)
    with bar:
        for index, doc in enumerate(corpus.documents()):
            if max_docs is not None and index >= max_docs:
                break
            bar.update()
            yield doc


def encode_documents(tokenizer: Tokenizer, documents: Iterable[str]) -> np.ndarray:
    """One token stream for `documents`, each followed by EOT (what eval reads from a text file)."""
    chunks = [_encode_batch(tokenizer, batch) for batch in _batches(iter(documents))]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def _encode_batch(tokenizer: Tokenizer, batch: list[str]) -> np.ndarray:
    flat: list[int] = []
    for ids in tokenizer.encode_batch(batch):
        flat += ids
        flat.append(tokenizer.eot_id)
    return np.array(flat, dtype=np.int64)


def _write_split(tokenizer: Tokenizer, documents: Iterator[str], path: Path, split: str) -> dict:
    """Tokenize `documents` into the shard at `path`, EOT after each; return its manifest entry."""
    num_docs = 0
    with ShardWriter(path, tokenizer.fingerprint(), dtype_for_vocab(tokenizer.vocab_size)) as writer:
        for batch in _batches(documents):
            writer.write(_encode_batch(tokenizer, batch))
            num_docs += len(batch)
    if num_docs == 0:
        raise CorpusError(
            f"the {split} split has no documents: the corpus is empty"
            + (" or too small for --val-fraction; raise it or pass --val SRC" if split == "val" else "")
        )
    shard = {"file": path.name, "tokens": writer.count, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    return {"documents": num_docs, "tokens": writer.count, "shards": [shard]}


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PreparedData:
    """A folder written by `prepare_dataset` (or `mosaic prepare`), checked when opened."""

    path: Path
    manifest: dict
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> PreparedData:
        """Open and check a prepared folder: manifest, tokenizer, and every shard's header and size
        (and, with `verify`, its sha256, which reads every byte once)."""
        path = Path(path)
        manifest = _read_manifest(path)
        tokenizer = load_tokenizer(path / manifest["tokenizer"]["folder"])
        _check_tokenizer(path, manifest, tokenizer)
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                _check_shard(path, shard, tokenizer.fingerprint(), verify)
        return cls(path, manifest, tokenizer)

    def split(self, name: str) -> np.ndarray:
        """The 1-D token stream of split `name` ("train" or "val"), memory-mapped read-only."""
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.path} has no split {name!r} (it has {', '.join(self.manifest['splits'])})")
        shards = [
            read_shard(self.path / s["file"], self.tokenizer.fingerprint())
            for s in self.manifest["splits"][name]["shards"]
        ]
        return shards[0] if len(shards) == 1 else np.concatenate(shards)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise ShardError(
            f"no prepared data in {path}: {MANIFEST} is missing (make it with `mosaic prepare --out {path}`)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{file} is not valid JSON ({err}); prepare the data again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f'{file} is not a memory-mosaics data manifest (no "format": "{MANIFEST_FORMAT}")')
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ShardError(
            f"{file}: format_version {manifest.get('format_version')!r} is not supported (this version reads "
            f"{MANIFEST_VERSION}); prepare the data again"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{file} is malformed ({problem}); prepare the data again")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's fields, or None."""
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict):
        return "no tokenizer object"
    for key, kind in {"name": str, "fingerprint": str, "folder": str, "vocab_size": int, "eot_id": int}.items():
        if not isinstance(tok.get(key), kind) or isinstance(tok.get(key), bool):
            return f"tokenizer {key} is {tok.get(key)!r}, expected {kind.__name__}"
    if Path(tok["folder"]).name != tok["folder"] or tok["folder"] in ("", ".", ".."):
        return f"tokenizer folder {tok['folder']!r} is not a folder name inside the data folder"
    splits = manifest.get("splits")
    for split in SPLITS:
        shards = splits.get(split, {}).get("shards") if isinstance(splits, dict) else None
        if not isinstance(shards, list):
            return f"no shard list for the {split} split"
        for shard in shards:
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                return f"a {split} shard without a file name"
            if Path(shard["file"]).name != shard["file"]:
                return f"shard file {shard['file']!r} is not a file name inside the data folder"
            if not all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("tokens", "bytes")):
                return f"shard {shard['file']} has no valid token and byte counts"
    return None


def _check_tokenizer(path: Path, manifest: dict, tokenizer: Tokenizer) -> None:
    expected = manifest["tokenizer"]
    found = {
        "name": tokenizer.name,
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
    }
    for key, value in found.items():
        if expected[key] != value:
            raise ShardError(
                f"{path / MANIFEST} says tokenizer {key} = {expected[key]!r}, but "
                f"{path / expected['folder']} holds {value!r}: the folder mixes two preparations; "
                "prepare the data again"
            )


def _check_shard(path: Path, shard: dict, fingerprint: str, verify: bool) -> None:
    file = path / shard["file"]
    header = read_shard_header(file)
    if header["fingerprint"] != fingerprint:
        raise ShardError(
            f"token shard {file} was written with tokenizer {header['fingerprint']!r}, but {path} uses "
            f"{fingerprint!r}; prepare the data again"
        )
    if header["count"] != shard["tokens"]:
        raise ShardError(f"token shard {file} holds {header['count']} tokens, its manifest says {shard['tokens']}")
    if verify and "sha256" in shard and _sha256(file) != shard["sha256"]:
        raise ShardError(f"token shard {file} is corrupt: its sha256 differs from {path / MANIFEST}; prepare again")
