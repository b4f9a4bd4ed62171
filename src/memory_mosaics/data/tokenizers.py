"""Tokenizers: GPT-2's BPE (tiktoken), a byte-level BPE trained on the corpus (Hugging Face
`tokenizers`), and raw UTF-8 bytes.

Every tokenizer has one end-of-text token (EOT) that the data pipeline puts after each document.
`encode` never turns text into special tokens: the string "<|endoftext|>" inside a document is
ordinary text, so a corpus cannot forge document boundaries.

A tokenizer saves itself into a folder: `tokenizer_config.json` (kind, vocabulary size, EOT id,
fingerprint, file list) plus the kind's own files, so that it reloads with no network access:

    gpt2  encoder.json + vocab.bpe (copied from where they were read), or gpt2.tiktoken when the
          vocabulary came from tiktoken's own download
    bpe   bpe.json (the Hugging Face tokenizer)
    byte  nothing else

The fingerprint is a hash of the vocabulary itself (not of file bytes); shards and manifests record
it so that tokens are never read with a different tokenizer than the one that wrote them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from memory_mosaics.data.errors import TokenizerError

EOT_TEXT = "<|endoftext|>"
CONFIG_NAME = "tokenizer_config.json"
FORMAT_VERSION = 1
KINDS = ("gpt2", "bpe", "byte")
DEFAULT_BPE_VOCAB = 4096
# 256 byte tokens + EOT at least; past 2**20 a vocabulary is surely a typo for these models.
BPE_VOCAB_RANGE = (257, 1 << 20)

GPT2_ENV = "MOSAIC_GPT2_DIR"
GPT2_FILES = ("encoder.json", "vocab.bpe")
GPT2_TIKTOKEN_FILE = "gpt2.tiktoken"
GPT2_EOT_ID = 50256
# GPT-2's pre-tokenisation pattern (contractions, letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _digest(kind: str, *parts: bytes) -> str:
    """A short stable hash; each part is length-prefixed so that concatenations cannot collide."""
    h = hashlib.sha256(kind.encode())
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return f"{kind}-{h.hexdigest()[:16]}"


class Tokenizer(ABC):
    """What the rest of the library needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens are never parsed from the text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many documents (subclasses run it in parallel)."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; EOT decodes to "<|endoftext|>", broken UTF-8 to U+FFFD."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable id of the vocabulary, e.g. "bpe-3f2a...", recorded in shards and manifests."""

    @abstractmethod
    def _save_files(self, folder: Path) -> list[str]:
        """Write the kind's own files into `folder`; return their names."""

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write everything `load_tokenizer(folder)` needs, with no network access."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = self._save_files(folder)
        config = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "eot_text": EOT_TEXT,
            "fingerprint": self.fingerprint(),
            "files": files,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token id {bad[0]} is outside the {self.name} vocabulary (0..{self.vocab_size - 1}); "
                "a model whose vocab_size is padded past the tokenizer's must not sample those ids"
            )
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (0..255) and EOT = 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        pieces, run = [], bytearray()
        for i in self._check_ids(ids):
            if i == self.eot_id:
                pieces += [run.decode("utf-8", errors="replace"), EOT_TEXT]
                run = bytearray()
            else:
                run.append(i)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def fingerprint(self) -> str:
        return _digest("byte", b"utf-8 bytes + eot 256")

    def _save_files(self, folder: Path) -> list[str]:
        return []


class _TiktokenBPE(Tokenizer):
    """Byte-level BPE run by tiktoken: `ranks` maps each token's bytes to its id, which is also its
    merge priority (a token made by an earlier merge has a smaller id). EOT is the one special id."""

    def _init_encoding(self, ranks: dict[bytes, int]) -> None:
        import tiktoken

        self._ranks = ranks
        self._encoding = tiktoken.Encoding(
            name=self.name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: self.eot_id},
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(self._check_ids(ids), errors="replace")


