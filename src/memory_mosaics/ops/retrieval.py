"""Retrieval from associative memories: Gaussian kernel smoothing over stored keys.

With unit-norm keys scaled by a per-head factor s, kernel smoothing with bandwidth 1/s is a softmax
over dot products with scale 1: exp(-s^2/2 |k_t - k_s|^2) = const * exp(<s k_t, s k_s>). So retrieval
is attention with scale 1 — computed here either plainly (an explicit masked softmax, the twin every
fast path is tested against) or by `scaled_dot_product_attention`.

Context memory: the query at t is the key k_t itself, and it may only read pairs (k_s, v_s) with
s <= t - shift, because v_s looks `shift` steps ahead (it contains x_{s+shift}). Rows t < shift have no
admissible pair and output exactly zero.

Persistent memory: queries read `count` learned tables of (keys, values), averaged; no mask.
Shapes: keys/values/queries (B, H, T, D); memory tables (count, H, P, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memory_mosaics.ops import persistent_read_cpu


def context_retrieval_reference(
    keys: Tensor, values: Tensor, shift: int = 1, dropout_p: float = 0.0, training: bool = False
) -> Tensor:
    """Explicit form: scores <k_t, k_s>, mask s > t - shift, softmax, zero rows t < shift."""
    length = keys.shape[-2]
    scores = keys @ keys.transpose(-1, -2)
    steps = torch.arange(length, device=keys.device)
    admissible = steps[None, :] <= steps[:, None] - shift
    scores = scores.masked_fill(~admissible, float("-inf"))
    has_past = (steps >= shift)[:, None]
    # Rows with no admissible key would be softmax over all -inf (NaN): give them a harmless 0 score
    # row, then zero their output.
    weights = torch.softmax(scores.masked_fill(~has_past, 0.0), dim=-1) * has_past
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ values


class _QueriesAndStoredKeys(torch.autograd.Function):
    """keys[..., shift:, :] (the queries) and keys[..., :T - shift, :] (the stored keys), whose backward pass
    writes the sum of their gradients once. As two slices, each slice's backward pass fills a zero tensor
    of the keys' size and copies its gradient in, and autograd adds the two: five passes instead of one."""

    @staticmethod
    def forward(ctx, keys: Tensor, shift: int):
        ctx.shift, ctx.shape = shift, keys.shape
        length = keys.shape[-2]
        return keys[..., shift:, :], keys[..., : length - shift, :]

    @staticmethod
    def backward(ctx, grad_queries: Tensor | None, grad_stored: Tensor | None):
        shift, length = ctx.shift, ctx.shape[-2]
        reference = grad_queries if grad_queries is not None else grad_stored
        if grad_queries is None or grad_stored is None or length < 2 * shift:
            grad = reference.new_zeros(ctx.shape)
            if grad_queries is not None:
                grad[..., shift:, :] += grad_queries
            if grad_stored is not None:
                grad[..., : length - shift, :] += grad_stored
            return grad, None
        # rows [0, shift) are only stored, [T - shift, T) only queries, the rows between are both
        grad = reference.new_empty(ctx.shape)
        grad[..., :shift, :] = grad_stored[..., :shift, :]
        torch.add(
            grad_stored[..., shift:, :], grad_queries[..., : length - 2 * shift, :], out=grad[..., shift:-shift, :]
        )
        grad[..., length - shift :, :] = grad_queries[..., length - 2 * shift :, :]
        return grad, None


class _LeadingRows(torch.autograd.Function):
    """x[..., :count, :], whose backward pass zero-fills only the rows after `count` (a slice's fills the
    whole gradient with zeros, then copies into it)."""

    @staticmethod
    def forward(ctx, x: Tensor, count: int):
        ctx.shape = x.shape
        return x[..., :count, :]

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        count = grad_rows.shape[-2]
        grad = grad_rows.new_empty(ctx.shape)
        grad[..., :count, :] = grad_rows
        grad[..., count:, :] = 0
        return grad, None


def leading_rows(x: Tensor, count: int) -> Tensor:
    """x[..., :count, :] (the values of the pairs a context memory reads), cheaper to differentiate."""
    return _LeadingRows.apply(x, count) if x.requires_grad else x[..., :count, :]


def context_read(
    keys: Tensor, stored_values: Tensor, shift: int = 1, dropout_p: float = 0.0, training: bool = False
) -> Tensor:
    """Rows shift..T-1 of the fast form, given the values of the pairs that are ever read
    (positions 0..T-1-shift): queries shift..T-1 attend to them with an ordinary causal mask.

    Shifting the query sequence turns "strictly before t - shift + 1" into plain causality, so
    `scaled_dot_product_attention` runs with `is_causal=True` and no explicit mask (an explicit mask
    would push it onto its slow path).
    """
    if keys.requires_grad:
        queries, stored_keys = _QueriesAndStoredKeys.apply(keys, shift)
    else:
        queries, stored_keys = keys[..., shift:, :], keys[..., : keys.shape[-2] - shift, :]
    return F.scaled_dot_product_attention(
        queries,
        stored_keys,
        stored_values,
        dropout_p=dropout_p if training else 0.0,
        is_causal=True,
        scale=1.0,
    )


