"""The chunked leaky average and the one-step update equal the dense T x T reference."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops import leaky_average, leaky_average_reference, leaky_average_step

LENGTHS = [1, 2, 7, 16, 17, 63, 64, 65, 200, 1023, 1500, 1537]
DECAYS = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0])  # one head per decay


def inputs(length: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, len(DECAYS), length, 3, generator=generator).to(dtype)
    beta = DECAYS.clone().to(dtype)
    return x.requires_grad_(), beta.requires_grad_()


def gradients(fn, x, beta, weights):
    x.grad = beta.grad = None
    (fn(x, beta) * weights).sum().backward()
    return x.grad.clone(), beta.grad.clone()


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_dense_fp32(length, chunk_size):
    x, beta = inputs(length, torch.float64)
    weights = torch.randn_like(x)
    expected = leaky_average_reference(x, beta)
    got = leaky_average(x, beta, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # float32: the same within float32 rounding (sums of up to 1/(1-e^-0.01) ~ 100 terms).
    x32, beta32 = x.detach().float().requires_grad_(), beta.detach().float().requires_grad_()
    fast = gradients(lambda a, b: leaky_average(a, b, chunk_size=chunk_size), x32, beta32, weights.float())
    dense = gradients(leaky_average_reference, x, beta, weights)
    torch.testing.assert_close(fast[0], dense[0].float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fast[1], dense[1].float(), rtol=1e-4, atol=1e-2 * max(1.0, length / 100))


@pytest.mark.parametrize("length", [1, 65, 300, 1500])
def test_chunked_matches_dense_bf16(length):
    x, beta = inputs(length, torch.float64, seed=1)
    expected = leaky_average_reference(x, beta).detach()
    got = leaky_average(x.detach().bfloat16(), beta.detach().bfloat16()).double()
    # bf16 keeps 8 bits of mantissa; compare relative to the scale of each head's output.
    scale = expected.abs().amax(dim=(0, 2, 3), keepdim=True)
    assert ((got - expected).abs() / scale).max() < 0.05


@pytest.mark.parametrize("length", [5, 64, 130])
def test_initial_state_continues_a_sequence(length):
    x, beta = inputs(2 * length, torch.float64, seed=2)
    x = x.detach()
    whole = leaky_average_reference(x, beta.detach())
    first = leaky_average(x[..., :length, :], beta.detach(), chunk_size=16)
    second = leaky_average(x[..., length:, :], beta.detach(), initial=first[..., -1, :], chunk_size=16)
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=1e-10, atol=1e-10)
    dense_second = leaky_average_reference(x[..., length:, :], beta.detach(), initial=first[..., -1, :])
    torch.testing.assert_close(dense_second, whole[..., length:, :], rtol=1e-10, atol=1e-10)


def test_one_step_update_matches_dense():
    x, beta = inputs(40, torch.float64, seed=3)
    x, beta = x.detach(), beta.detach()
    expected = leaky_average_reference(x, beta)
    state = None
    for t in range(x.shape[-2]):
        state = leaky_average_step(state, x[..., t, :], beta)
        torch.testing.assert_close(state, expected[..., t, :], rtol=1e-12, atol=1e-12)


def test_current_step_has_weight_one_and_past_decays():
    x = torch.zeros(1, 1, 3, 1, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0
    y = leaky_average(x, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(y.flatten(), torch.exp(-2.0 * torch.arange(3, dtype=torch.float64)))


def test_no_t_by_t_tensor_in_the_fast_form():
    """The chunked form's largest intermediate stays O(T * chunk), not O(T^2)."""
    length, chunk = 4096, 64
    x = torch.randn(1, 2, length, 4)
    largest = 0

    def record(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        leaky_average(x.requires_grad_(), torch.tensor([0.5, 2.0]).requires_grad_(), chunk_size=chunk)
    assert largest <= x.numel()  # a T x T tensor per head would hold 2 * 4096^2 = 33.5M entries


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="beta must have shape"):
        leaky_average(torch.randn(1, 2, 5, 3), torch.ones(3))


def test_gradient_of_the_initial_state():
    x, beta = inputs(45, torch.float64, seed=4)
    initial = torch.randn(2, len(DECAYS), 3, dtype=torch.float64)
    weights = torch.randn_like(x)
    grads = []
    for fn in (lambda a, b, c: leaky_average(a, b, c, chunk_size=8), leaky_average_reference):
        a, b, c = (t.detach().clone().requires_grad_() for t in (x, beta, initial))
        (fn(a, b, c) * weights).sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [5, 40, 96])
def test_head_split_view_of_a_linear_output(length):
    """The layer's input: heads split from a wider (B, T, 2C) projection, rows of stride 2C."""
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(2, length, 2 * 4 * 3, generator=generator, dtype=torch.float64)
    beta = torch.tensor([0.05, 0.5, 2.0, 6.0], dtype=torch.float64)
    weights = torch.randn(2, 4, length, 3, generator=generator, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b: leaky_average(a, b, chunk_size=16), leaky_average_reference):
        w, b = wide.clone().requires_grad_(), beta.clone().requires_grad_()
        x = w[..., :12].view(2, length, 4, 3).transpose(1, 2)
        y = fn(x, b)
        (y * weights).sum().backward()
        grads.append((y.detach(), w.grad, b.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
