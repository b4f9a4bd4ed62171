"""Token shards: a flat array of token ids behind a small fixed header, read by memory-mapping.

Layout (little-endian), HEADER_SIZE = 128 bytes, then `count` tokens of the given dtype:

    offset  size  field
         0     8  magic b"MMTOKENS"
         8     4  format version (uint32, currently 1)
        12     4  dtype code (uint32): 2 = uint16, 4 = uint32 (the item size in bytes)
        16     8  token count (uint64)
        24    64  tokenizer fingerprint, ASCII, NUL-padded
        88    40  zeros (reserved; keeps the tokens 128-byte aligned)

Tokens are uint16 when every id fits (vocabulary of at most 65,536), else uint32. A shard is
written under a temporary name and renamed into place, so a crash never leaves a half-written file
with the final name. `read_shard` checks the header and the file size before mapping anything.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from memory_mosaics.data.errors import ShardError

__all__ = [
    "HEADER_SIZE",
    "ShardError",
    "ShardWriter",
    "dtype_for_vocab",
    "read_shard",
    "read_shard_header",
    "write_shard",
]

MAGIC = b"MMTOKENS"
FORMAT_VERSION = 1
HEADER_SIZE = 128
_HEADER = struct.Struct("<8sIIQ64s")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds ids 0..vocab_size-1."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def _pack_header(dtype: np.dtype, count: int, fingerprint: str) -> bytes:
    encoded = fingerprint.encode("ascii")
    if len(encoded) > 64:
        raise ValueError(f"tokenizer fingerprint {fingerprint!r} is longer than 64 characters")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count, encoded)
    return header.ljust(HEADER_SIZE, b"\0")


class ShardWriter:
    """Stream token arrays into one shard: `with ShardWriter(path, fp, dtype) as w: w.write(ids)`.

    The header's token count is patched in on close; the file appears under `path` only then.
    """

    def __init__(self, path: str | os.PathLike[str], tokenizer_fingerprint: str, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"shard dtype must be uint16 or uint32, not {self.dtype}")
        self.fingerprint = tokenizer_fingerprint
        self.count = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._file.write(_pack_header(self.dtype, 0, tokenizer_fingerprint))

    def write(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids must lie in 0..{np.iinfo(self.dtype).max} for a {self.dtype} shard")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += tokens.size

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_pack_header(self.dtype, self.count, self.fingerprint))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(
    path: str | os.PathLike[str], tokens, tokenizer_fingerprint: str, vocab_size: int | None = None
) -> None:
    """Write `tokens` (ints) as one shard: uint16 when `vocab_size` (default: max id + 1) allows."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    if vocab_size is None:
        vocab_size = int(tokens.max()) + 1 if tokens.size else 1
    with ShardWriter(path, tokenizer_fingerprint, dtype_for_vocab(vocab_size)) as writer:
        writer.write(tokens)


def read_shard_header(path: str | os.PathLike[str]) -> dict:
    """Parse and check a shard's header and size; return {version, dtype, count, fingerprint}."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"token shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise ShardError(f"token shard {path} is truncated: {size} bytes, shorter than its {HEADER_SIZE}-byte header")
    magic, version, code, count, raw_fp = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a mosaic token shard (bad magic bytes {magic!r}); prepare the data again")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"token shard {path} has format version {version}; this version reads {FORMAT_VERSION}: "
            "upgrade memory-mosaics or prepare the data again"
        )
    if code not in _DTYPES:
        raise ShardError(f"token shard {path} has unknown dtype code {code} (expected 2 or 4): the file is corrupt")
    expected = HEADER_SIZE + count * code
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(
            f"token shard {path} is {what}: {size} bytes, but its header promises {count} tokens "
            f"({expected} bytes); prepare the data again"
        )
    try:
        fingerprint = raw_fp.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError as err:
        raise ShardError(f"token shard {path} has a corrupt tokenizer fingerprint") from err
    return {"version": version, "dtype": _DTYPES[code], "count": count, "fingerprint": fingerprint}


def read_shard(path: str | os.PathLike[str], expected_fingerprint: str | None = None) -> np.ndarray:
    """Memory-map a shard's tokens (read-only), after checking its header, size and tokenizer."""
    header = read_shard_header(path)
    if expected_fingerprint is not None and header["fingerprint"] != expected_fingerprint:
        raise ShardError(
            f"token shard {path} was written with tokenizer {header['fingerprint']!r}, not the expected "
            f"{expected_fingerprint!r}: tokens from one vocabulary cannot be read with another"
        )
    if header["count"] == 0:  # numpy cannot map an empty range
        return np.empty(0, dtype=header["dtype"])
    return np.memmap(path, dtype=header["dtype"], mode="r", offset=HEADER_SIZE, shape=(header["count"],))
