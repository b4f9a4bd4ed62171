"""Approximate retrieval: LSH and positive random features approach exact retrieval as the budget grows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from inference_helpers import VOCAB, run_chunks, tiny_mosaic

from memory_mosaics.inference.approximate import (
    HyperplaneHash,
    RandomFeatureMemory,
    favor_plus_plus_a,
    gathered_read,
    lsh_candidates,
    top_key_recall,
)
from memory_mosaics.inference.bounded import dense_read

HEADS, DIM, STORED, QUERIES = 2, 16, 400, 40


def retrieval_problem(scale: float, seed: int = 0):
    """Unit keys times `scale` (as the model's keys), queries that are noisy copies of stored keys."""
    generator = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(1, HEADS, STORED, DIM, generator=generator), dim=-1) * scale
    values = torch.randn(1, HEADS, STORED, DIM, generator=generator)
    noise = 0.3 * torch.randn(1, HEADS, QUERIES, DIM, generator=generator) / DIM**0.5
    queries = F.normalize(keys[:, :, :QUERIES] / scale + noise, dim=-1) * scale
    return queries, keys, values


def total_variation(weights: torch.Tensor, exact: torch.Tensor) -> float:
    return float(0.5 * (weights - exact).abs().sum(-1).mean())


def lsh_quality(tables: int, bits: int, scale: float = 2.7) -> tuple[float, float, float]:
    """(recall of the exact top-10 keys, total variation to the exact weights, fraction scored)."""
    queries, keys, values = retrieval_problem(scale)
    hasher = HyperplaneHash(HEADS, DIM, tables, bits, torch.Generator().manual_seed(1))
    candidates = lsh_candidates(hasher.codes(queries), hasher.codes(keys))
    _, index, weights = gathered_read(queries, keys, values, candidates)
    dense = torch.zeros(1, HEADS, QUERIES, STORED).scatter_add(-1, index, weights)
    _, exact = dense_read(queries, keys, values, None)
    recall = top_key_recall(queries @ keys.transpose(-1, -2), candidates, k=10)
    return recall, total_variation(dense, exact), float(candidates.float().mean())


def test_lsh_codes_and_candidates_follow_the_definition():
    queries, keys, _ = retrieval_problem(2.7)
    hasher = HyperplaneHash(HEADS, DIM, tables=3, bits=5, generator=torch.Generator().manual_seed(0))
    codes = hasher.codes(keys)
    assert codes.shape == (1, HEADS, 3, STORED) and int(codes.max()) < 2**5
    signs = (keys @ hasher.planes > 0).view(1, HEADS, STORED, 3, 5)
    assert torch.equal(codes[0, 1, 2, 7], (signs[0, 1, 7, 2].int() * 2 ** torch.arange(5)).sum().int())
    candidates = lsh_candidates(hasher.codes(queries), codes)
    brute = (hasher.codes(queries)[..., :, None] == codes[..., None, :]).any(dim=2)
    assert torch.equal(candidates, brute)
    assert candidates[:, :, torch.arange(QUERIES), torch.arange(QUERIES)].float().mean() > 0.8  # own key


def test_gathered_read_over_all_keys_is_exact_retrieval():
    queries, keys, values = retrieval_problem(2.7)
    mask = torch.rand(QUERIES, STORED) < 0.3
    mask[3] = False  # a query without candidates reads zero
    reads, _, _ = gathered_read(queries, keys, values, mask.expand(1, HEADS, -1, -1))
    expected, _ = dense_read(queries, keys, values, mask)
    torch.testing.assert_close(reads, expected, rtol=0, atol=1e-5)
    assert torch.equal(reads[:, :, 3], torch.zeros_like(reads[:, :, 3]))


def test_lsh_approaches_exact_as_tables_grow():
    results = [lsh_quality(tables, bits=6) for tables in (1, 4, 16, 64)]
    recalls = [r for r, _, _ in results]
    distances = [tv for _, tv, _ in results]
    assert recalls == sorted(recalls) and recalls[-1] >= 0.97 and recalls[0] <= 0.6
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.05
    # fewer bits: bigger buckets, more keys scored, higher recall at one table
    assert lsh_quality(1, bits=2)[2] > lsh_quality(1, bits=6)[2]


def feature_error(num_features: int, scale: float) -> float:
    queries, keys, values = retrieval_problem(scale)
    memory = RandomFeatureMemory(torch.full((HEADS,), scale), DIM, num_features, torch.Generator().manual_seed(2))
    reads = memory.extend_and_read(queries, torch.zeros(1, HEADS, 0, DIM), values[:, :, :0])
    assert torch.equal(reads, torch.zeros_like(reads))  # nothing stored yet
    memory.count = 0
    memory._allocate(queries)
    for s in range(STORED):
        memory.write(memory._features(keys[:, :, s : s + 1])[:, :, 0], values[:, :, s])
    reads = torch.stack([memory.read(memory._features(queries)[:, :, i]) for i in range(QUERIES)], dim=2)
    _, weights = dense_read(queries, keys, values, None)
    implied = memory.implied_weights(queries, keys)
    implied_reads = implied @ values
    torch.testing.assert_close(reads, implied_reads, rtol=1e-4, atol=1e-4)  # the summary is the estimator
    return total_variation(implied, weights)