def context_retrieval(
    keys: Tensor, values: Tensor, shift: int = 1, dropout_p: float = 0.0, training: bool = False
) -> Tensor:
    """Fast form of `context_retrieval_reference`: `context_read` with rows t < shift set to zero."""
    length = keys.shape[-2]
    if length <= shift:
        return torch.zeros_like(values)
    retrieved = context_read(keys, leading_rows(values, length - shift), shift, dropout_p, training)
    return F.pad(retrieved, (0, 0, shift, 0))  # rows t < shift: exactly zero


def persistent_retrieval_reference(
    queries: Tensor,
    memory_keys: Tensor,
    memory_values: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Explicit form: softmax over every slot of each table, averaged over the tables."""
    out = 0.0
    for table_keys, table_values in zip(memory_keys, memory_values, strict=True):
        weights = torch.softmax(queries @ table_keys.transpose(-1, -2), dim=-1)
        out = out + F.dropout(weights, p=dropout_p, training=training) @ table_values
    return out / memory_keys.shape[0]


def persistent_retrieval(
    queries: Tensor,
    memory_keys: Tensor,
    memory_values: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    value_scale: Tensor | None = None,
) -> Tensor:
    """Fast form: per table, one fused attention call that reads the whole batch at once.

    The tables are shared by the batch, so batch and time fold into one long sequence of B x T queries
    per head: a (1, H, B*T, d) query tensor (a view of head-major queries) against the (1, H, P, d)
    table, no mask, scale 1. The fused kernel never holds the B x H x T x P softmax weights (its
    backward pass recomputes them in blocks), so memory is O(T); on CPUs it was also measured faster
    than our blocked matrix products with a hand-written backward (`persistent_read.py`, the previous
    path; docs/performance.md): 126 vs 138 ms (bf16) and 162 vs 230 ms (fp32) forward + backward at
    B = 8, T = 256, H = 4, P = 896. Dropout on the weights is the kernel's own `dropout_p`.

    In bf16 or float32 on CPUs with AMX (and without dropout) each table is read by the compiled kernel of
    `persistent_read_cpu` instead, on the same folded queries: faster still, above all in the backward
    pass (in float32 because it keeps the softmax weights for it, within a budget; docs/performance.md).

    `value_scale` (H,), if given, multiplies each head's values (the persistent memory's output scale): the
    compiled kernel applies it to its read as it writes it (free, where scaling the tables costs
    a pass over them forward and two backward), the fused path to the tables.
    """
    batch, heads, length, dim = queries.shape
    dropout_p = dropout_p if training else 0.0
    folded = queries.transpose(0, 1).reshape(1, heads, batch * length, dim)  # a view for head-major queries
    compiled = persistent_read_cpu.usable(queries, memory_keys, dropout=dropout_p > 0)
    keys, values = memory_keys, memory_values
    if value_scale is not None and not compiled:
        values = values * value_scale[:, None, None]
    if not (compiled and keys.dtype == values.dtype):  # the kernel reads float32 or bf16 tables as they are
        keys, values = keys.to(queries.dtype), values.to(queries.dtype)
    out = None
    # One table (the default) as a view: iterating over the tables unbinds them, and the backward pass of
    # unbind (or of an index) copies each table's gradient into a new (count, H, P, d) tensor.
    tables = (
        zip(keys.unbind(0), values.unbind(0), strict=True)
        if keys.shape[0] > 1
        else [(keys.squeeze(0), values.squeeze(0))]
    )
    for table_keys, table_values in tables:
        if compiled:  # bf16 or float32 on CPUs with AMX: the compiled kernel (persistent_read_cpu.py)
            # squeeze, not [0]: an index's backward pass fills a zero tensor and copies the gradient into it
            read = persistent_read_cpu.persistent_read_cpu(folded.squeeze(0), table_keys, table_values, value_scale)
            read = read.unsqueeze(0)
        else:
            # (Autocast off: the inputs already have the dtype to compute in.)
            with torch.autocast(queries.device.type, enabled=False):
                read = F.scaled_dot_product_attention(
                    folded, table_keys.unsqueeze(0), table_values.unsqueeze(0), dropout_p=dropout_p, scale=1.0
                )
        out = read if out is None else out + read
    if memory_keys.shape[0] > 1:
        out = out / memory_keys.shape[0]
    return out.view(heads, batch, length, dim).transpose(0, 1)
