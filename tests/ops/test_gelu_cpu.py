"""The compiled tanh-approximate GELU (float32, bf16 on AVX-512 CPUs) against PyTorch's in float64, values
and derivatives, and its place in the GPT's MLP. Skips where the kernel cannot be built or run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memory_mosaics.models.gpt import GPT, GPTConfig
from memory_mosaics.ops import gelu_cpu, gelu_tanh

needs_kernel = pytest.mark.skipif(gelu_cpu.kernel() is None, reason="the GELU CPU kernel cannot be built or run here")


def values_and_grads(fn, x, grad, dtype):
    leaf = x.to(dtype, copy=True).requires_grad_()
    out = fn(leaf)
    out.backward(grad.to(dtype))
    return out.detach(), leaf.grad


def plain(x):
    return F.gelu(x, approximate="tanh")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 33, 64), (37,), (70001,)], ids=["rows", "tail-only", "many-tasks"])
def test_kernel_matches_the_tanh_form_in_float64_and_is_as_accurate_as_pytorchs(shape, dtype):
    """Inputs rounded to `dtype` first, so that float64 sees the same numbers; 37 elements take only the
    scalar tail, 70,001 several parallel tasks and a tail. Large inputs of both signs included."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype).double()
    x.view(-1)[:6] = torch.tensor([0.0, 1e-8, -1e-8, 30.0, -30.0, -100.0], dtype=torch.float64).to(dtype).double()
    grad = torch.randn(shape, generator=generator).to(dtype).double()
    expected = values_and_grads(plain, x, grad, torch.float64)
    ours = values_and_grads(gelu_cpu.gelu_tanh, x, grad, dtype)
    theirs = values_and_grads(plain, x, grad, dtype)
    for name, a, b, c in zip(["value", "grad"], ours, theirs, expected, strict=True):
        assert a.dtype == dtype and a.shape == c.shape, name
        assert relative_error(a, c) <= 2 * relative_error(b, c) + (1e-6 if dtype == torch.float32 else 1e-3), name


@needs_kernel
def test_native_bf16_rounding_matches_the_software_rounding_but_for_subnormal_results():
    """Where the kernel rounds bf16 results with AVX512-BF16, it must round as the software path does
    (nearest even, NaN kept) but for results below bf16's normal range, which the instruction makes zero."""
    kernel = gelu_cpu.kernel()
    if not kernel.native_rounding():
        pytest.skip("this CPU rounds in software only")
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(4099, generator=generator) * 3).to(torch.bfloat16)
    x[:5] = torch.tensor([float("nan"), 1e-38, -1e-38, 3e-39, -1e-20]).to(torch.bfloat16)
    grad = torch.randn(4099, generator=generator).to(torch.bfloat16)
    grad[1:4] = 1e-38  # gradients of about half of it: subnormal too
    for native, software in [
        (kernel.forward(x), kernel.forward(x, software_rounding=True)),
        (kernel.backward(x, grad), kernel.backward(x, grad, software_rounding=True)),
    ]:
        assert native[0].isnan() and software[0].isnan()
        native, software = native[1:], software[1:]
        subnormal = software.float().abs() < torch.finfo(torch.float32).tiny
        assert subnormal[:3].all() and not subnormal.all()
        assert torch.equal(native[~subnormal], software[~subnormal])
        assert (native[subnormal] == 0).all()


@needs_kernel
def test_the_gpt_mlp_uses_the_kernel_and_matches_pytorchs_gelu(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    idx = torch.randint(0, 64, (2, 32))
    calls = []
    original = gelu_cpu.GeluTanhCPU.apply
    monkeypatch.setattr(gelu_cpu.GeluTanhCPU, "apply", lambda x: calls.append(x.dtype) or original(x))

    def run():
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    with_kernel = run()
    assert calls == [torch.float32, torch.float32]
    monkeypatch.setenv("MOSAIC_CPU_KERNEL", "0")
    with_pytorch = run()
    assert len(calls) == 2
    for a, b in zip(with_kernel, with_pytorch, strict=True):
        assert relative_error(a, b.double()) < 1e-5


def test_gelu_tanh_falls_back_to_pytorch_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(5, 40, dtype=torch.float64)
    assert not gelu_cpu.usable(x)
    assert torch.equal(gelu_tanh(x), plain(x))
    monkeypatch.setenv("MOSAIC_CPU_KERNEL", "0")
    assert not gelu_cpu.usable(x.float())
