"""Corpora: where documents come from, and which of them go to validation.

A source (`--data SRC`) is one of

- a text file (any name but *.jsonl): documents are separated by lines holding only
  `<|endoftext|>` when the file has at least one such line, otherwise by blank lines (each
  paragraph is a document). Surrounding whitespace is stripped; empty documents are dropped.
- a .jsonl file: one JSON value per line, either an object whose `text` field (see `text_field`)
  is the document, or a bare JSON string. Blank lines are skipped.
- a folder: every *.txt and *.jsonl file below it, in sorted path order, each read as above.
- `python-stdlib`: each .py file of the running interpreter's standard library (site-packages
  excluded), in sorted path order, decoded as Python decodes source (PEP 263); the few files that
  Python itself cannot decode (deliberately broken test data) are skipped. No download.
- `tinystories[:SPLIT]`: TinyStories from the Hugging Face hub (needs `datasets` and network).
- `babistories[:train|val]`: the authors' BabiStories 7z archive (needs `py7zr` and network).

Files must be UTF-8 text; a file with invalid UTF-8 or NUL bytes is refused as binary.
The train/validation split is by document: document i goes to validation when a keyed hash of
(seed, i) falls below `val_fraction`, so it is the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import tokenize
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from memory_mosaics.data.errors import CorpusError

EOT_LINE = "<|endoftext|>"
NAMED = ("python-stdlib", "tinystories", "babistories")
FORMATS = ("auto", "txt", "jsonl")
TINYSTORIES_HUB_ID = "roneneldan/TinyStories"
BABISTORIES_URL = "https://github.com/facebookresearch/MemoryMosaics/raw/main/BabiStories/data/"
BABISTORIES_PARTS = [f"babistories-dataset.7z.{i:03d}" for i in range(1, 6)]


@dataclass(frozen=True)
class Corpus:
    """A re-iterable source of documents: `documents()` starts a fresh pass each call."""

    description: str
    documents: Callable[[], Iterator[str]]
    num_documents: int | None = None  # when known in advance (for progress bars)


def open_corpus(spec: str, *, text_field: str = "text", fmt: str = "auto", cache_dir: Path | None = None) -> Corpus:
    """Resolve `spec` (a path or a built-in name, see the module docstring) to a Corpus."""
    if fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(spec).expanduser()
    name, _, split = spec.partition(":")
    if not path.exists() and name in NAMED:
        if name == "python-stdlib":
            return python_stdlib_corpus()
        if name == "tinystories":
            return tinystories_corpus(split or "train")
        return babistories_corpus(split or "train", cache_dir or Path.home() / ".cache" / "memory-mosaics")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl") and not p.name.startswith(".")
        )
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt or .jsonl files")
        readers = [_file_reader(p, text_field, fmt) for p in files]
        return Corpus(f"folder {path} ({len(files)} files)", lambda: (doc for read in readers for doc in read()))
    if path.is_file():
        if path.stat().st_size == 0:
            raise CorpusError(f"corpus file {path} is empty")
        return Corpus(f"file {path}", _file_reader(path, text_field, fmt))
    if path.exists():
        raise CorpusError(f"corpus {spec!r} is neither a regular file nor a folder")
    raise CorpusError(f"corpus {spec!r} not found: it is not a file, a folder, or a built-in name ({', '.join(NAMED)})")


def _file_reader(path: Path, text_field: str, fmt: str) -> Callable[[], Iterator[str]]:
    if fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl"):
        return lambda: _jsonl_documents(path, text_field)
    return lambda: _txt_documents(path)


def _lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 text file; refuses binary files with a message that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if "\0" in line:
                    raise CorpusError(f"{path} contains NUL bytes: it looks binary, not text")
                yield line
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason}): is it a binary file?") from err


def _has_eot_line(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() == EOT_LINE.encode() for line in f)


def _txt_documents(path: Path) -> Iterator[str]:
    by_eot = _has_eot_line(path)
    lines: list[str] = []
    for line in _lines(path):
        at_boundary = line.strip() == EOT_LINE if by_eot else not line.strip()
        if at_boundary:
            if "".join(lines).strip():
                yield "".join(lines).strip()
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines).strip()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        text = value.get(text_field) if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise CorpusError(
                f"{path}:{number}: expected a JSON string or an object with a string field "
                f"{text_field!r} (choose the field with --text-field)"
            )
        if text.strip():
            yield text


def python_stdlib_corpus() -> Corpus:
    """The running interpreter's standard-library sources: one document per .py file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not excluded & set(p.relative_to(root).parts))
    if not files:
        raise CorpusError(f"no .py files under {root}: this Python has no standard-library sources")

    def documents() -> Iterator[str]:
        for path in files:
            try:
                with tokenize.open(path) as f:  # honours PEP 263 coding declarations
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError):
                continue  # deliberately undecodable test data, e.g. test/tokenizedata/bad_coding.py
            if text.strip():
                yield text

    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(f"python-stdlib: {len(files)} .py files under {root} (Python {version})", documents, len(files))


