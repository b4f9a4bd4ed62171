"""Context and persistent memories: fast path equals plain path; parametrisations are the spec's."""

from __future__ import annotations

import math

import pytest
import torch

from memory_mosaics.layers import ContextMemory, KeyFeatureExtractor, PersistentMemory, ValueFeatureExtractor


def twin_modules(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    fast = cls(impl="fast", **kwargs).double()
    reference = cls(impl="reference", **kwargs).double()
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def grad_or_zero(tensor):
    """A path that never touches a tensor leaves its gradient None; the plain path gives zeros."""
    return torch.zeros_like(tensor) if tensor.grad is None else tensor.grad


def assert_same_outputs_and_gradients(fast, reference, x):
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn_like(x)
    out_fast, out_ref = fast(x_fast), reference(x_ref)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-9, atol=1e-10)
    (out_fast * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(grad_or_zero(x_fast), x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(grad_or_zero(p_fast), p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("length", [1, 2, 3, 9, 40])
@pytest.mark.parametrize("value_kind", ["lowrank", "kernel2"])
@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_context_memory_fast_equals_plain(length, value_kind, shift, bias):
    fast, reference = twin_modules(
        ContextMemory, n_embd=24, n_head=3, n_layer=2, shift=shift, value_kind=value_kind, chunk_size=8, bias=bias
    )
    if bias:  # non-zero biases, so that a bias dropped or misplaced by the fused path shows
        with torch.no_grad():
            for module in (fast, reference):
                torch.manual_seed(1)
                for name, param in module.named_parameters():
                    if name.endswith("bias"):
                        param.normal_()
    assert_same_outputs_and_gradients(fast, reference, torch.randn(2, length, 24, dtype=torch.float64))


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_persistent_memory_fast_equals_plain(count, bias):
    fast, reference = twin_modules(PersistentMemory, n_embd=16, n_head=2, size=56, count=count, chunk_size=4, bias=bias)
    assert_same_outputs_and_gradients(fast, reference, torch.randn(3, 11, 16, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("shift", [1, 3])
def test_context_memory_outputs_zero_before_it_has_a_pair(impl, shift):
    torch.manual_seed(0)
    memory = ContextMemory(n_embd=16, n_head=4, shift=shift, impl=impl)
    out = memory(torch.randn(2, 10, 16))
    assert torch.equal(out[:, :shift], torch.zeros_like(out[:, :shift]))
    assert out[:, shift:].abs().amin(dim=-1).gt(0).any()


def test_context_memory_query_at_t_reads_only_pairs_before_t():
    """Retrieval at t depends on x_0..x_t only, although the value at t - 1 contains x_t."""
    torch.manual_seed(0)
    memory = ContextMemory(n_embd=16, n_head=4).eval()
    x = torch.randn(1, 12, 16)
    base = memory(x)
    for t in range(11):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        torch.testing.assert_close(memory(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)


def test_retrieval_is_gaussian_kernel_smoothing():
    """softmax(<s k_t, s k_s>) equals the normalised Gaussian kernel exp(-s^2/2 |k_t - k_s|^2)."""
    torch.manual_seed(0)
    memory = ContextMemory(n_embd=8, n_head=1, impl="reference").double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    keys, values = memory.key(x), memory.value(x)
    s = memory.key.scale()
    unit = keys / s
    t = 5
    distances = ((unit[0, 0, t] - unit[0, 0, :t]) ** 2).sum(-1)
    kernel = torch.exp(-(s**2) / 2 * distances)
    expected = (kernel / kernel.sum()) @ values[0, 0, :t]
    from memory_mosaics.ops import context_retrieval_reference

    torch.testing.assert_close(context_retrieval_reference(keys, values)[0, 0, t], expected)


def test_key_parametrisation_and_clamp():
    key = KeyFeatureExtractor(n_embd=12, n_head=3)
    torch.testing.assert_close(key.decay(), torch.tensor([0.5, 2.75, 5.0]))
    torch.testing.assert_close(key.scale(), torch.full((3,), math.e))
    with torch.no_grad():
        key.bandwidth.copy_(torch.tensor([0.2, 0.6, -0.1]))
        key.leak.copy_(torch.tensor([-0.3, 0.0, 0.3]))
    torch.testing.assert_close(key.scale(), torch.exp(torch.tensor([2.0, 5.0, -1.0])))  # clamped at 5
    torch.testing.assert_close(key.decay(), torch.tensor([3.0, 0.0, 3.0]))
    squared = KeyFeatureExtractor(n_embd=12, n_head=3, scale_power=2)
    torch.testing.assert_close(squared.scale(), torch.full((3,), math.e**2))
    keys = key(torch.randn(2, 7, 12))
    torch.testing.assert_close(keys.norm(dim=-1), key.scale()[None, :, None].expand(2, 3, 7))


def test_lowrank_value_mixes_now_and_next():
    torch.manual_seed(0)
    value = ValueFeatureExtractor(n_embd=4, n_head=1, kind="lowrank").double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    projected = x @ value.proj.weight.T
    lam = value.mix[0]
    u = lam * projected
    u[:, :-1] += (1 - lam) * projected[:, 1:]
    expected = u / u.norm(dim=-1, keepdim=True) * math.exp(-0.5)
    torch.testing.assert_close(value(x)[:, 0], expected)


def test_kernel2_value_is_a_two_tap_convolution():
    torch.manual_seed(0)
    value = ValueFeatureExtractor(n_embd=4, n_head=2, kind="kernel2").double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    w_now, w_next = value.proj.weight[:4], value.proj.weight[4:]
    u = x @ w_now.T
    u[:, :-1] += x[:, 1:] @ w_next.T
    heads = u.view(1, 5, 2, 2).transpose(1, 2)
    expected = heads / heads.norm(dim=-1, keepdim=True) * math.exp(-0.5)
    torch.testing.assert_close(value(x), expected)
    assert value.proj.weight.std().item() < 0.6  # conv fan-in 2C: std 1/sqrt(8) ~ 0.35
