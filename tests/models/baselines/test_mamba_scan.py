"""The chunked (parallel) selective scan against the sequential reference, and both against a
hand-computed case."""

import math

import pytest
import torch
from baseline_support import assert_twins_agree

from memory_mosaics.models.baselines.mamba import (
    parallel_linear_scan,
    selective_scan_chunked,
    selective_scan_sequential,
)


def random_scan_inputs(batch, T, channels, states, delta_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = randn(batch, T, channels)
    delta = torch.rand(batch, T, channels, generator=generator, dtype=torch.float64) * delta_scale
    A = -torch.rand(channels, states, generator=generator, dtype=torch.float64) * 4 - 0.1
    return [t.requires_grad_() for t in (x, delta, A, randn(batch, T, states), randn(batch, T, states))]


@pytest.mark.parametrize(("T", "chunk_size"), [(1, 4), (5, 8), (16, 4), (17, 4), (23, 5), (40, 32), (33, 1)])
def test_chunked_scan_matches_sequential_outputs_and_gradients(T, chunk_size):
    def chunked(*inputs):
        return selective_scan_chunked(*inputs, chunk_size=chunk_size)

    inputs = random_scan_inputs(2, T, 3, 4, seed=T)
    assert_twins_agree(chunked, selective_scan_sequential, inputs, ["x", "delta", "A", "B", "C"])


def test_chunked_scan_is_stable_under_very_strong_decay():
    """Δ·A down to about -800 per step: exp(-Σ Δ A) would overflow even in float64, which is
    why the chunked form multiplies decays instead of dividing by them."""
    inputs = [t.detach().float() for t in random_scan_inputs(1, 64, 2, 3, delta_scale=200.0, seed=7)]
    reference = selective_scan_sequential(*inputs)
    chunked = selective_scan_chunked(*inputs, chunk_size=16)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)


def test_scan_matches_a_hand_computed_case():
    """One channel, one state, A = -1, Δ = 0.5, B = C = 1: h_t = e^{-1/2} h_{t-1} + x_t / 2."""
    xs = [1.0, -2.0, 3.0]
    x = torch.tensor(xs, dtype=torch.float64).view(1, 3, 1)
    delta = torch.full((1, 3, 1), 0.5, dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    ones = torch.ones(1, 3, 1, dtype=torch.float64)
    h, expected = 0.0, []
    for x_t in xs:
        h = math.exp(-0.5) * h + 0.5 * x_t
        expected.append(h)
    expected = torch.tensor(expected, dtype=torch.float64).view(1, 3, 1)
    torch.testing.assert_close(selective_scan_sequential(x, delta, A, ones, ones), expected)
    torch.testing.assert_close(selective_scan_chunked(x, delta, A, ones, ones, chunk_size=2), expected)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9])
def test_parallel_linear_scan_matches_a_loop(n):
    generator = torch.Generator().manual_seed(n)
    decay = torch.rand(3, n, 2, generator=generator, dtype=torch.float64)
    inputs = torch.randn(3, n, 2, generator=generator, dtype=torch.float64)
    products, states = parallel_linear_scan(decay, inputs, dim=1)
    h, p = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    for t in range(n):
        h = decay[:, t] * h + inputs[:, t]
        p = p * decay[:, t]
        torch.testing.assert_close(states[:, t], h)
        torch.testing.assert_close(products[:, t], p)
