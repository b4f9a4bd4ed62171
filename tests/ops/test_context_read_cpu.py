"""The compiled CPU kernel for the context memory's causal read (bf16 and float32, AMX CPUs) against the plain
masked softmax in float64, outputs and gradients, and its place in `ContextMemory`. Skips where the kernel
cannot be built or run (no compiler, no AVX-512/AMX); collecting them builds it (about 40 s, then cached)."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.layers.memory import ContextMemory, merge_heads
from memory_mosaics.ops import context_read_cpu, context_retrieval, context_retrieval_reference

needs_kernel = pytest.mark.skipif(
    context_read_cpu.kernel() is None, reason="the context-read CPU kernel cannot be built or run here"
)


# Largest relative error against float64 allowed in each precision (the fused attention kernel's are about
# 5e-3 and 1e-6: see the test against it).
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def make_problem(batch: int, heads: int, length: int, dim: int, seed: int = 0, dtype=torch.bfloat16):
    """Keys and values stored head-major, as the features kernels write them: (B, H, T, d) views of
    (H, B, T, d) storage. Keys of norm 3, like trained keys scaled by their bandwidth."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(heads, batch, length, dim, generator=generator), dim=-1) * 3
    values = torch.randn(heads, batch, length, dim, generator=generator)
    grad = torch.randn(batch, length, heads * dim, generator=generator)
    keys, values = (t.to(dtype).transpose(0, 1) for t in (keys, values))
    return keys, values, grad.to(dtype)


def plain(keys, values, shift):
    """The reference read in the kernel's (B, T, H d) layout."""
    return merge_heads(context_retrieval_reference(keys, values, shift))


