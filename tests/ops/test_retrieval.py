"""The context read's split of the keys into queries and stored keys, and its stored values, against plain slices."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops.retrieval import _QueriesAndStoredKeys, leading_rows


@pytest.mark.parametrize(("length", "shift"), [(2, 1), (5, 1), (8, 3), (3, 2), (4, 2)])
@pytest.mark.parametrize("used", ["both", "queries", "stored"])
def test_queries_and_stored_keys_have_the_gradients_of_two_slices(length, shift, used):
    """Rows only stored, only queries, both (or, for T < 2 shift, no row both); an unused output's
    gradient arrives as None."""
    keys = torch.randn(2, 3, length, 4, dtype=torch.float64)
    weights = [torch.randn(2, 3, length - shift, 4, dtype=torch.float64) for _ in range(2)]

    def gradient(split):
        leaf = keys.clone().requires_grad_()
        queries, stored = split(leaf)
        terms = {"queries": [(queries * weights[0]).sum()], "stored": [(stored * weights[1]).sum()]}
        terms["both"] = terms["queries"] + terms["stored"]
        sum(terms[used]).backward()
        return leaf.grad

    ours = gradient(lambda k: _QueriesAndStoredKeys.apply(k, shift))
    plain = gradient(lambda k: (k[..., shift:, :], k[..., : length - shift, :]))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("length", "count"), [(5, 4), (5, 5), (6, 0)])
def test_leading_rows_have_the_gradient_of_a_slice(length, count):
    x = torch.randn(2, 3, length, 4, dtype=torch.float64)
    weights = torch.randn(2, 3, count, 4, dtype=torch.float64)

    def gradient(take):
        leaf = x.clone().requires_grad_()
        (take(leaf) * weights).sum().backward()
        return leaf.grad

    ours = gradient(lambda t: leading_rows(t, count))
    torch.testing.assert_close(ours, gradient(lambda t: t[..., :count, :]), rtol=0, atol=0)
    assert torch.equal(leading_rows(x, count), x[..., :count, :])
