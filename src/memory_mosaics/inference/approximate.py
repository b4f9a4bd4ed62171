"""Approximate retrieval for long contexts: locality-sensitive hashing and positive random features.

Exact retrieval scores a query against every stored key: O(N d) per query. Two cheaper forms:

- **LSH** (`HyperplaneHash`, `LSHIndex`, `candidate_read`): keys are unit-norm (times a per-head
  scale), so the sign pattern of their projections on `bits` random hyperplanes is a hash that
  collides more often the smaller the angle between two keys (SimHash). Each of `tables` tables
  hashes with its own hyperplanes; a query scores only the stored keys that share its bucket in at
  least one table, with an exact softmax over those candidates. In generation the candidates come
  from `LSHIndex` (binary search in codes kept sorted) and only they are read and scored; the plain
  twin `lsh_candidates` compares the query's codes with every stored key's (used for prefill chunks,
  where one masked product over all keys is cheaper than gathering candidates per query).
  More tables raise recall; more bits make buckets smaller (faster, lower recall).

- **Random features** (`RandomFeatureMemory`): exp(<q, k>) = E_w[phi(q) phi(k)] for positive features
  phi(x) = exp(A |w|^2 + B <w, x> + C |x|^2), w ~ N(0, I) (Performer's FAVOR+ is A = 0, B = 1; the
  generalised form with the variance-minimising A < 0 is FAVOR++, Likhosherstov et al. 2022). Then
  sum_s exp(<q, k_s>) v_s  ~  sum_f phi_f(q) S_f  with  S_f = sum_s phi_f(k_s) v_s, so the memory is a
  fixed-size summary (num_features x d per head) updated in O(F d) per write and read in O(F d) per
  query, whatever the number of stored pairs. All keys and queries of a head have the same norm
  s_h, so the C |x|^2 and normalising constants cancel in the softmax ratio. Each feature keeps a
  running log-scale (like an online softmax) so that exp never overflows.

Shapes: queries/keys/values (B, H, n, d); codes (B, H, tables, n).
"""

from __future__ import annotations

import torch
from torch import Tensor


class HyperplaneHash:
    """SimHash codes: `tables` independent tables of `bits` random hyperplanes per head."""

    def __init__(self, n_head: int, head_dim: int, tables: int, bits: int, generator: torch.Generator):
        self.tables, self.bits = tables, bits
        # (H, d, tables * bits): one matrix product gives every sign of every table.
        self.planes = torch.randn(n_head, head_dim, tables * bits, generator=generator)
        self.powers = 2 ** torch.arange(bits, dtype=torch.int32)

    def to(self, device: torch.device, dtype: torch.dtype) -> HyperplaneHash:
        self.planes = self.planes.to(device=device, dtype=dtype)
        self.powers = self.powers.to(device)
        return self

    def codes(self, x: Tensor) -> Tensor:
        """(B, H, n, d) -> (B, H, tables, n) int32 bucket codes."""
        batch, heads, length, _ = x.shape
        signs = (x @ self.planes > 0).view(batch, heads, length, self.tables, self.bits)
        return (signs.to(torch.int32) * self.powers).sum(-1, dtype=torch.int32).transpose(-1, -2).contiguous()


def lsh_candidates(query_codes: Tensor, key_codes: Tensor) -> Tensor:
    """(B, H, n, N) bool: key s is a candidate for query i when they share a bucket in some table."""
    match = None
    for table in range(query_codes.shape[2]):
        same = query_codes[:, :, table, :, None] == key_codes[:, :, table, None, :]
        match = same if match is None else match.logical_or_(same)
    return match


def pack_candidates(candidates: Tensor) -> tuple[Tensor, Tensor]:
    """(..., N) bool -> the candidate columns packed to the left: index (..., K) and valid (..., K)."""
    *lead, stored = candidates.shape
    counts = candidates.sum(-1).reshape(-1)
    width = int(counts.max()) if counts.numel() else 0
    row, column = candidates.reshape(-1, stored).nonzero(as_tuple=True)
    rank = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[row]
    index = torch.zeros(counts.numel(), width, dtype=torch.long, device=candidates.device)
    valid = torch.zeros(counts.numel(), width, dtype=torch.bool, device=candidates.device)
    index[row, rank] = column
    valid[row, rank] = True
    return index.view(*lead, width), valid.view(*lead, width)


