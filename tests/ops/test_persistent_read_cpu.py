"""The compiled CPU kernel for the persistent read (bf16, AMX) against the plain softmax in float64,
outputs and gradients, and its place in `persistent_retrieval`. Skips where the kernel cannot be
built or run (no compiler, no AVX-512/AMX); collecting them builds it (about 40 s, then cached)."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops import persistent_read_cpu, persistent_retrieval, persistent_retrieval_reference

needs_kernel = pytest.mark.skipif(
    persistent_read_cpu.kernel() is None, reason="the persistent-read CPU kernel cannot be built or run here"
)


def bf16_problem(heads: int, rows: int, dim: int, slots: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(heads, rows, dim, generator=generator), dim=-1) * 3
    keys = torch.randn(heads, slots, dim, generator=generator) / 2
    values = torch.randn(heads, slots, dim, generator=generator) / 8
    grad = torch.randn(heads, rows, dim, generator=generator)
    return [t.bfloat16() for t in (queries, keys, values, grad)]


def read_and_grads(fn, queries, keys, values, grad, dtype):
    # Copies: for bf16 inputs `.to` would return the problem's own tensors, and a second call on the same
    # problem would then accumulate its gradients into the first call's.
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in (queries, keys, values)]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def plain(queries, keys, values):
    return persistent_retrieval_reference(queries[None], keys[None], values[None])[0]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@needs_kernel
@pytest.mark.parametrize(
    "heads, rows, dim, slots",
    [(4, 2048, 64, 896), (2, 37, 64, 128), (1, 129, 128, 64), (3, 256, 64, 192)],
    ids=["model-size", "odd-rows", "d128-one-panel", "full-blocks"],
)
def test_kernel_matches_plain_softmax_in_float64(heads, rows, dim, slots):
    """bf16 inputs; the float64 reference sees the same bf16 numbers. Odd row counts exercise the last
    block's zero padding, 129 rows a block of one row."""
    problem = bf16_problem(heads, rows, dim, slots)
    expected = read_and_grads(plain, *problem, dtype=torch.float64)
    got = read_and_grads(persistent_read_cpu.persistent_read_cpu, *problem, dtype=torch.bfloat16)
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        assert a.dtype == torch.bfloat16, name
        assert relative_error(a, b) < 1.5e-2, name


@needs_kernel
def test_kernel_is_as_accurate_as_the_fused_attention_kernel():
    """Both in bf16 against float64: the kernel's errors stay within twice the fused kernel's."""
    problem = bf16_problem(4, 512, 64, 896, seed=1)
    expected = read_and_grads(plain, *problem, dtype=torch.float64)
    ours = read_and_grads(persistent_read_cpu.persistent_read_cpu, *problem, dtype=torch.bfloat16)

    def fused(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]

    theirs = read_and_grads(fused, *problem, dtype=torch.bfloat16)
    for name, a, b, c in zip(["out", "queries", "keys", "values"], ours, theirs, expected, strict=True):
        assert relative_error(a, c) <= 2 * relative_error(b, c) + 1e-3, name


@needs_kernel
def test_persistent_retrieval_uses_the_kernel_in_bf16_and_not_otherwise(monkeypatch):
    calls = []
    original = persistent_read_cpu.persistent_read_cpu
    monkeypatch.setattr(
        persistent_read_cpu, "persistent_read_cpu", lambda *a: calls.append([t.dtype for t in a[:3]]) or original(*a)
    )
    queries, keys, values, _ = bf16_problem(4, 64, 64, 128)
    batched = queries.view(4, 2, 32, 64).transpose(0, 1)  # (B, H, T, d)
    tables = keys[None].float(), values[None].float()
    persistent_retrieval(batched, *tables)
    assert calls == [[torch.bfloat16, torch.float32, torch.float32]]  # float32 tables reach the kernel as they are
    persistent_retrieval(batched.float(), *tables)  # float32: the fused attention kernel
    persistent_retrieval(batched, *tables, dropout_p=0.1, training=True)  # dropout: the fused kernel's own
    assert len(calls) == 1
    monkeypatch.setenv("MOSAIC_CPU_KERNEL", "0")
    persistent_retrieval(batched, *tables)
    assert len(calls) == 1