def tinystories_corpus(split: str) -> Corpus:
    offline_hint = (
        "offline, pass the dataset's text files instead, e.g. --data TinyStories-train.txt "
        "--val TinyStories-valid.txt (stories separated by <|endoftext|> lines)"
    )
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            f"--data tinystories needs the Hugging Face `datasets` package (pip install "
            f"'memory-mosaics[hub]') and network access; {offline_hint}"
        ) from err
    try:
        rows = datasets.load_dataset(TINYSTORIES_HUB_ID, split=split)
    except Exception as err:  # hub, network and cache failures come as many types
        raise CorpusError(
            f"could not load {TINYSTORIES_HUB_ID} split {split!r} ({type(err).__name__}: {err}); " + offline_hint
        ) from err
    return Corpus(f"tinystories: {TINYSTORIES_HUB_ID} split {split}", lambda: (r["text"] for r in rows), len(rows))


def babistories_corpus(split: str, cache_dir: Path) -> Corpus:
    """The authors' archive, downloaded once into `cache_dir/babistories` and extracted there."""
    if split not in ("train", "val"):
        raise CorpusError(f"babistories has splits 'train' and 'val', not {split!r}")
    folder = cache_dir / "babistories"
    offline_hint = (
        f"offline, download {', '.join(BABISTORIES_PARTS)} from {BABISTORIES_URL} elsewhere, extract them "
        "(7z x babistories-dataset.7z.001) and pass --data DIR/traindataset.txt --val DIR/valdataset.txt "
        "--format jsonl"
    )
    extracted = folder.is_dir() and any(folder.rglob("*.txt"))
    if not extracted:
        try:
            import py7zr
        except ImportError as err:
            raise CorpusError(
                f"--data babistories needs the `py7zr` package (pip install 'memory-mosaics[hub]') "
                f"and network access; {offline_hint}"
            ) from err
        _download_babistories(folder, py7zr, offline_hint)
    names = {"train": ("train",), "val": ("val", "test")}[split]
    matches = sorted(p for p in folder.rglob("*.txt") if any(n in p.name.lower() for n in names))
    if not matches:
        raise CorpusError(f"the BabiStories archive in {folder} has no {split} file (looked for {names})")
    return Corpus(f"babistories: {matches[0]}", lambda: _jsonl_documents(matches[0], "text"))


def _download_babistories(folder: Path, py7zr, offline_hint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "babistories-dataset.7z"
    try:
        with open(archive, "wb") as out:  # the parts are byte ranges of one archive
            for part in BABISTORIES_PARTS:
                with urllib.request.urlopen(BABISTORIES_URL + part, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
        with py7zr.SevenZipFile(archive) as z:
            z.extractall(folder)
    except (OSError, py7zr.exceptions.ArchiveError) as err:
        raise CorpusError(f"could not fetch the BabiStories archive ({err}); {offline_hint}") from err
    finally:
        archive.unlink(missing_ok=True)


def is_validation(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64