def test_random_features_approach_exact_as_features_grow():
    for scale in (1.0, 2.0):
        errors = [feature_error(f, scale) for f in (16, 128, 2048)]
        assert errors == sorted(errors, reverse=True), (scale, errors)
    assert errors[-1] < 0.2


def test_favor_plus_plus_reduces_to_favor_plus_without_norm():
    assert float(favor_plus_plus_a(16, torch.tensor(0.0))) == 0.0
    assert float(favor_plus_plus_a(16, torch.tensor(10.0))) < 0.0


def test_lsh_and_features_in_a_model_approach_exact():
    model = tiny_mosaic(seed=5)
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact, _ = model(idx)

    def gap(**options) -> float:
        logits, _ = run_chunks(model, idx, [24], **options)
        return float((logits - exact).abs().max())

    # every key in every bucket (1 bit, many tables): exactly the exact model
    assert gap(retrieval="lsh", lsh_tables=32, lsh_bits=1) < 1e-5
    assert gap(retrieval="lsh", lsh_tables=16, lsh_bits=4) < gap(retrieval="lsh", lsh_tables=1, lsh_bits=4)
    assert gap(retrieval="features", num_features=4096) < gap(retrieval="features", num_features=8)


def candidate_sets(index: torch.Tensor, valid: torch.Tensor) -> list[set[int]]:
    return [set(i[v].tolist()) for i, v in zip(index.flatten(0, 2), valid.flatten(0, 2), strict=True)]


def test_lsh_index_finds_exactly_the_scanned_candidates():
    """The sorted index (binary search + tail, re-sorted as it grows, stale entries after evictions)
    returns the same candidate set as comparing the query's codes with every stored key's."""
    from memory_mosaics.inference.bounded import LRU, SlotMemory

    torch.manual_seed(0)
    length = 700  # past the first re-sort (tail > 256)
    keys = F.normalize(torch.randn(2, HEADS, length, DIM), dim=-1) * 2.0
    values = torch.randn(2, HEADS, length, DIM)
    for capacity, policy in ((None, None), (90, LRU(0.05))):
        hasher = HyperplaneHash(HEADS, DIM, tables=3, bits=4, generator=torch.Generator().manual_seed(1))
        memory = SlotMemory(capacity, policy, shift=1, hasher=hasher)
        memory.extend_and_read(keys[:, :, :50], keys[:, :, :49], values[:, :, :49], 0)  # a prefill chunk
        for t in range(50, length):
            memory.extend_and_read(keys[:, :, t : t + 1], keys[:, :, t - 1 : t], values[:, :, t - 1 : t], t)
            if t % 37 and t != length - 1:
                continue
            query_codes = hasher.codes(keys[:, :, t : t + 1])
            index, valid = memory.index.candidates(query_codes, memory.codes)
            scanned = lsh_candidates(query_codes, memory.codes[..., : memory.filled])[:, :, 0]
            expected = [set(row.nonzero().flatten().tolist()) for row in scanned.flatten(0, 1)]
            assert candidate_sets(index, valid) == expected, (capacity, t)
            assert int(valid.sum()) == int(scanned.sum())  # no duplicates
            # the bound generation uses to choose between walking buckets and scanning every code
            assert memory.index.bucket_total(memory.index.buckets(query_codes)) >= int(valid.sum(-1).max())
        assert memory.index.sorted_codes is not None


def test_lsh_generation_read_equals_masked_exact_read_on_both_paths(monkeypatch):
    """One query reads its candidates either gathered (few) or through a dense masked product (many);
    both equal the plain twin: an exact softmax over the scanned candidates."""
    from memory_mosaics.inference import bounded
    from memory_mosaics.inference.bounded import SlotMemory

    queries, keys, values = retrieval_problem(2.7)
    hasher = HyperplaneHash(HEADS, DIM, tables=4, bits=5, generator=torch.Generator().manual_seed(3))
    memory = SlotMemory(None, None, shift=1, hasher=hasher)
    memory.extend_and_read(keys[:, :, :1], keys[:, :, :-1], values[:, :, :-1], STORED - 1)
    query = queries[:, :, 5:6]
    candidates = lsh_candidates(hasher.codes(query), memory.codes[..., : memory.filled])
    expected, _ = dense_read(query, keys[:, :, :-1], values[:, :, :-1], candidates)
    for limit in (1, 10**9):  # always gather / never gather
        monkeypatch.setattr(bounded, "GATHER_LIMIT", limit)
        torch.testing.assert_close(memory.lookup(query), expected, rtol=0, atol=1e-5)
