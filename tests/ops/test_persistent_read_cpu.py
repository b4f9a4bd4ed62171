"""The compiled CPU kernel for the persistent read (bf16 or float32, AMX) against the plain softmax in
float64, outputs and gradients, and its place in `persistent_retrieval`. Skips where the kernel cannot be
built or run (no compiler, no AVX-512/AMX); collecting them builds it (about 40 s, then cached)."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.ops import persistent_read_cpu, persistent_retrieval, persistent_retrieval_reference

needs_kernel = pytest.mark.skipif(
    persistent_read_cpu.kernel() is None, reason="the persistent-read CPU kernel cannot be built or run here"
)


def problem(heads: int, rows: int, dim: int, slots: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(heads, rows, dim, generator=generator), dim=-1) * 3
    keys = torch.randn(heads, slots, dim, generator=generator) / 2
    values = torch.randn(heads, slots, dim, generator=generator) / 8
    grad = torch.randn(heads, rows, dim, generator=generator)
    return [t.to(dtype) for t in (queries, keys, values, grad)]


def bf16_problem(heads: int, rows: int, dim: int, slots: int, seed: int = 0):
    return problem(heads, rows, dim, slots, seed, torch.bfloat16)


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


SHAPES = pytest.mark.parametrize(
    "heads, rows, dim, slots",
    [(4, 2048, 64, 896), (2, 37, 64, 128), (1, 129, 128, 64), (3, 256, 64, 192)],
    ids=["model-size", "odd-rows", "d128-one-panel", "full-blocks"],
)


@needs_kernel
@SHAPES
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1.5e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_kernel_matches_plain_softmax_in_float64(heads, rows, dim, slots, dtype, tolerance):
    """The float64 reference sees the same numbers. Odd row counts exercise the last block's zero
    padding, 129 rows a block of one row (in bf16: 128 rows a block; in float32: 64)."""
    inputs = problem(heads, rows, dim, slots, dtype=dtype)
    expected = read_and_grads(plain, *inputs, dtype=torch.float64)
    got = read_and_grads(persistent_read_cpu.persistent_read_cpu, *inputs, dtype=dtype)
    for name, a, b in zip(["out", "queries", "keys", "values"], got, expected, strict=True):
        assert a.dtype == dtype, name
        assert relative_error(a, b) < tolerance, name


@needs_kernel
@SHAPES
def test_float32_kept_weights_give_the_gradients_of_recomputed_ones(heads, rows, dim, slots, monkeypatch):
    """In float32 the forward pass keeps the softmax weights (within KEEP_WEIGHTS_BUDGET) and the backward
    pass reads them instead of recomputing them: the same gradients up to float32 rounding."""
    inputs = problem(heads, rows, dim, slots, seed=5)
    kept = read_and_grads(persistent_read_cpu.persistent_read_cpu, *inputs, dtype=torch.float32)
    monkeypatch.setattr(persistent_read_cpu, "KEEP_WEIGHTS_BUDGET", 0)
    recomputed = read_and_grads(persistent_read_cpu.persistent_read_cpu, *inputs, dtype=torch.float32)
    assert torch.equal(kept[0], recomputed[0])  # the forward pass is the same either way
    for name, a, b in zip(["queries", "keys", "values"], kept[1:], recomputed[1:], strict=True):
        assert relative_error(a, b.double()) < 1e-5, name


@needs_kernel
def test_weights_are_kept_only_in_float32_for_a_backward_pass_within_the_budget(monkeypatch):
    module, calls = persistent_read_cpu.kernel(), []

    class Recording:
        def forward(self, *args):
            calls.append(args[-1] is not None)  # the buffer to keep the weights in, or None
            return module.forward(*args)

        def backward(self, *args):
            return module.backward(*args)

    monkeypatch.setattr(persistent_read_cpu, "kernel", Recording)
    queries, keys, values, grad = problem(2, 64, 64, 128)
    leaves = [t.clone().requires_grad_() for t in (queries, keys, values)]
    persistent_read_cpu.persistent_read_cpu(*leaves).backward(grad)
    persistent_read_cpu.persistent_read_cpu(*[t.bfloat16() for t in leaves[:1]], *leaves[1:])  # bf16
    with torch.no_grad():
        persistent_read_cpu.persistent_read_cpu(*leaves)  # nothing to differentiate
    monkeypatch.setattr(persistent_read_cpu, "KEEP_WEIGHTS_BUDGET", 2 * 64 * 128 - 1)
    persistent_read_cpu.persistent_read_cpu(*leaves)  # one weight over the budget
    assert calls == [True, False, False, False]


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
def test_persistent_retrieval_uses_the_kernel_without_dropout(monkeypatch):
    calls = []
    original = persistent_read_cpu.persistent_read_cpu
    monkeypatch.setattr(
        persistent_read_cpu, "persistent_read_cpu", lambda *a: calls.append([t.dtype for t in a[:3]]) or original(*a)
    )
    queries, keys, values, _ = bf16_problem(4, 64, 64, 128)
    batched = queries.view(4, 2, 32, 64).transpose(0, 1)  # (B, H, T, d)
    tables = keys[None].float(), values[None].float()
    persistent_retrieval(batched, *tables)
    persistent_retrieval(batched.float(), *tables)
    # float32 tables reach the kernel as they are
    assert calls == [[torch.bfloat16, torch.float32, torch.float32], [torch.float32] * 3]
    persistent_retrieval(batched, *tables, dropout_p=0.1, training=True)  # dropout: the fused kernel's own
    assert len(calls) == 2
    monkeypatch.setenv("MOSAIC_CPU_KERNEL", "0")
    persistent_retrieval(batched, *tables)
    assert len(calls) == 2


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
    assert not persistent_read_cpu.usable(queries.float(), keys.bfloat16(), dropout=False)  # float32 reads float32
    assert not persistent_read_cpu.usable(queries.half(), keys, dropout=False)
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
@pytest.mark.parametrize(
    "queries_dtype, tables, tolerance",
    [
        (torch.bfloat16, torch.float32, 1.5e-2),
        (torch.bfloat16, torch.bfloat16, 1.5e-2),
        (torch.float32, torch.float32, 1e-5),
    ],
)
def test_the_output_scale_and_its_gradient_match_the_plain_form(queries_dtype, tables, tolerance):
    """The kernel scales each head's read (the persistent memory's output scale) where it writes it; the
    gradients of everything, the scale's included, match scale_h * softmax(q k^T) v in float64."""
    queries, keys, values, grad = problem(3, 200, 64, 192, seed=4, dtype=queries_dtype)
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
    got = run(persistent_read_cpu.persistent_read_cpu, [queries_dtype, tables, tables, torch.float32])
    for name, a, b in zip(["out", "queries", "keys", "values", "scale"], got, expected, strict=True):
        assert relative_error(a, b) < tolerance, name


