"""The scaled normalisation with a hand-written backward equals the plain formula under autograd."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops.normalize import scaled_normalize, scaled_normalize_reference


def outputs_and_gradients(fn, x, scale, weights):
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    y = fn(x, scale)
    (y * weights).sum().backward()
    return y.detach(), x.grad, scale.grad


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 3, 7), (3, 4, 1, 2, 8)])
def test_matches_plain_formula_float64(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    x[0, 0, ..., 0, :] = 0.0  # a zero row (clamped norm) keeps its value and gradient
    scale = torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5
    weights = torch.randn(*shape, generator=generator, dtype=torch.float64)
    fast = outputs_and_gradients(scaled_normalize, x, scale, weights)
    plain = outputs_and_gradients(scaled_normalize_reference, x, scale, weights)
    for got, expected in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(fast[0][0, 0, ..., 0, :], torch.zeros_like(fast[0][0, 0, ..., 0, :]))


def test_strided_input_and_bfloat16():
    """A head-split view of a (B, T, C) tensor, in bf16 as under autocast, against float64."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(2, 9, 12, generator=generator, dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    weights = torch.randn(2, 3, 9, 4, generator=generator, dtype=torch.float64)
    plain = outputs_and_gradients(scaled_normalize_reference, base.view(2, 9, 3, 4).transpose(1, 2), scale, weights)
    low = base.bfloat16().view(2, 9, 3, 4).transpose(1, 2)
    fast = outputs_and_gradients(scaled_normalize, low, scale.float(), weights.bfloat16())
    assert fast[0].dtype == torch.bfloat16 and fast[2].dtype == torch.float32
    for got, expected in zip(fast, plain, strict=True):
        assert ((got.double() - expected).abs().max() / expected.abs().max()) < 2e-2  # bf16: 8-bit mantissa
