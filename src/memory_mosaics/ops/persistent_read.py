"""Persistent-memory retrieval on CPUs: a softmax over every slot, in blocks of rows, by hand.

No longer on the model's path: the fused attention kernel, called once per table on the folded
queries (`retrieval.persistent_retrieval`), keeps O(T) memory and, in bf16, its scores in float32.
This form writes the scores as products in the input dtype, so in bf16 each is rounded to 8 bits
(a score of 30, as in trained models, moves by up to 0.06 before the exponential). It stays, tested,
as the baseline that `benchmarks/ablation.py` measures the fused read against (docs/performance.md).

The tables are shared by the whole batch, so batch and time fold into one long matrix of queries per
head, and retrieval is two large matrix products per table and block of rows. The softmax weights are
B x H x T x P numbers — at T = 4096 with P = 896 slots per head, 470 MB per layer in bfloat16 — so this
function chooses:

- when the weights of the whole batch fit in `save_budget` elements, keep them for the backward pass
  (the fastest: the backward reads them);
- otherwise keep only each row's log-sum-exp and recompute the weights block by block in the backward
  pass, as flash attention does (one more matrix product and exponential; memory O(T), not O(T P)).

When recomputing, no more than `block_elements` scores exist at once. The backward pass of softmax retrieval:
    dV = W^T dO,  dW = dO V^T,  dS = W * (dW - <dO, O>),  dQ = dS K,  dK = dS^T Q
(rowsum(W * dW) = <dO, O> per row, O = W V), accumulated over blocks in (at least) float32 for the
tables. Shapes: queries (H, N, d) with N = batch x time; memory tables (count, H, P, d); output (H, N, d),
the average over tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAVE_BUDGET = 2**25  # elements of softmax weights kept for backward (64 MiB in bf16) before recomputing
BLOCK_ELEMENTS = 2**23  # scores computed at once (H x rows x P)


def _row_blocks(heads: int, rows: int, slots: int, block_elements: int) -> list[slice]:
    step = max(1, block_elements // max(1, heads * slots))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _softmax_weights(queries: Tensor, keys_t: Tensor, with_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Softmax weights (H, n, P), computed in place, and if asked the rows' log-sum-exp (H, n, 1).
    `keys_t` is the (H, d, P) transpose of the keys, stored contiguously."""
    scores = torch.bmm(queries, keys_t)
    if not with_lse:
        return torch._softmax(scores, -1, False, out=scores), None
    row_max, argmax = scores.max(dim=-1, keepdim=True)
    weights = torch._softmax(scores, -1, False, out=scores)
    # The weight at the row maximum is at least 1/P, so its log is exact enough to give the lse.
    acc = torch.promote_types(scores.dtype, torch.float32)
    lse = row_max.to(acc) - weights.gather(-1, argmax).to(acc).log()
    return weights, lse


def _recompute_weights(queries: Tensor, keys_t: Tensor, lse: Tensor) -> Tensor:
    scores = torch.baddbmm(-lse.to(queries.dtype), queries, keys_t)
    return scores.exp_()


class PersistentRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, save_budget: int, block_elements: int):
        count, heads, slots, _ = keys.shape
        rows = queries.shape[1]
        save_weights = count * heads * rows * slots <= save_budget
        # Kept weights all exist at once anyway: blocks would only make the products smaller.
        blocks = [slice(0, rows)] if save_weights else _row_blocks(heads, rows, slots, block_elements)
        # Measured on CPU (fp32 and bf16): a product with a contiguous (d, P) right factor runs twice
        # as fast as with the transposed view of the (P, d) table.
        keys_t = keys.transpose(-1, -2).contiguous()
        reads, kept = [[] for _ in range(count)], []
        for block in blocks:
            for table in range(count):
                weights, lse = _softmax_weights(queries[:, block], keys_t[table], with_lse=not save_weights)
                reads[table].append(torch.bmm(weights, values[table]))
                kept.append(weights if save_weights else lse)
        # Each table's read is kept (O(N d)): the backward pass needs rowsum(W * dW) = <dO, O> per table.
        reads = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in reads]
        ctx.save_for_backward(queries, keys, values, *reads, *kept)
        ctx.save_weights, ctx.blocks = save_weights, blocks
        if count == 1:
            return reads[0].clone()  # not the saved tensor itself: a caller may modify its output in place
        return torch.stack(reads).mean(dim=0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        queries, keys, values, *saved = ctx.saved_tensors
        count = keys.shape[0]
        reads, kept = saved[:count], saved[count:]
        if count > 1:
            grad_out = grad_out / count
        acc = torch.promote_types(keys.dtype, torch.float32)  # sums over blocks: at least float32
        # softmax backward: dS = W * (dW - rowsum(W * dW)) with dW = dO V^T, and rowsum(W * dW) = <dO, O>
        # per row (O = W V, this table's read). The subtraction rides in the product that makes dW: a
        # column -<dO, O> appended to dO meets a row of ones appended to V^T. So the (n, P) matrices are
        # written once by that product and passed over once by the multiplication with W, where
        # softmax's own backward (and `baddbmm` with a broadcast row term, which first copies it into
        # the whole output) each take another full pass.
        row_dots = [(grad_out.to(acc) * read.to(acc)).sum(-1, keepdim=True).to(keys.dtype) for read in reads]
        values_t = values.transpose(-1, -2)
        ones = values_t.new_ones(count, values_t.shape[1], 1, values_t.shape[-1])
        values_t = torch.cat([values_t, ones], dim=-2)  # (count, H, d + 1, P), contiguous
        grad_keys = torch.zeros(keys.shape, dtype=acc, device=keys.device)
        grad_values = torch.zeros(values.shape, dtype=acc, device=values.device)
        grad_queries, kept_iter = [], iter(kept)
        keys_t = keys.transpose(-1, -2).contiguous() if not ctx.save_weights else None
        for block in ctx.blocks:
            q, g = queries[:, block], grad_out[:, block]
            grad_q = None
            for table in range(count):
                saved_block = next(kept_iter)
                weights = saved_block if ctx.save_weights else _recompute_weights(q, keys_t[table], saved_block)
                # Products ordered so that the big (n, P) factor is read in its stored order.
                grad_values[table] += torch.bmm(g.transpose(-1, -2), weights).transpose(-1, -2)
                g_and_dot = torch.cat([g, -row_dots[table][:, block]], dim=-1)  # (H, n, d + 1)
                grad_scores = torch.bmm(g_and_dot, values_t[table]).mul_(weights)
                step = torch.bmm(grad_scores, keys[table])
                grad_q = step if grad_q is None else grad_q.add_(step)
                grad_keys[table] += torch.bmm(q.transpose(-1, -2), grad_scores).transpose(-1, -2)
            grad_queries.append(grad_q)
        grad_queries = grad_queries[0] if len(grad_queries) == 1 else torch.cat(grad_queries, dim=1)
        return grad_queries, grad_keys.to(keys.dtype), grad_values.to(values.dtype), None, None


def persistent_read(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    save_budget: int = SAVE_BUDGET,
    block_elements: int = BLOCK_ELEMENTS,
) -> Tensor:
    """Average over tables of softmax(queries @ keys^T) @ values, for (H, N, d) queries and
    (count, H, P, d) tables of the same dtype; see the module docstring."""
    return PersistentRead.apply(queries, keys, values, save_budget, block_elements)
