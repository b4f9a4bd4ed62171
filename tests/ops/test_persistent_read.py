"""Persistent retrieval: the fused-attention form and the blocked form with a hand-written backward
(the previous CPU path, kept for the benchmarks) equal the plain softmax."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops import persistent_retrieval, persistent_retrieval_reference
from memory_mosaics.ops.persistent_read import persistent_read


def tensors(count: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(3, 2, 11, 8, generator=generator), dim=-1) * 3
    keys = torch.randn(count, 2, 20, 8, generator=generator)
    values = torch.randn(count, 2, 20, 8, generator=generator)
    weights = torch.randn(3, 2, 11, 8, generator=generator)
    return [t.to(dtype) for t in (queries, keys, values, weights)]


def outputs_and_gradients(fn, queries, keys, values, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (queries, keys, values)]
    out = fn(*leaves)
    (out * weights).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


def folded(save_budget: int, block_elements: int):
    """persistent_read on (B, H, T, d) queries, with its memory knobs set."""

    def run(queries, keys, values):
        batch, heads, length, dim = queries.shape
        flat = queries.transpose(0, 1).reshape(heads, batch * length, dim)
        out = persistent_read(flat, keys, values, save_budget=save_budget, block_elements=block_elements)
        return out.view(heads, batch, length, dim).transpose(0, 1)

    return run


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize(
    "save_budget, block_elements",
    [(2**25, 2**23), (0, 2**23), (0, 2 * 20 * 5), (0, 1)],
    ids=["saved", "recomputed", "recomputed-blocks", "recomputed-row-by-row"],
)
def test_blocked_read_matches_plain_softmax(count, save_budget, block_elements):
    queries, keys, values, weights = tensors(count)
    expected = outputs_and_gradients(persistent_retrieval_reference, queries, keys, values, weights)
    got = outputs_and_gradients(folded(save_budget, block_elements), queries, keys, values, weights)
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("count", [1, 2])
def test_public_fast_form_matches_plain_softmax(count):
    queries, keys, values, weights = tensors(count, seed=3)
    expected = outputs_and_gradients(persistent_retrieval_reference, queries, keys, values, weights)
    got = outputs_and_gradients(persistent_retrieval, queries, keys, values, weights)
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_public_fast_form_in_bfloat16_under_autocast():
    queries, keys, values, weights = tensors(1)
    expected = outputs_and_gradients(persistent_retrieval_reference, queries, keys, values, weights)

    def fast(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return persistent_retrieval(q.bfloat16(), k.float(), v.float())

    got = outputs_and_gradients(fast, queries, keys, values, weights)
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 3e-2, name


def test_dropout_in_training_still_reads_every_table():
    """With dropout (the fused kernel's own) at p -> 0 every table is still read and averaged."""
    queries, keys, values, _ = tensors(2)
    out = persistent_retrieval(queries, keys, values, dropout_p=1e-12, training=True)
    torch.testing.assert_close(out, persistent_retrieval_reference(queries, keys, values), rtol=1e-9, atol=1e-9)