def read_and_grads(fn, keys, values, grad, shift, dtype):
    # Copies: for bf16 inputs `.to` would return the problem's own tensors, and a second call on the same
    # problem would then accumulate its gradients into the first call's.
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in (keys, values)]
    out = fn(*leaves, shift)
    out.backward(grad.to(dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "batch, heads, length, dim, shift",
    [
        (2, 4, 256, 64, 1),
        (1, 2, 300, 64, 1),
        (1, 2, 1100, 32, 2),
        (2, 1, 130, 32, 1),
        (1, 3, 70, 128, 3),
        (2, 2, 5, 64, 1),
    ],
    ids=["model-size", "two-slices", "three-forward-slices", "d32-odd-block", "d128-shift3", "shorter-than-a-vector"],
)
def test_kernel_matches_plain_masked_softmax_in_float64(batch, heads, length, dim, shift, dtype):
    """The float64 reference sees the same (rounded) numbers. 300 positions make the backward pass take a
    block's columns in two slices, 1,100 the forward pass in three (a running maximum and sum carried
    from slice to slice); 130 positions (129 queries) end in a block of one row in both precisions
    (blocks of 128 and 64 rows)."""
    problem = make_problem(batch, heads, length, dim, dtype=dtype)
    expected = read_and_grads(plain, *problem, shift, dtype=torch.float64)
    got = read_and_grads(context_read_cpu.context_read_cpu, *problem, shift, dtype=dtype)
    for name, a, b in zip(["out", "keys", "values"], got, expected, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert relative_error(a, b) < TOLERANCE[dtype], name


@needs_kernel
def test_rows_without_a_pair_read_zero_and_unread_values_get_no_gradient():
    keys, values, grad = make_problem(2, 2, 40, 64)
    shift = 3
    out, _, grad_values = read_and_grads(context_read_cpu.context_read_cpu, keys, values, grad, shift, torch.bfloat16)
    assert torch.equal(out[:, :shift], torch.zeros_like(out[:, :shift]))
    assert torch.equal(grad_values[:, :, -shift:], torch.zeros_like(grad_values[:, :, -shift:]))
    assert (grad_values[:, :, :-shift].abs().amax(dim=-1) > 0).all()  # every value that is read has one


@needs_kernel
def test_a_sequence_shorter_than_twice_the_shift():
    """Some rows are only queries, some only stored keys, some neither (T < 2 shift)."""
    problem = make_problem(1, 2, 5, 64, seed=5)
    expected = read_and_grads(plain, *problem, 3, dtype=torch.float64)
    got = read_and_grads(context_read_cpu.context_read_cpu, *problem, 3, dtype=torch.bfloat16)
    for name, a, b in zip(["out", "keys", "values"], got, expected, strict=True):
        assert relative_error(a, b) < TOLERANCE[torch.bfloat16], name


@needs_kernel
@pytest.mark.parametrize("dtype, slack", [(torch.bfloat16, 1e-3), (torch.float32, 1e-7)], ids=["bf16", "fp32"])
def test_kernel_is_as_accurate_as_the_fused_attention_kernel(dtype, slack):
    """Both in the same precision against float64: the kernel's errors stay within twice the fused kernel's."""
    problem = make_problem(2, 4, 256, 64, seed=1, dtype=dtype)
    expected = read_and_grads(plain, *problem, 1, dtype=torch.float64)
    ours = read_and_grads(context_read_cpu.context_read_cpu, *problem, 1, dtype=dtype)

    def fused(keys, values, shift):
        return merge_heads(context_retrieval(keys, values, shift))

    theirs = read_and_grads(fused, *problem, 1, dtype=dtype)
    for name, a, b, c in zip(["out", "keys", "values"], ours, theirs, expected, strict=True):
        assert relative_error(a, c) <= 2 * relative_error(b, c) + slack, name


@needs_kernel
@pytest.mark.parametrize("autocast, tolerance", [(True, 3e-2), (False, 1e-5)], ids=["bf16-autocast", "fp32"])
def test_context_memory_uses_the_kernel_and_matches_its_fused_path(monkeypatch, autocast, tolerance):
    """In float32 and under bf16 autocast the layer reads through the kernel; with the kernel turned off it
    takes the fused attention path, and the two agree (outputs and every parameter's gradient)."""
    torch.manual_seed(0)
    layer = ContextMemory(128, 2)
    x = torch.randn(2, 96, 128)
    calls = []
    original = context_read_cpu.context_read_cpu
    monkeypatch.setattr(context_read_cpu, "context_read_cpu", lambda *a: calls.append(a[0].dtype) or original(*a))

    def run():
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().square().mean().backward()
        return [out.detach().float()] + [p.grad.clone() for p in layer.parameters()]

    with_kernel = run()
    assert calls == [torch.bfloat16 if autocast else torch.float32]
    monkeypatch.setenv("MOSAIC_CPU_KERNEL", "0")
    fused = run()
    assert len(calls) == 1
    for a, b in zip(with_kernel, fused, strict=True):
        assert relative_error(a, b.double()) < tolerance


@needs_kernel
def test_context_memory_keeps_the_fused_path_with_dropout_and_in_float64(monkeypatch):
    calls = []
    monkeypatch.setattr(context_read_cpu, "context_read_cpu", lambda *a: calls.append(a) or None)
    x = torch.randn(1, 16, 64)
    ContextMemory(64, 1, dropout=0.1).train()(x)
    ContextMemory(64, 1).double()(x.double())
    assert calls == []


def test_kernel_is_not_used_where_it_does_not_apply():
    """Checked without building it: wrong dtype, sizes, shift or dropout keep the fused path."""
    keys = torch.zeros(2, 4, 8, 64, dtype=torch.bfloat16)
    assert not context_read_cpu.usable(keys.double(), 1, dropout=False)
    assert not context_read_cpu.usable(keys.half(), 1, dropout=False)
    assert not context_read_cpu.usable(keys[..., :48], 1, dropout=False)
    assert not context_read_cpu.usable(keys, 8, dropout=False)
    assert not context_read_cpu.usable(keys, 0, dropout=False)
    assert not context_read_cpu.usable(keys, 1, dropout=True)
