"""Gated linear attention: the chunked form against the recurrent reference, and the ungated
case against plain causal linear attention."""

import pytest
import torch
from baseline_support import assert_twins_agree

from memory_mosaics.models.baselines.gla import gla_chunked, gla_recurrent


def random_gla_inputs(T, gate_scale=3.0, seed=0, batch=2, heads=3, key_dim=4, value_dim=5):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k = randn(batch, heads, T, key_dim), randn(batch, heads, T, key_dim)
    v = randn(batch, heads, T, value_dim)
    log_gate = -torch.rand(batch, heads, T, key_dim, generator=generator, dtype=torch.float64) * gate_scale
    return [t.requires_grad_() for t in (q, k, v, log_gate)]


@pytest.mark.parametrize(("T", "chunk_size"), [(1, 4), (6, 8), (16, 4), (19, 4), (23, 5), (12, 1)])
def test_chunked_matches_recurrent_outputs_and_gradients(T, chunk_size):
    def chunked(*inputs):
        return gla_chunked(*inputs, chunk_size=chunk_size)

    inputs = random_gla_inputs(T, seed=T)
    assert_twins_agree(chunked, gla_recurrent, inputs, ["q", "k", "v", "log_gate"])


def test_chunked_is_stable_under_very_strong_gates():
    """Log gates down to -500 per step: every exponential in the chunked form is of a
    non-positive number, so nothing overflows, in float32 too, and gradients stay finite."""
    inputs = [t.detach().float().requires_grad_() for t in random_gla_inputs(40, gate_scale=500.0, seed=3)]
    chunked = gla_chunked(*inputs, chunk_size=16)
    reference = gla_recurrent(*inputs)
    assert torch.isfinite(chunked).all()
    # Differences of cumulative log gates near -8000 keep about 1e-4 of float32 precision.
    torch.testing.assert_close(chunked, reference, atol=1e-3, rtol=1e-3)
    chunked.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_without_forgetting_it_is_causal_linear_attention():
    """log α = 0 (α = 1): o_t = Σ_{s<=t} (q_t · k_s) v_s."""
    q, k, v, log_gate = (t.detach() for t in random_gla_inputs(9, seed=5))
    log_gate = torch.zeros_like(log_gate)
    scores = (q @ k.transpose(-1, -2)).tril()
    expected = scores @ v
    torch.testing.assert_close(gla_recurrent(q, k, v, log_gate), expected)
    torch.testing.assert_close(gla_chunked(q, k, v, log_gate, chunk_size=4), expected)
