"""Data: tokenizers, corpora, token shards and prepared data sets (see docs/data.md)."""

from memory_mosaics.data.corpora import Corpus, open_corpus
from memory_mosaics.data.errors import CorpusError, DataError, ShardError, TokenizerError
from memory_mosaics.data.prepare import PreparedData, encode_documents, prepare_dataset
from memory_mosaics.data.shards import read_shard, write_shard
from memory_mosaics.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer

__all__ = [
    "Corpus",
    "CorpusError",
    "DataError",
    "PreparedData",
    "ShardError",
    "Tokenizer",
    "TokenizerError",
    "encode_documents",
    "load_tokenizer",
    "make_tokenizer",
    "open_corpus",
    "prepare_dataset",
    "read_shard",
    "write_shard",
]