@needs_kernel
def test_retrieval_with_the_kernel_matches_the_plain_form_with_two_tables():
    queries, keys, values, grad = bf16_problem(4, 96, 64, 128, seed=2)
    keys2, values2 = keys.roll(1, dims=1), values.flip(1)
    batched = queries.view(4, 3, 32, 64).transpose(0, 1)
    tables = torch.stack([keys, keys2]), torch.stack([values, values2])
    weights = grad.view(4, 3, 32, 64).transpose(0, 1)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (batched, *tables)]
        out = fn(*leaves)
        out.backward(weights.to(dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    expected = run(persistent_retrieval_reference, torch.float64)
    got = run(persistent_retrieval, torch.bfloat16)
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        assert relative_error(a, b) < 1.5e-2, name


def test_kernel_is_not_used_where_it_does_not_apply():
    """Checked without building it: wrong device type, dtype, sizes or dropout keep the fused path."""
    queries = torch.zeros(2, 4, 8, 64, dtype=torch.bfloat16)
    keys = torch.zeros(1, 4, 128, 64)
    assert not persistent_read_cpu.usable(queries.float(), keys, dropout=False)
    assert not persistent_read_cpu.usable(queries[..., :32], keys[..., :32], dropout=False)
    assert not persistent_read_cpu.usable(queries, keys[:, :, :100], dropout=False)
    assert not persistent_read_cpu.usable(queries, keys, dropout=True)


@needs_kernel
def test_float32_tables_are_read_as_their_bf16_roundings_and_get_float32_gradients():
    """The kernel rounds float32 tables to bf16 while packing them: the read and dq are those of the
    tables' bf16 copies bit for bit, and the tables' gradients are the float32 sums that bf16 tables
    receive rounded."""
    queries, keys, values, grad = bf16_problem(2, 300, 64, 128, seed=3)
    keys, values = keys.float() + 1e-3 * torch.randn(keys.shape), values.float()  # not all bf16 numbers

    def run(table_dtype):
        leaves = [queries.clone().requires_grad_()] + [
            t.to(table_dtype, copy=True).requires_grad_() for t in (keys, values)
        ]
        out = persistent_read_cpu.persistent_read_cpu(*leaves)
        out.backward(grad)
        return [out.detach()] + [leaf.grad for leaf in leaves]

    from_float, from_bf16 = run(torch.float32), run(torch.bfloat16)
    assert [t.dtype for t in from_float[2:]] == [torch.float32, torch.float32]
    assert torch.equal(from_float[0], from_bf16[0]) and torch.equal(from_float[1], from_bf16[1])
    for ours, theirs in zip(from_float[2:], from_bf16[2:], strict=True):
        assert torch.equal(ours.bfloat16(), theirs)
        assert not torch.equal(ours, theirs.float())  # more than bf16's 8 bits survive


@needs_kernel
@pytest.mark.parametrize("tables", [torch.float32, torch.bfloat16])
def test_the_output_scale_and_its_gradient_match_the_plain_form(tables):
    """The kernel scales each head's read (the persistent memory's output scale) where it rounds it; the
    gradients of everything, the scale's included, match scale_h * softmax(q k^T) v in float64."""
    queries, keys, values, grad = bf16_problem(3, 200, 64, 192, seed=4)
    scale = torch.tensor([0.5, 1.7, 3.0])

    def run(fn, dtypes):
        inputs = zip((queries, keys, values, scale), dtypes, strict=True)
        leaves = [t.to(dtype, copy=True).requires_grad_() for t, dtype in inputs]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    def plain_scaled(q, k, v, s):
        return plain(q, k, v) * s[:, None, None]

    expected = run(plain_scaled, [torch.float64] * 4)
    got = run(persistent_read_cpu.persistent_read_cpu, [torch.bfloat16, tables, tables, torch.float32])
    for name, a, b in zip(["out", "queries", "keys", "values", "scale"], got, expected, strict=True):
        assert relative_error(a, b) < 1.5e-2, name
