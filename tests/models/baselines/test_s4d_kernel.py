"""S4D: the FFT convolution against the direct (Toeplitz) convolution and the recurrence, and the
kernel against a hand-computed one."""

import cmath
import math

import pytest
import torch

from memory_mosaics.models.baselines.s4d import (
    S4DConfig,
    S4DLayer,
    causal_conv_direct,
    causal_conv_fft,
    s4d_kernel,
    s4d_recurrent,
)


def make_layer(channels=3, d_state=8, seed=0):
    torch.manual_seed(seed)
    return S4DLayer(S4DConfig(vocab_size=5, block_size=32, n_embd=channels, d_state=d_state)).double()


@pytest.mark.parametrize("T", [1, 2, 9, 16, 31])
def test_fft_direct_and_recurrent_forms_agree(T):
    dtA, B_bar, C = make_layer(seed=T).discretize()
    u = torch.randn(2, 3, T, dtype=torch.float64)
    kernel = s4d_kernel(dtA, B_bar, C, T)
    by_fft = causal_conv_fft(u, kernel)
    torch.testing.assert_close(by_fft, causal_conv_direct(u, kernel), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(by_fft, s4d_recurrent(u, dtA, B_bar, C), atol=1e-12, rtol=1e-10)


def test_fft_and_recurrent_forms_have_the_same_gradients():
    layer = make_layer(seed=1)
    ssm_parameters = [layer.log_dt, layer.log_A_real, layer.A_imag, layer.C]
    u = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 3, 13, dtype=torch.float64)

    dtA, B_bar, C = layer.discretize()
    by_fft = causal_conv_fft(u, s4d_kernel(dtA, B_bar, C, 13))
    fft_grads = torch.autograd.grad(by_fft, [u, *ssm_parameters], grad_output)
    dtA, B_bar, C = layer.discretize()
    by_recurrence = s4d_recurrent(u, dtA, B_bar, C)
    recurrent_grads = torch.autograd.grad(by_recurrence, [u, *ssm_parameters], grad_output)

    for got, expected in zip(fft_grads, recurrent_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-9)


def test_kernel_matches_a_hand_computed_one():
    """One channel, one mode, A = -1/2 + iπ, Δ = 0.1, C = 1:
    K_l = 2 Re(B̄ e^{l Δ A}), with B̄ = (e^{Δ A} - 1) / A."""
    A = complex(-0.5, math.pi)
    dtA = 0.1 * A
    B_bar = (cmath.exp(dtA) - 1) / A
    expected = [2 * (B_bar * cmath.exp(lag * dtA)).real for lag in range(6)]

    def as_tensor(z):
        return torch.tensor([[z]], dtype=torch.complex128)

    kernel = s4d_kernel(as_tensor(dtA), as_tensor(B_bar), as_tensor(1.0), 6)
    torch.testing.assert_close(kernel[0], torch.tensor(expected, dtype=torch.float64))


def test_discretization_is_zero_order_hold():
    """B̄ = (exp(ΔA) - 1) / A, which tends to Δ as Δ|A| -> 0 (the Euler step)."""
    layer = make_layer()
    with torch.no_grad():
        layer.log_dt.fill_(math.log(1e-6))
    _, B_bar, _ = layer.discretize()
    torch.testing.assert_close(B_bar.real, torch.full_like(B_bar.real, 1e-6), rtol=1e-4, atol=0)
    torch.testing.assert_close(B_bar.imag, torch.zeros_like(B_bar.imag), rtol=0, atol=1e-9)
