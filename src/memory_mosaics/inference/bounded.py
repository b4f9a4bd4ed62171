"""A context memory's stored pairs during inference: unbounded, or bounded with an eviction policy.

`SlotMemory` keeps the pairs (k_s, v_s) of one context memory in slots, per batch row and head. It
serves a chunk of queries with `extend_and_read`: the pair that completes at step t (the pair of
position t - m, whose look-ahead value needed x_t) is written just before the query of step t reads,
so the query reads exactly the pairs s <= t - m, as in the full forward pass.

Unbounded, the slots grow (capacity doubling) and a whole chunk is read at once by the fused attention
kernel. Bounded to M slots, a chunk that fits in the free slots is handled the same way (so a memory
that has not evicted anything gives bit for bit the unbounded result); once the memory is full every
write overwrites the slot its `EvictionPolicy` picks and the chunk is served step by step, except
that a positional policy serves a long chunk at once through its window. Either way the result does
not depend on how the sequence was split into chunks.

Eviction policies (one small interface: `victim(position, last_used)`; `tracks_use` and `used(weights)`
for LRU; `positional` and `window(pair, limit, capacity)` for FIFO and SinkRecent):
- `FIFO`: overwrite the oldest pair (a sliding window over the last M pairs).
- `SinkRecent`: never overwrite the first `sink` pairs of the sequence; otherwise the oldest.
- `LRU`: overwrite the pair least recently *used*. A query uses an entry when the entry's retrieval
  weight is >= `threshold` (default 0.01); writing an entry counts as a use, so a new entry is not
  the first to go. Why a weight threshold: the read is a weighted average, and removing an entry of
  weight w moves that read by w / (1 - w) * |v_s - read|, so an entry that no recent query weighted
  above the threshold is one whose eviction would have changed those reads by at most that much.
  Ties (equal last use) go to the older pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memory_mosaics.inference.approximate import HyperplaneHash, LSHIndex, candidate_read, lsh_candidates

# Largest score matrix (elements) built at once when a long chunk is read against many pairs.
READ_BUDGET = 1 << 24
NEVER = -1  # last_used of an empty slot
# LSH generation walks a query's buckets and gathers its candidates only when the buckets hold at most
# 1/GATHER_LIMIT of the stored keys (counted with repeats across tables); beyond that, scanning every
# stored code and one masked product is cheaper (measured on CPU, trained keys at 32k: the two cost the
# same near half).
GATHER_LIMIT = 2


class EvictionPolicy:
    """Picks the slot a full memory overwrites. Subclasses define `victim`; LRU also tracks use.

    A positional policy (FIFO, SinkRecent) also says, through `window`, which pairs a full memory holds
    when a query reads: then a long chunk can be served at once instead of step by step.
    """

    name = ""
    tracks_use = False
    positional = False

    def window(self, pair: Tensor, limit: Tensor, capacity: int) -> Tensor:
        """Positional policies: is pair `pair` held when the newest pair written is `limit`?"""
        raise NotImplementedError

    def used(self, weights: Tensor) -> Tensor:
        """Which entries the reads with these retrieval weights used (only when `tracks_use`)."""
        raise NotImplementedError

    def victim(self, position: Tensor, last_used: Tensor | None) -> Tensor:
        """(B, H) slot index to overwrite, from the pair positions (B, H, M) and last uses (B, H, M)."""
        raise NotImplementedError


class FIFO(EvictionPolicy):
    name = "fifo"
    positional = True

    def window(self, pair: Tensor, limit: Tensor, capacity: int) -> Tensor:
        return (pair <= limit) & (pair > limit - capacity)

    def victim(self, position: Tensor, last_used: Tensor | None) -> Tensor:
        return position.argmin(dim=-1)


class SinkRecent(EvictionPolicy):
    name = "sink+recent"
    positional = True

    def __init__(self, sink: int):
        self.sink = sink

    def window(self, pair: Tensor, limit: Tensor, capacity: int) -> Tensor:
        return (pair <= limit) & ((pair < self.sink) | (pair > limit - (capacity - self.sink)))

    def victim(self, position: Tensor, last_used: Tensor | None) -> Tensor:
        protected = position < self.sink
        return position.masked_fill(protected, torch.iinfo(position.dtype).max).argmin(dim=-1)


class LRU(EvictionPolicy):
    name = "lru"
    tracks_use = True

    def __init__(self, threshold: float):
        self.threshold = threshold

    def used(self, weights: Tensor) -> Tensor:
        return weights >= self.threshold

    def victim(self, position: Tensor, last_used: Tensor | None) -> Tensor:
        # Least recent use first; among equals, the older pair (positions stay far below 2**31).
        return (last_used * (1 << 31) + position).argmin(dim=-1)


def make_policy(name: str, sink_size: int | None = None, lru_threshold: float | None = None) -> EvictionPolicy:
    if name == "fifo":
        return FIFO()
    if name == "sink+recent":
        return SinkRecent(sink_size)
    return LRU(lru_threshold)


def dense_read(queries: Tensor, keys: Tensor, values: Tensor, admissible: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax over every admissible stored key (scale 1). A query with none reads exactly zero.

    queries (B, H, n, d), keys/values (B, H, N, d), admissible bool broadcastable to (B, H, n, N), or
    None (all).
    Returns reads (B, H, n, d) and weights (B, H, n, N).
    """
    scores = queries @ keys.transpose(-1, -2)
    if admissible is None:
        weights = torch.softmax(scores, dim=-1)
        return weights @ values, weights
    has_any = admissible.any(-1, keepdim=True)
    scores = scores.masked_fill(~admissible, float("-inf")).masked_fill(~has_any, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_any
    return weights @ values, weights


def fused_read(queries: Tensor, keys: Tensor, values: Tensor, admissible: Tensor) -> Tensor:
    """`dense_read`'s reads through the fused attention kernel (several times faster on long chunks)."""
    has_any = admissible.any(-1, keepdim=True)
    # A row with no admissible key would be NaN; let it see everything, then zero it.
    reads = F.scaled_dot_product_attention(queries, keys, values, attn_mask=admissible | ~has_any, scale=1.0)
    return reads.masked_fill(~has_any, 0.0)


class SlotMemory:
    """The stored pairs of one context memory: exact or LSH retrieval, unbounded or bounded."""

    def __init__(self, capacity: int | None, policy: EvictionPolicy | None, shift: int, hasher: HyperplaneHash | None):
        self.capacity = capacity
        self.policy = policy
        self.shift = shift
        self.hasher = hasher
        self.index = LSHIndex() if hasher is not None else None
        self.filled = 0
        self.keys = self.values = self.position = self.last_used = self.codes = None

    # -- storage -------------------------------------------------------------------------------

    def _ensure_room(self, like: Tensor, needed: int) -> None:
        allocated = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is not None and needed <= allocated:
            return
        size = self.capacity if self.capacity is not None else max(needed, 2 * allocated, 64)
        batch, heads, _, dim = like.shape

        keys = like.new_zeros(batch, heads, size, dim)
        values = like.new_zeros(batch, heads, size, dim)
        position = torch.full((batch, heads, size), NEVER, dtype=torch.long, device=like.device)
        if self.keys is not None:
            keys[:, :, :allocated] = self.keys
            values[:, :, :allocated] = self.values
            position[:, :, :allocated] = self.position
        self.keys, self.values, self.position = keys, values, position
        if self.policy is not None and self.policy.tracks_use:
            last_used = torch.full_like(position, NEVER)
            if self.last_used is not None:
                last_used[:, :, :allocated] = self.last_used
            self.last_used = last_used
        if self.hasher is not None:
            codes = torch.zeros(batch, heads, self.hasher.tables, size, dtype=torch.int32, device=like.device)
            if self.codes is not None:
                codes[..., :allocated] = self.codes
            self.codes = codes

    def _append(self, keys: Tensor, values: Tensor, first_pair: int) -> None:
        """Write c pairs (positions first_pair ...) into the next free slots."""
        c = keys.shape[2]
        self._ensure_room(keys, self.filled + c)
        slots = slice(self.filled, self.filled + c)
        self.keys[:, :, slots] = keys
        self.values[:, :, slots] = values
        pairs = torch.arange(first_pair, first_pair + c, device=keys.device)
        self.position[:, :, slots] = pairs
        if self.last_used is not None:
            self.last_used[:, :, slots] = pairs + self.shift  # written at the step of its first reader
        self.filled += c
        if self.codes is not None:
            self.codes[..., slots] = self.hasher.codes(keys)
            written = torch.arange(slots.start, slots.stop, device=keys.device).expand(*keys.shape[:2], c)
            self.index.wrote(written, self.codes, self.filled)

    def _overwrite(self, key: Tensor, value: Tensor, pair: int) -> None:
        """Write one pair (B, H, 1, d) over the slot the policy picks in each (row, head)."""
        slot = self.policy.victim(self.position, self.last_used)[:, :, None]  # (B, H, 1)
        self.keys.scatter_(2, slot[..., None].expand_as(key), key)
        self.values.scatter_(2, slot[..., None].expand_as(value), value)
        self.position.scatter_(2, slot, pair)
        if self.last_used is not None:
            self.last_used.scatter_(2, slot, pair + self.shift)
        if self.codes is not None:
            codes = self.hasher.codes(key)  # (B, H, tables, 1)
            self.codes.scatter_(3, slot[:, :, None].expand_as(codes), codes)
            self.index.wrote(slot, self.codes, self.filled)

    # -- reading -------------------------------------------------------------------------------

    def _read(self, queries: Tensor, times: Tensor, admissible: Tensor | None, pairs: tuple | None = None) -> Tensor:
        """Read the first `filled` slots (or the given (keys, values, codes)) for queries at steps
        `times` (n,); with LRU, mark the entries the reads used."""
        stored = self.filled
        keys, values = self.keys[:, :, :stored], self.values[:, :, :stored]
        codes = None if self.codes is None else self.codes[..., :stored]
        if pairs is not None:
            keys, values, codes = pairs
        tracking = self.last_used is not None
        mask = admissible
        if self.hasher is not None and pairs is None and queries.shape[2] == 1:
            # Generation with LSH: the query's buckets from the sorted index; only those keys are scored.
            query_codes = self.hasher.codes(queries)
            buckets = self.index.buckets(query_codes)
            if self.index.bucket_total(buckets) * GATHER_LIMIT <= stored:
                index, valid = self.index.candidates(query_codes, self.codes, buckets)
                reads, weights = candidate_read(queries, self.keys, self.values, index, valid)
                if tracking:
                    self._mark_used(weights, times, index)
                return reads
            # Big buckets (trained keys repeat: every earlier occurrence of a frequent token shares its
            # bucket): walking them and copying the keys costs more than scanning every stored code and
            # one plain masked product, which costs about an exact read (the fused kernel with a mask
            # costs 2-3x that for one query; measured on CPU at 32k keys).
            mask = lsh_candidates(query_codes, codes)
            reads, weights = dense_read(queries, keys, values, mask)
            if tracking:
                self._mark_used(weights, times, None)
            return reads
        elif self.hasher is not None:
            # A chunk (prefill): comparing the queries' codes with every stored key's, then one fused
            # masked product, is cheaper than gathering each query's candidates (measured: 2-4x), and
            # costs a small multiple of exact prefill.
            mask = lsh_candidates(self.hasher.codes(queries), codes) & admissible
        if mask is None:  # one step, every stored pair admissible
            reads, weights = dense_read(queries, keys, values, None)
        else:
            reads = fused_read(queries, keys, values, mask)
            # LRU needs the weights; the output still comes from the fused kernel, so a bounded memory that
            # has not evicted anything gives bit for bit the unbounded memory's result.
            weights = dense_read(queries, keys, values, mask)[1] if tracking else None
        if tracking:
            self._mark_used(weights, times, None)
        return reads

    def _mark_used(self, weights: Tensor, times: Tensor, index: Tensor | None) -> None:
        """LRU bookkeeping: the last step at which each slot was used (weights (B, H, n, N or K))."""
        stored = self.filled
        if weights.numel() == 0:
            return
        when = torch.where(self.policy.used(weights), times[:, None], NEVER)
        if index is None:
            latest = when.amax(dim=-2)
        else:
            latest = torch.full_like(self.last_used[:, :, :stored], NEVER)
            latest = latest.scatter_reduce(2, index.flatten(2), when.flatten(2), reduce="amax")
        self.last_used[:, :, :stored] = torch.maximum(self.last_used[:, :, :stored], latest)

    def extend_and_read(self, queries: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """Queries (B, H, n, d) at steps start..start+n-1; the c <= n new pairs (B, H, c, d) are the pairs
        of positions start+n-c-m ..., each written just before the query that may first read it."""
        n, c = queries.shape[2], keys.shape[2]
        times = torch.arange(start, start + n, device=queries.device)
        if self.capacity is None or self.filled + c <= self.capacity:
            self._append(keys, values, start + n - c - self.shift)
            return self._read_chunk(queries, times)
        if self.policy.positional and n > 1:
            return self._read_window(queries, keys, values, times)
        reads = []
        for i in range(n):
            j = i - (n - c)
            if j >= 0:
                pair = start + i - self.shift
                if self.filled < self.capacity:
                    self._append(keys[:, :, j : j + 1], values[:, :, j : j + 1], pair)
                else:
                    self._overwrite(keys[:, :, j : j + 1], values[:, :, j : j + 1], pair)
            if self.filled == 0:
                reads.append(torch.zeros_like(queries[:, :, i : i + 1]))
            else:
                reads.append(self._read(queries[:, :, i : i + 1], times[i : i + 1], None))
        return torch.cat(reads, dim=2)

    def _read_chunk(self, queries: Tensor, times: Tensor) -> Tensor:
        """Read a chunk after its pairs were appended; no eviction has happened, so slot order is
        position order in every row, and query t may read the slots whose pair is <= t - m."""
        batch, heads, n, _ = queries.shape
        if self.filled == 0:
            return torch.zeros_like(queries)
        positions = self.position[0, 0, : self.filled]
        group = max(1, READ_BUDGET // (batch * heads * self.filled))
        reads = []
        for lo in range(0, n, group):
            hi = min(n, lo + group)
            admissible = positions[None, :] <= (times[lo:hi] - self.shift)[:, None]
            reads.append(self._read(queries[:, :, lo:hi], times[lo:hi], admissible))
        return torch.cat(reads, dim=2)

    def _read_window(self, queries: Tensor, keys: Tensor, values: Tensor, times: Tensor) -> Tensor:
        """A chunk that overflows a memory with a positional policy: every query reads the stored and new
        pairs its window holds, then the memory keeps the window of the last query."""
        self._ensure_room(keys, self.capacity)
        batch, heads, n, _ = queries.shape
        last = int(times[-1]) - self.shift
        new_pairs = torch.arange(last - keys.shape[2] + 1, last + 1, device=keys.device)
        stored = self.filled
        pairs = torch.cat([self.position[0, 0, :stored], new_pairs])  # same in every row: positional
        all_keys = torch.cat([self.keys[:, :, :stored], keys], dim=2)
        all_values = torch.cat([self.values[:, :, :stored], values], dim=2)
        all_codes = None
        if self.hasher is not None:
            all_codes = torch.cat([self.codes[..., :stored], self.hasher.codes(keys)], dim=-1)
        stored_and_new = (all_keys, all_values, all_codes)
        group = max(1, READ_BUDGET // (batch * heads * pairs.numel()))
        reads = []
        for lo in range(0, n, group):
            limits = (times[lo : lo + group] - self.shift)[:, None]
            admissible = self.policy.window(pairs[None, :], limits, self.capacity)
            reads.append(self._read(queries[:, :, lo : lo + group], times[lo : lo + group], admissible, stored_and_new))
        keep = self.policy.window(pairs, torch.tensor(last), self.capacity).nonzero().squeeze(-1)
        self.keys[:, :, : keep.numel()] = all_keys[:, :, keep]
        self.values[:, :, : keep.numel()] = all_values[:, :, keep]
        self.position[:, :, : keep.numel()] = pairs[keep]
        self.filled = keep.numel()
        if self.codes is not None:
            self.codes[..., : keep.numel()] = all_codes[..., keep]
            self.index.rebuild(self.codes, self.filled)
        return torch.cat(reads, dim=2)

    def lookup(self, queries: Tensor) -> Tensor:
        """Read everything stored for queries (B, H, n, d) without changing the memory (inspection, timing)."""
        if self.filled == 0:
            return torch.zeros_like(queries)
        last_used, self.last_used = self.last_used, None
        try:
            return self._read(queries, torch.zeros(queries.shape[2], dtype=torch.long), None)
        finally:
            self.last_used = last_used

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.position, self.last_used, self.codes)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