@needs_kernel
def test_kept_weights_buffers_are_reused_and_a_stale_graph_cannot_read_them(monkeypatch):
    """The kept weights' buffers go back to a pool after the backward pass and serve the next forward
    pass; a graph whose buffer was taken again fails its second backward pass loudly."""
    pool = persistent_read_cpu.KeptWeights()
    monkeypatch.setattr(persistent_read_cpu, "KEPT_WEIGHTS", pool)
    queries, keys, values, grad = problem(2, 64, 64, 128, seed=6)
    leaves = [t.clone().requires_grad_() for t in (queries, keys, values)]

    def step(retain_graph=False):
        out = persistent_read_cpu.persistent_read_cpu(*leaves)
        out.backward(grad, retain_graph=retain_graph)
        return out

    step()
    (buffer,) = pool._free
    first_grads = [leaf.grad.clone() for leaf in leaves]
    out = step(retain_graph=True)
    assert pool._free == [buffer]  # the same buffer, back again
    for leaf in leaves:
        leaf.grad = None
    out.backward(grad)  # nothing took the buffer since: the second backward pass reads the same weights
    assert all(torch.equal(leaf.grad, g) for leaf, g in zip(leaves, first_grads, strict=True))
    assert pool._free == [buffer]  # given back once, not twice
    stale = step(retain_graph=True)  # the buffer is back in the pool while this graph still holds it
    reused = persistent_read_cpu.persistent_read_cpu(*leaves)  # and is taken again, its weights overwritten
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward(grad)
    reused.backward(grad)