class GPT2Tokenizer(_TiktokenBPE):
    """GPT-2's byte-level BPE (50,257 tokens, EOT = 50256) run by tiktoken."""

    name = "gpt2"
    vocab_size = GPT2_EOT_ID + 1
    eot_id = GPT2_EOT_ID

    def __init__(self, ranks: dict[bytes, int], source_dir: Path | None = None):
        if len(ranks) != GPT2_EOT_ID or sorted(ranks.values()) != list(range(GPT2_EOT_ID)):
            where = f" read from {source_dir}" if source_dir else ""
            raise TokenizerError(
                f"the GPT-2 vocabulary{where} has {len(ranks)} tokens, expected ranks 0..{GPT2_EOT_ID - 1}; "
                "pass the original encoder.json and vocab.bpe"
            )
        self._init_encoding(ranks)
        self._source_dir = source_dir
        self._fingerprint: str | None = None

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> GPT2Tokenizer:
        """Read the data-gym pair encoder.json + vocab.bpe (OpenAI's published GPT-2 files)."""
        folder = Path(folder)
        missing = [name for name in GPT2_FILES if not (folder / name).is_file()]
        if missing:
            raise TokenizerError(
                f"GPT-2 tokenizer folder {folder} lacks {' and '.join(missing)}; "
                "it must hold OpenAI's encoder.json and vocab.bpe"
            )
        try:
            ranks = _read_data_gym(folder / "encoder.json", folder / "vocab.bpe")
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            raise TokenizerError(
                f"cannot read GPT-2 files in {folder} ({type(err).__name__}: {err}); "
                "they must be OpenAI's unmodified encoder.json and vocab.bpe"
            ) from err
        return cls(ranks, source_dir=folder)

    @classmethod
    def from_tiktoken_file(cls, path: Path) -> GPT2Tokenizer:
        """Read a tiktoken ranks file: one "base64(token) rank" per line."""
        ranks = {}
        try:
            for line in path.read_text(encoding="ascii").splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            raise TokenizerError(f"cannot read {path} ({err}); the saved tokenizer is corrupt") from err
        return cls(ranks)

    @classmethod
    def download(cls) -> GPT2Tokenizer:
        """Let tiktoken fetch (and cache) the GPT-2 files itself; needs network the first time."""
        import tiktoken

        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as err:  # network errors come from several libraries; all mean the same
            raise TokenizerError(
                f"could not fetch the GPT-2 tokenizer files ({type(err).__name__}); offline, pass "
                f"--gpt2-dir DIR (or set {GPT2_ENV}) to a folder holding encoder.json and vocab.bpe"
            ) from err
        ranks = {encoding.decode_single_token_bytes(i): i for i in range(GPT2_EOT_ID)}
        return cls(ranks)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            by_rank = sorted(self._ranks, key=self._ranks.__getitem__)
            parts = [GPT2_PATTERN.encode(), EOT_TEXT.encode(), *by_rank]
            self._fingerprint = _digest("gpt2", *parts)
        return self._fingerprint

    def _save_files(self, folder: Path) -> list[str]:
        if self._source_dir is not None:
            for name in GPT2_FILES:
                if (self._source_dir / name).resolve() != (folder / name).resolve():
                    shutil.copyfile(self._source_dir / name, folder / name)
            return list(GPT2_FILES)
        lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in self._ranks.items())
        (folder / GPT2_TIKTOKEN_FILE).write_text("\n".join(lines) + "\n", encoding="ascii")
        return [GPT2_TIKTOKEN_FILE]


# GPT-2 (and Hugging Face's ByteLevel) write each byte as a printable character: printable bytes as
# themselves, the others as chr(256 + n) in byte order. GPT-2's 256 single-byte tokens take ranks
# 0..255 in that same order.
_PRINTABLE = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
_OTHERS = [b for b in range(256) if b not in _PRINTABLE]
_BYTE_OF_CHAR = {chr(b): b for b in _PRINTABLE} | {chr(256 + n): b for n, b in enumerate(_OTHERS)}


def _to_bytes(word: str) -> bytes:
    return bytes(_BYTE_OF_CHAR[c] for c in word)


def _read_data_gym(encoder_json: Path, vocab_bpe: Path) -> dict[bytes, int]:
    """GPT-2's files as tiktoken ranks. Read here rather than by tiktoken, whose loader caches
    local files by path in a temp folder and would return stale contents after a file changes."""
    ranks = {bytes([b]): rank for rank, b in enumerate(_PRINTABLE + _OTHERS)}
    merges = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:]  # line 1 is a version header
    for line in filter(None, merges):
        first, second = line.split()
        ranks[_to_bytes(first) + _to_bytes(second)] = len(ranks)
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    listed = {_to_bytes(word): rank for word, rank in encoder.items() if word != EOT_TEXT}
    if listed != ranks or encoder.get(EOT_TEXT) != GPT2_EOT_ID:
        raise ValueError("encoder.json and vocab.bpe disagree")
    return ranks