def candidate_read(
    queries: Tensor, keys: Tensor, values: Tensor, index: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact softmax over each query's candidates only: index/valid (B, H, n, K) name rows of keys/values
    (B, H, N, d). Returns reads (B, H, n, d) and weights (B, H, n, K), zero where not valid; a query
    without a valid candidate reads zero."""
    batch, heads, n, width = index.shape
    stored, dim = keys.shape[2], keys.shape[3]
    if width == 0:
        return queries.new_zeros(batch, heads, n, values.shape[-1]), queries.new_zeros(batch, heads, n, 0)
    # Rows of the flattened (B*H*N, d) tables: index_select copies whole rows, far faster than gather.
    rows = (torch.arange(batch * heads, device=index.device).view(batch, heads, 1, 1) * stored + index).flatten()
    cand_keys = keys.reshape(-1, dim).index_select(0, rows).view(batch, heads, n, width, dim)
    cand_values = values.reshape(-1, values.shape[-1]).index_select(0, rows).view(batch, heads, n, width, -1)
    scores = (cand_keys @ queries.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, float("-inf"))
    has_any = valid.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~has_any, 0.0), dim=-1) * valid
    return (weights.unsqueeze(-2) @ cand_values).squeeze(-2), weights


def gathered_read(queries: Tensor, keys: Tensor, values: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`candidate_read` for a (B, H, n, N) bool mask of candidates; also returns the packed index."""
    index, valid = pack_candidates(candidates)
    reads, weights = candidate_read(queries, keys, values, index, valid)
    return reads, index, weights


class LSHIndex:
    """A query's LSH candidates without scanning every stored key.

    Per (row, head, table) the index keeps the slots sorted by bucket code, so a binary search gives the
    query's bucket as a range, plus a tail of the slots written since the last sort, which is scanned.
    The tail is sorted in once it exceeds max(256, 4 sqrt(N)): a query costs O(tables * bucket + tail)
    and a write O(log N) amortised. A slot overwritten by eviction leaves a stale sorted entry until the
    next sort; entries are checked against the slot's current code, and duplicates are dropped, so the
    candidates are exactly those of the full scan (`lsh_candidates`).
    """

    def __init__(self):
        self.sorted_codes = self.sorted_slots = self.tail = None

    def wrote(self, slots: Tensor, codes: Tensor, filled: int) -> None:
        """Record writes to `slots` (B, H, c); codes (B, H, tables, capacity) already hold their codes."""
        self.tail = slots if self.tail is None else torch.cat([self.tail, slots], dim=-1)
        if self.tail.shape[-1] > max(256, 4 * int(filled**0.5)):
            self.rebuild(codes, filled)

    def rebuild(self, codes: Tensor, filled: int) -> None:
        self.sorted_codes, self.sorted_slots = codes[..., :filled].sort(dim=-1, stable=True)
        self.tail = None

    def buckets(self, query_codes: Tensor) -> tuple[Tensor, Tensor] | None:
        """Where each query's bucket starts in the sorted codes and how many entries it holds, both
        (B, H, tables, n); None before the first sort."""
        if self.sorted_codes is None:
            return None
        low = torch.searchsorted(self.sorted_codes, query_codes)
        return low, torch.searchsorted(self.sorted_codes, query_codes, right=True) - low

    def bucket_total(self, buckets: tuple[Tensor, Tensor] | None) -> int:
        """An upper bound on any (row, head)'s number of candidates, from the bucket sizes alone: the sum
        over tables of the sorted bucket sizes plus the tail (a key in several buckets counts each time)."""
        tail = 0 if self.tail is None else self.tail.shape[-1]
        return tail if buckets is None else int(buckets[1].sum(dim=(2, 3)).max()) + tail

    def candidates(
        self, query_codes: Tensor, codes: Tensor, buckets: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """query_codes (B, H, tables, n) -> slot index (B, H, n, K) and valid (B, H, n, K), no duplicates;
        `buckets` as returned by `buckets(query_codes)`, if the caller has them already.

        Trained keys cluster: one bucket of a table can hold a large share of the keys while the others
        are small, so the bucket ranges are read as one ragged list (no padding to the widest bucket)
        and marked in a per-query bit map over the slots, which also drops keys found in several tables.
        """
        batch, heads, tables, n = query_codes.shape
        capacity = codes.shape[-1]
        found = torch.zeros(batch * heads, n, capacity, dtype=torch.bool, device=query_codes.device)
        buckets = self.buckets(query_codes) if buckets is None else buckets
        if buckets is not None:
            low, counts = buckets[0].flatten(), buckets[1].flatten()  # (B*H*tables*n,)
            total = int(counts.sum())
            if total:
                # range r = ((b*H + h)*tables + t)*n + i covers sorted entries low[r] ... low[r]+counts[r]-1
                ranges = torch.repeat_interleave(torch.arange(counts.numel(), device=low.device), counts)
                within = torch.arange(total, device=low.device) - (counts.cumsum(0) - counts)[ranges]
                table_row, query = ranges // n, ranges % n  # table_row = (b*H + h)*tables + t
                sorted_length = self.sorted_slots.shape[-1]
                slots = self.sorted_slots.flatten()[table_row * sorted_length + low[ranges] + within]
                # A stale entry: the slot was overwritten since the sort by a pair in another bucket.
                current = codes.reshape(-1, capacity)[table_row, slots]
                fresh = current == query_codes.flatten()[ranges]
                head_row = table_row // tables
                found[head_row[fresh], query[fresh], slots[fresh]] = True
        if self.tail is not None:
            tail_codes = codes.gather(-1, self.tail.unsqueeze(2).expand(-1, -1, tables, -1))  # (B, H, tables, R)
            hit = (tail_codes.unsqueeze(-2) == query_codes.unsqueeze(-1)).any(dim=2)  # (B, H, n, R)
            tail = self.tail.unsqueeze(2).expand(-1, -1, n, -1).reshape(batch * heads, n, -1)
            found |= torch.zeros_like(found).scatter_(-1, tail, hit.reshape(batch * heads, n, -1))
        index, valid = pack_candidates(found.view(batch, heads, n, capacity))
        return index, valid


def top_key_recall(scores: Tensor, candidates: Tensor, k: int, admissible: Tensor | None = None) -> float:
    """Fraction of each query's exact top-k keys (by score) that are among its candidates.

    scores and candidates (..., n, N); rows with fewer than k admissible keys use all they have.
    """
    if admissible is not None:
        scores = scores.masked_fill(~admissible, float("-inf"))
    k = min(k, scores.shape[-1])
    top_scores, top = scores.topk(k, dim=-1)
    real = torch.isfinite(top_scores)
    hit = candidates.gather(-1, top) & real
    return float(hit.sum()) / max(1, int(real.sum()))


def orthogonal_gaussian(n_head: int, num_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """(H, F, d) rows distributed as N(0, I) marginally, orthogonal within blocks of d (lower variance)."""
    blocks = []
    for _ in range(-(-num_features // dim)):
        q, _ = torch.linalg.qr(torch.randn(n_head, dim, dim, generator=generator))
        norms = torch.randn(n_head, dim, dim, generator=generator).norm(dim=-1, keepdim=True)
        blocks.append(q.transpose(-1, -2) * norms)  # rows of q^T are orthonormal; chi(d) lengths
    return torch.cat(blocks, dim=1)[:, :num_features]


def favor_plus_plus_a(dim: int, pair_sq_norm: Tensor) -> Tensor:
    """The A < 0 of phi that minimises the estimator's variance for pairs with |q + k|^2 = pair_sq_norm.

    With u = 1 - 8A, log(relative variance) = (d/2)(2 log((1+u)/2) - log u) + |q+k|^2 / u, whose
    minimum solves (d/2) u^2 - (d/2 + |q+k|^2) u - |q+k|^2 = 0. |q+k|^2 = 0 gives A = 0 (FAVOR+).
    """
    half = dim / 2
    b = half + pair_sq_norm
    u = (b + torch.sqrt(b * b + 4 * half * pair_sq_norm)) / (2 * half)
    return (1 - u) / 8


class RandomFeatureMemory:
    """Context pairs summarised by positive random features; reads cost O(F d) whatever was stored."""

    def __init__(self, key_scale: Tensor, head_dim: int, num_features: int, generator: torch.Generator):
        n_head = key_scale.shape[0]
        self.head_dim = head_dim
        self.weights = orthogonal_gaussian(n_head, num_features, head_dim, generator)  # (H, F, d)
        # Tune A for pairs at 90 degrees (|q + k|^2 = 2 s^2): the bulk of the pairs in d dimensions.
        a = favor_plus_plus_a(head_dim, 2 * key_scale.detach().double().cpu() ** 2)
        b = torch.sqrt(1 - 4 * a)
        self.offset = (a[:, None] * self.weights.double().pow(2).sum(-1)).float()  # A |w_f|^2, (H, F)
        self.weights = self.weights * b.float()[:, None, None]  # fold B into w
        self.sums = self.norms = self.log_shift = None
        self.count = 0

    def _features(self, x: Tensor) -> Tensor:
        """log phi up to a constant: (B, H, n, d) -> (B, H, n, F)."""
        return x @ self.weights.transpose(-1, -2).to(x) + self.offset.to(x)[:, None]

    def _allocate(self, like: Tensor) -> None:
        batch, heads, _, dim = like.shape
        features = self.weights.shape[1]
        self.sums = like.new_zeros(batch, heads, features, dim)
        self.norms = like.new_zeros(batch, heads, features)
        self.log_shift = like.new_full((batch, heads, features), float("-inf"))

    def write(self, key_features: Tensor, value: Tensor) -> None:
        """Add one pair per (row, head): key_features (B, H, F), value (B, H, d)."""
        shift = torch.maximum(self.log_shift, key_features)
        decay = torch.exp(self.log_shift - shift)
        weight = torch.exp(key_features - shift)
        self.sums = self.sums * decay.unsqueeze(-1) + weight.unsqueeze(-1) * value.unsqueeze(-2)
        self.norms = self.norms * decay + weight
        self.log_shift = shift
        self.count += 1

    def read(self, query_features: Tensor) -> Tensor:
        """(B, H, F) -> (B, H, d): sum_f phi_f(q) S_f / sum_f phi_f(q) z_f."""
        if self.count == 0:
            return query_features.new_zeros(*query_features.shape[:2], self.head_dim)
        logits = query_features + self.log_shift
        scale = torch.exp(logits - logits.amax(-1, keepdim=True))
        numerator = (scale.unsqueeze(-2) @ self.sums).squeeze(-2)
        return numerator / (scale * self.norms).sum(-1, keepdim=True)

    def extend_and_read(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Queries (B, H, n, d); the c <= n new pairs belong to the last c queries (written just before)."""
        if self.sums is None:
            self._allocate(queries)
        n, c = queries.shape[2], keys.shape[2]
        query_features, key_features = self._features(queries), self._features(keys)
        reads = []
        for i in range(n):
            j = i - (n - c)
            if j >= 0:
                self.write(key_features[:, :, j], values[:, :, j])
            reads.append(self.read(query_features[:, :, i]))
        return torch.stack(reads, dim=2)

    def lookup(self, queries: Tensor) -> Tensor:
        """Read for queries (B, H, n, d) without changing the memory (inspection, timing)."""
        features = self._features(queries)
        return torch.stack([self.read(features[:, :, i]) for i in range(queries.shape[2])], dim=2)

    def implied_weights(self, queries: Tensor, keys: Tensor) -> Tensor:
        """The retrieval weights this estimator implies, (B, H, n, N): for analysis (O(n N F))."""
        pair = self._features(queries).unsqueeze(-2) + self._features(keys).unsqueeze(-3)
        return torch.softmax(torch.logsumexp(pair, dim=-1), dim=-1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sums, self.norms, self.log_shift) if t is not None)


def seeded_generator(seed: int, layer: int) -> torch.Generator:
    """A CPU generator for layer `layer`: every layer draws its own hyperplanes or features."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)
