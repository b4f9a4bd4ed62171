"""Errors raised by the data pipeline; all are `MosaicError`s, so the CLI prints one line and exits 2."""

from memory_mosaics.errors import MosaicError


class DataError(MosaicError):
    """A corpus, tokenizer or prepared data set is missing, malformed or inconsistent."""


class TokenizerError(DataError):
    """An unknown tokenizer, an out-of-range vocabulary size, or a saved tokenizer that is broken."""


class CorpusError(DataError):
    """A corpus source is missing, empty, not text, or cannot be fetched."""


class ShardError(DataError):
    """A token shard or a prepared-data manifest is corrupt, truncated or does not match its tokenizer."""
