"""Inference options of a Memory Mosaic's recurrent state: how the context memories store and retrieve.

    memory_size     None (unbounded: every pair of the sequence is kept) or the capacity M of each
                    context memory (per layer, per head, per batch row)
    eviction        which entry a full memory overwrites: "lru", "fifo" or "sink+recent"
    sink_size       "sink+recent": the first pairs of the sequence that are never evicted
    lru_threshold   "lru": a query uses an entry when the entry's retrieval weight is >= this
    retrieval       "exact" (softmax over all stored keys), "lsh" (softmax over the keys that share a
                    hash bucket with the query in at least one table) or "features" (positive random
                    features: a fixed-size summary, no per-key scoring)
    lsh_tables, lsh_bits   "lsh": number of hash tables and random hyperplanes per table
    num_features    "features": number of random features per head
    seed            random hyperplanes and features are drawn from this seed (per layer, reproducible)

Options that belong to another choice (lsh_bits with exact retrieval, sink_size with lru, ...) are
refused rather than ignored: a silently ignored option would make a comparison wrong.
"""

from __future__ import annotations

import dataclasses

from memory_mosaics.errors import ConfigError

EVICTION_POLICIES = ("lru", "fifo", "sink+recent")
RETRIEVAL_METHODS = ("exact", "lsh", "features")

DEFAULT_LRU_THRESHOLD = 0.01
DEFAULT_SINK_SIZE = 4
DEFAULT_LSH_TABLES = 8
DEFAULT_LSH_BITS = 8
DEFAULT_NUM_FEATURES = 256
MAX_LSH_BITS = 30  # codes are int32


@dataclasses.dataclass
class InferenceOptions:
    memory_size: int | None = None
    eviction: str | None = None
    sink_size: int | None = None
    lru_threshold: float | None = None
    retrieval: str = "exact"
    lsh_tables: int | None = None
    lsh_bits: int | None = None
    num_features: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_memory()
        self._check_retrieval()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"init_state: seed must be an int, got {self.seed!r}")

    def _check_memory(self) -> None:
        if self.memory_size is None:
            for name in ("eviction", "sink_size", "lru_threshold"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"init_state: {name} needs memory_size (an unbounded memory evicts nothing)")
            return
        _check_int("memory_size", self.memory_size, 1)
        if self.eviction is None:
            self.eviction = "lru"
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(
                f"init_state: eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}"
            )
        if self.eviction == "sink+recent":
            self.sink_size = DEFAULT_SINK_SIZE if self.sink_size is None else self.sink_size
            _check_int("sink_size", self.sink_size, 0)
            if self.sink_size >= self.memory_size:
                raise ConfigError(
                    f"init_state: sink_size ({self.sink_size}) must be smaller than memory_size "
                    f"({self.memory_size}) to leave room for the recent window"
                )
        elif self.sink_size is not None:
            raise ConfigError(f"init_state: sink_size applies to eviction='sink+recent', not {self.eviction!r}")
        if self.eviction == "lru":
            self.lru_threshold = DEFAULT_LRU_THRESHOLD if self.lru_threshold is None else self.lru_threshold
            if isinstance(self.lru_threshold, bool) or not isinstance(self.lru_threshold, (int, float)):
                raise ConfigError(f"init_state: lru_threshold must be a number, got {self.lru_threshold!r}")
            if not 0.0 < self.lru_threshold <= 1.0:
                raise ConfigError(f"init_state: lru_threshold must be in (0, 1], got {self.lru_threshold}")
        elif self.lru_threshold is not None:
            raise ConfigError(f"init_state: lru_threshold applies to eviction='lru', not {self.eviction!r}")

    def _check_retrieval(self) -> None:
        if self.retrieval not in RETRIEVAL_METHODS:
            raise ConfigError(
                f"init_state: retrieval must be one of {', '.join(RETRIEVAL_METHODS)}, got {self.retrieval!r}"
            )
        owners = {"lsh_tables": "lsh", "lsh_bits": "lsh", "num_features": "features"}
        for name, owner in owners.items():
            if getattr(self, name) is not None and self.retrieval != owner:
                raise ConfigError(f"init_state: {name} applies to retrieval={owner!r}, not {self.retrieval!r}")
        if self.retrieval == "lsh":
            self.lsh_tables = DEFAULT_LSH_TABLES if self.lsh_tables is None else self.lsh_tables
            self.lsh_bits = DEFAULT_LSH_BITS if self.lsh_bits is None else self.lsh_bits
            _check_int("lsh_tables", self.lsh_tables, 1)
            _check_int("lsh_bits", self.lsh_bits, 1, MAX_LSH_BITS)
        if self.retrieval == "features":
            self.num_features = DEFAULT_NUM_FEATURES if self.num_features is None else self.num_features
            _check_int("num_features", self.num_features, 1)
            if self.memory_size is not None:
                raise ConfigError(
                    "init_state: retrieval='features' keeps a fixed-size summary and no per-key entries, so "
                    "memory_size/eviction do not apply; drop memory_size or use retrieval='exact' or 'lsh'"
                )


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"init_state: {name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"init_state: {name} must be {allowed}, got {value}")