class BPETokenizer(_TiktokenBPE):
    """A byte-level BPE trained on the corpus with Hugging Face `tokenizers` and saved in its
    format; EOT is id 0. Text is encoded by tiktoken from the same vocabulary: the ids are the same
    (a test checks it) and it runs several times faster on these machines."""

    name = "bpe"
    FILE = "bpe.json"

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer
        saved = json.loads(hf_tokenizer.to_str())
        vocab, merges = saved["model"]["vocab"], saved["model"]["merges"]
        if vocab.get(EOT_TEXT) is None:
            raise TokenizerError(f"the BPE tokenizer has no {EOT_TEXT} token; it was not made by mosaic")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerError("the BPE tokenizer's ids are not 0..N-1 each once; the file is corrupt")
        self.vocab_size = len(vocab)
        self.eot_id = vocab[EOT_TEXT]
        # tiktoken ranks merges by the id of the token they make: ids must follow merge order.
        first_merge_id = len(vocab) - len(merges)
        pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
        if any(vocab.get("".join(pair)) != first_merge_id + i for i, pair in enumerate(pairs)):
            raise TokenizerError("the BPE tokenizer's ids do not follow its merge order; it was not made by mosaic")
        try:
            ranks = {_to_bytes(token): i for token, i in vocab.items() if token != EOT_TEXT}
        except KeyError as err:
            raise TokenizerError(f"the BPE tokenizer is not byte-level (token character {err})") from err
        self._essence = {
            "model": saved["model"],
            "added": [[t["id"], t["content"]] for t in saved["added_tokens"]],
            "pre_tokenizer": saved["pre_tokenizer"],
        }
        self._init_encoding(ranks)
        self._fingerprint: str | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
        """Train on `texts`. A small corpus may give fewer merges: `vocab_size` is then smaller."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_bpe_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception for every parse error
            raise TokenizerError(f"cannot read BPE tokenizer {path} ({err}); the file is corrupt") from err
        try:
            return cls(hf)
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as err:
            # a file HF accepts may still break what this class (and tiktoken) assume of it
            raise TokenizerError(f"BPE tokenizer {path} is corrupt ({type(err).__name__}: {err})") from err

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _digest("bpe", json.dumps(self._essence, sort_keys=True).encode())
        return self._fingerprint

    def _save_files(self, folder: Path) -> list[str]:
        self._hf.save(str(folder / self.FILE))
        return [self.FILE]


def check_bpe_vocab_size(vocab_size: int) -> None:
    low, high = BPE_VOCAB_RANGE
    if not isinstance(vocab_size, int) or not low <= vocab_size <= high:
        raise TokenizerError(f"--vocab-size {vocab_size} is out of range: a BPE vocabulary needs {low}..{high}")


def make_tokenizer(
    kind: str,
    *,
    vocab_size: int | None = None,
    texts: Iterable[str] | None = None,
    gpt2_dir: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Build a tokenizer of `kind` ("gpt2", "bpe" or "byte").

    bpe trains on `texts` with `vocab_size` (default 4096). gpt2 reads `gpt2_dir`, else the folder in
    the MOSAIC_GPT2_DIR environment variable, else lets tiktoken download its files.
    """
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        check_bpe_vocab_size(vocab_size)
        if texts is None:
            raise TokenizerError("a bpe tokenizer is trained on a corpus: pass texts")
        return BPETokenizer.train(texts, vocab_size)
    fixed = GPT2Tokenizer.vocab_size if kind == "gpt2" else ByteTokenizer.vocab_size
    if vocab_size is not None and vocab_size != fixed:
        raise TokenizerError(
            f"--vocab-size {vocab_size} does not apply to the {kind} tokenizer (its vocabulary has "
            f"{fixed} tokens); use --tokenizer bpe to choose a size"
        )
    if kind == "byte":
        return ByteTokenizer()
    folder = gpt2_dir or os.environ.get(GPT2_ENV)
    return GPT2Tokenizer.from_dir(folder) if folder else GPT2Tokenizer.download()


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer:
    """Reload what `Tokenizer.save(folder)` wrote, checking that its files match its config."""
    folder = Path(folder)
    config = _read_config(folder)
    name = config["name"]
    if name == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif name == "bpe":
        tokenizer = BPETokenizer.from_file(_listed_file(folder, config, BPETokenizer.FILE))
    elif (folder / GPT2_TIKTOKEN_FILE).is_file() and GPT2_TIKTOKEN_FILE in config["files"]:
        tokenizer = GPT2Tokenizer.from_tiktoken_file(folder / GPT2_TIKTOKEN_FILE)
    else:
        tokenizer = GPT2Tokenizer.from_dir(folder)
    found = {
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "fingerprint": tokenizer.fingerprint(),
    }
    for key, value in found.items():
        if config[key] != value:
            raise TokenizerError(
                f"{folder / CONFIG_NAME} says {key} = {config[key]!r} but its files give {value!r}; "
                "the saved tokenizer is corrupt: save or prepare it again"
            )
    return tokenizer


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise TokenizerError(f"no saved tokenizer in {folder}: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path} is not valid JSON ({err})") from err
    required = {"format_version": int, "name": str, "vocab_size": int, "eot_id": int, "fingerprint": str}
    for key, kind in {**required, "files": list}.items():
        if not isinstance(config, dict) or not isinstance(config.get(key), kind):
            raise TokenizerError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if config["format_version"] != FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: format_version {config['format_version']} is not supported (this version reads "
            f"{FORMAT_VERSION}); upgrade memory-mosaics or prepare the data again"
        )
    if config["name"] not in KINDS:
        raise TokenizerError(f"{path}: unknown tokenizer {config['name']!r} (known: {', '.join(KINDS)})")
    return config


def _listed_file(folder: Path, config: dict, name: str) -> Path:
    if name not in config["files"] or not (folder / name).is_file():
        raise TokenizerError(f"saved tokenizer in {folder} lacks {name}")
    return folder / name
